"""Which level makes the verdict's threshold hold across products: each rule's untrained decision on a validation
split, pooled over its categories (issue 22, "a threshold that transfers"; docs/real-surfaces.md).

    python benchmarks/verdict_levels.py MODEL --data outputs/kensa-synth-224 --data outputs/kensa-synth-224-surfaces

For every category, seed and k good supports (as `kensa-vl eval` draws them), every other photo of the category is
a query. Per compared encoder the script keeps the query's kNN score against the supports (`image_scores`), the
supports' scores against the supports before them (`ReferenceBank.scores`, what the model's level is now) and each
support's score against the other k - 1 (leave one out). Each rule turns these into one decision value per query,
the largest over encoders of `scale * (score - level) / spread - margin` (the encoder entries' `verdict_scale` and
`verdict_margin`); the threshold is the untrained model's, VERDICT_MARGIN. A threshold that transfers keeps
balanced accuracy at that one threshold across categories and splits, and ranks queries of every category on one
scale: pooled AUROC, not only per category. The language model plays no part.

`--sweep ENCODER --margins ...` moves that encoder's verdict margin; `--sweep ENCODER --windows 0,0.1,0.2`
its `own_window` (the photo compared with itself too, `own_nearest`), collecting the scores anew for each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from benchmarks import study_parser
from kensa_vl.eval.evaluate import control_support, pools, support_for
from kensa_vl.eval.inspector import Inspector, load_pretrained
from kensa_vl.modeling.comparison_kensa_vl import VERDICT_MARGIN
from kensa_vl.train.data.synth import load_synth


def collect(model, processor, items, shots: int, seeds: int, leave_one_out: bool = True) -> list[dict]:
    """Per query: category, label, its scores `(E,)`, the bank's sequential scores `(k - 1, E)` and the supports'
    leave-one-out scores `(k, E)` (without `leave_one_out`, `(0, E)`: not computed)."""
    rows = pools(items)
    inspector, out = Inspector(model, processor, max_new_tokens=0), []
    for seed in tqdm(range(seeds), desc="seeds"):
        for category in sorted(rows):
            good, _ = support_for(rows, category, shots, 0, seed)
            support = control_support(items, good, [], None, seed)
            held_out = []
            for i in range(shots if leave_one_out else 0):  # each support against the others
                inspector.set_support(support[:i] + support[i + 1 :])
                held_out.append(inspector._score(support[i]["image"])[1].image_scores[-1].float().numpy())
            inspector.set_support(support)
            sequential = inspector._bank.scores.float().numpy()
            for i in rows[category]["good"] + rows[category]["defective"]:
                if i in good:
                    continue
                scores = inspector._score(items[i]["image"].convert("RGB"))[1].image_scores[-1].float().numpy()
                label = int(items[i]["label"] == "defective")
                held = np.stack(held_out) if held_out else np.zeros((0, len(scores)))
                out.append({"category": category, "seed": seed, "label": label, "scores": scores,
                            "sequential": sequential, "held_out": held})  # fmt: skip
    return out


# rule -> (level, spread) per encoder from a query's record
RULES = {
    "median of the sequential scores (now)": lambda r: (np.median(r["sequential"], 0), 1.0),
    "median of the leave-one-out scores": lambda r: (np.median(r["held_out"], 0), 1.0),
    "largest leave-one-out score": lambda r: (r["held_out"].max(0), 1.0),
    "leave-one-out median, over their spread (max - min)": lambda r: (
        np.median(r["held_out"], 0),
        np.maximum(np.ptp(r["held_out"], 0), 0.1),
    ),
}


def decisions(records: list[dict], rule, excess: np.ndarray) -> np.ndarray:
    values = []
    for r in records:
        level, spread = rule(r)
        values.append((excess[:, 0] * (r["scores"] - level) / spread - excess[:, 1]).max())
    return np.array(values)


def balanced(labels: np.ndarray, called: np.ndarray) -> float:
    return float((called[labels == 1].mean() + (1 - called[labels == 0].mean())) / 2)


def best_threshold(labels: np.ndarray, d: np.ndarray) -> float:
    """The decision threshold with the best balanced accuracy on these queries."""
    candidates = np.unique(d)
    return float(max(candidates, key=lambda t: balanced(labels, d >= t)))


def table(sets: dict[str, list[dict]], excess: np.ndarray) -> list[str]:
    """Per rule and split: pooled and per-category AUROC, balanced accuracy at the untrained threshold, at the
    split's own best threshold, and at the best threshold of the other splits pooled (does it transfer?), and the
    spread of per-category balanced accuracy at the split's own best threshold."""
    lines = [
        "| level | split | AUROC pooled | by category | BA: untrained | own best | others' best | std by category |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rule in RULES.items():
        scored = {}
        for split, records in sets.items():
            labels = np.array([r["label"] for r in records])
            scored[split] = labels, decisions(records, rule, excess), np.array([r["category"] for r in records])
        for split, (labels, d, categories) in scored.items():
            own = best_threshold(labels, d)
            others = [s for s in scored if s != split]
            transfer = "n/a"
            if others:
                pooled = [np.concatenate([scored[s][i] for s in others]) for i in (0, 1)]
                transfer = f"{balanced(labels, d >= best_threshold(*pooled)):.3f}"
            per = [(roc_auc_score(labels[m], d[m]), balanced(labels[m], d[m] >= own))
                   for m in (categories == c for c in sorted(set(categories)))]  # fmt: skip
            per = np.array(per)
            lines.append(
                f"| {name} | {split} | {roc_auc_score(labels, d):.3f} | {per[:, 0].mean():.3f} | "
                f"{balanced(labels, d > VERDICT_MARGIN):.3f} | {balanced(labels, d >= own):.3f} | {transfer} | "
                f"{per[:, 1].std():.3f} |"
            )
    return lines


def sweep_header(setting: str, splits) -> list[str]:
    return ["| " + setting + " | " + " | ".join(f"{s}: AUROC | BA" for s in splits) + " |",
            "|---" * (1 + 2 * len(splits)) + "|"]  # fmt: skip


def sweep_row(value: float, sets: dict[str, list[dict]], excess: np.ndarray) -> str:
    """One setting's row: per split, the kept level's pooled AUROC and balanced accuracy at the untrained
    threshold."""
    rule, cells = next(iter(RULES.values())), []
    for records in sets.values():
        labels = np.array([r["label"] for r in records])
        d = decisions(records, rule, excess)
        cells += [f"{roc_auc_score(labels, d):.3f}", f"{balanced(labels, d > VERDICT_MARGIN):.3f}"]
    return f"| {value:g} | " + " | ".join(cells) + " |"


def margin_sweep(sets: dict[str, list[dict]], excess: np.ndarray, encoder: int, margins) -> list[str]:
    """The kept level's rule with compared encoder `encoder`'s verdict margin set to each of `margins` (its scale
    kept; inf: that encoder left out): per split, pooled AUROC and balanced accuracy at the untrained threshold. How
    an encoder's margin is chosen (docs/real-surfaces.md)."""
    lines = sweep_header("margin", sets)
    for margin in margins:
        changed = excess.copy()
        changed[encoder, 1] = margin
        lines.append(sweep_row(margin, sets, changed))
    return lines


def window_sweep(model, processor, splits: dict, encoder: str, windows, shots: int, seeds: int) -> list[str]:
    """The kept level's rule with compared encoder `encoder`'s `own_window` set to each of `windows` (0: none),
    the scores collected anew on each split (`splits`: name -> items): how the window is chosen
    (docs/real-surfaces.md). The model's own windows are put back."""
    comparison = model.model.reference_comparison
    index, kept, excess = comparison.encoders.index(encoder), list(comparison.own_windows), np.array(comparison.excess)
    lines = sweep_header(f"{encoder} own window", splits)
    try:
        for window in windows:
            comparison.own_windows[index] = window or None
            sets = {name: collect(model, processor, items, shots, seeds, False) for name, items in splits.items()}
            lines.append(sweep_row(window, sets, excess))
    finally:
        comparison.own_windows[:] = kept
    return lines


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--sweep", help="a compared encoder whose verdict margin to sweep (`margin_sweep`)")
    parser.add_argument("--margins", default="0,0.25,0.5,0.75,1,1.5,2,inf", help="with --sweep")
    parser.add_argument("--windows", help="with --sweep: own windows to sweep instead of margins (0: none)")
    args = parser.parse_args()
    model, processor = load_pretrained(args.model)
    comparison = model.model.reference_comparison
    excess = np.array(comparison.excess, dtype=float)
    splits = {Path(data).name: load_synth(data)[0][args.split] for data in args.data}
    if args.sweep and args.windows:
        windows = [float(w) for w in args.windows.split(",")]
        print(f"{args.split}, k = {args.shots}, {args.seeds} seeds; encoders {comparison.encoders}")
        print("\n".join(window_sweep(model, processor, splits, args.sweep, windows, args.shots, args.seeds)))
        return
    sets = {name: collect(model, processor, items, args.shots, args.seeds) for name, items in splits.items()}
    sizes = ", ".join(f"{name} {len(records)}" for name, records in sets.items())
    print(f"{args.split}, k = {args.shots}, {args.seeds} seeds, queries: {sizes}; encoders {comparison.encoders}")
    print("\n".join(table(sets, excess)))
    if args.sweep:
        margins = [float(m) for m in args.margins.split(",")]
        print("\n".join(margin_sweep(sets, excess, comparison.encoders.index(args.sweep), margins)))


if __name__ == "__main__":
    main()
