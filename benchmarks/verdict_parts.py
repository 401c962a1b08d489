"""The verdict's two parts on validation splits: the comparison's verdict logit and the language model's own odds.

    python -m benchmarks.verdict_parts MODEL --data outputs/kensa-synth-224 --data outputs/kensa-synth-224-surfaces \
        [--weights 0,0.5,1,1.5,2,3,5] [--plot verdict_parts.png]

The model's P(defective) is read where the answer starts, from the odds of "defective" against "good": the language
model's own odds plus the comparison's verdict logit for the query (`set_verdict_odds`; each summary carries its
logit). Per query (the evaluator's support draw, k good examples, every other photo of a category a query, one look
as `Inspector(phases=1)` judges) this splits the two and scores `verdict + w * language model` for each weight `w`
(1 is the model), and the language model alone: pooled AUROC, balanced accuracy and overkill at the model's
threshold (odds 0). Which part ranks which split better, and whether some other mix would do better on both
(docs/real-surfaces.md). Splits other than validation and train are refused: nothing here may read the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from benchmarks import study_parser
from benchmarks.verdict_levels import balanced
from kensa_vl.eval.evaluate import control_support, pools, support_for
from kensa_vl.eval.inspector import Inspector, load_pretrained
from kensa_vl.train.data.synth import load_synth


@torch.no_grad()
def parts(inspector: Inspector, image) -> tuple[float, float]:
    """One query's (verdict logit, the language model's own odds of "defective" against "good")."""
    _, out = inspector._score(image)
    good, defective = out.logits[0, -1].float()[list(inspector.verdict_ids)].tolist()
    verdict = float(out.summaries[-1].verdict)
    return verdict, defective - good - verdict


def collect(model, processor, items, shots: int, seeds: int) -> dict[str, np.ndarray]:
    """Per query of `items`: `label` (1 defective), `verdict` and `lm` (`parts`)."""
    rows, inspector = pools(items), Inspector(model, processor, max_new_tokens=0)
    out = {"label": [], "verdict": [], "lm": []}
    for seed in tqdm(range(seeds), desc="seeds"):
        for category in sorted(rows):
            good, _ = support_for(rows, category, shots, 0, seed)
            inspector.set_support(control_support(items, good, [], None, seed))
            for i in rows[category]["good"] + rows[category]["defective"]:
                if i in good:
                    continue
                verdict, lm = parts(inspector, items[i]["image"].convert("RGB"))
                out["label"].append(int(items[i]["label"] == "defective"))
                out["verdict"].append(verdict)
                out["lm"].append(lm)
    return {key: np.array(value) for key, value in out.items()}


def mixes(record: dict[str, np.ndarray], weights) -> dict[str, tuple[float, float, float]]:
    """Per mix (`w=...` for `verdict + w * lm`, and "language model alone"): AUROC, balanced accuracy and overkill
    at odds 0."""
    labels, out = record["label"], {}
    odds = {f"w={w:g}": record["verdict"] + w * record["lm"] for w in weights}
    odds["language model alone"] = record["lm"]
    for name, value in odds.items():
        called = value > 0
        out[name] = (roc_auc_score(labels, value), balanced(labels, called), float(called[labels == 0].mean()))
    return out


def table(sets: dict[str, dict], weights) -> list[str]:
    scored = {name: mixes(record, weights) for name, record in sets.items()}
    lines = ["| mix | " + " | ".join(f"{name}: AUROC | BA | overkill" for name in sets) + " |",
             "|---" * (1 + 3 * len(sets)) + "|"]  # fmt: skip
    for mix in next(iter(scored.values())):
        cells = [f"{x:.3f}" for name in sets for x in scored[name][mix]]
        lines.append(f"| {mix} | " + " | ".join(cells) + " |")
    return lines


def plot(sets: dict[str, dict], weights, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, record in sets.items():
        scored = mixes(record, weights)
        for axis, column in zip(axes, (0, 1), strict=True):
            line = axis.plot(weights, [scored[f"w={w:g}"][column] for w in weights], marker="o", label=name)[0]
            axis.axhline(scored["language model alone"][column], ls=":", color=line.get_color())
    for axis, what in zip(axes, ("pooled AUROC", "balanced accuracy at odds 0"), strict=True):
        axis.axvline(1, color="grey", lw=0.8)
        axis.set_xlabel("w in verdict + w x language model's odds")
        axis.set_title(f"{what} (1: the model; dotted: the language model alone)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--weights", default="0,0.5,1,1.5,2,3,5")
    parser.add_argument("--plot", help="a PNG of both measures against the weight")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    model, processor = load_pretrained(args.model)
    torch.manual_seed(0)
    sets = {Path(d).name: collect(model, processor, load_synth(d)[0][args.split], args.shots, args.seeds)
            for d in args.data}  # fmt: skip
    sizes = ", ".join(f"{name} {len(record['label'])}" for name, record in sets.items())
    print(f"{args.split}, k = {args.shots}, {args.seeds} seeds, one look; queries: {sizes}")
    print("\n".join(table(sets, weights)))
    if args.plot:
        plot(sets, weights, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
