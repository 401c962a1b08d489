"""How often `support_check` calls an example or a query unlike the good ones: photos of the product against photos
of another product, per margin (issue 23, "demos of another product"; docs/inspection.md).

    python benchmarks/unlike_examples.py MODEL --data outputs/kensa-synth-224 --data outputs/kensa-synth-224-surfaces

Per category of each `--data` folder's split (validation by default) and seed: k good examples as `kensa-vl eval`
draws them, then `example_excess` of
- each good example of that set (a call here is a false alarm),
- a good photo of another category of the same folder put in place of the last good example (another product),
  and the good examples beside it (with one good example fewer, a false alarm here too),
- a defective photo of the category added as a defective example, and one of another category,
- as queries (`Normal.excess`, what `Inspector.judge` sets as `Judgement.unlike`): up to `--queries` of the
  category's other good photos, of its defective photos, and as many of another category's good and defective ones.
The table gives, per margin, the share of each kind called unlike. The language model plays no part; any model with
the comparison gives the same figures (the compared encoders are weight-free or pretrained, never trained here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks import STUDY_SPLITS
from kensa_vl.eval.evaluate import pools, support_for
from kensa_vl.eval.inspector import load_pretrained
from kensa_vl.eval.support_check import UNLIKE_MARGIN, compared_features, example_excess, measure_support
from kensa_vl.train.data.synth import load_synth

KINDS = (
    "good example",
    "another product, good",
    "good example beside it",
    "defective example",
    "another product, defective",
    "good query",
    "defective query",
    "another product's good query",
    "another product's defective query",
)


def collect(model, processor, items, shots: int, seeds: int, queries: int) -> dict[str, list[float]]:
    """Per kind of example or query, the excess of each one met (the kinds of `KINDS`)."""
    rows, out = pools(items), {kind: [] for kind in KINDS}
    for seed in range(seeds):
        for category in tqdm(sorted(rows), desc=f"seed {seed}"):
            good, _ = support_for(rows, category, shots, 0, seed)
            rng = np.random.default_rng([seed, sum(map(ord, category)), 11])
            other = str(rng.choice([c for c in rows if c != category]))
            support = [items[i] for i in good]
            excess, normal = measure_support(model, processor, support)
            out[KINDS[0]] += excess
            foreign = items[int(rng.choice(rows[other]["good"]))]
            *beside, measured = example_excess(model, processor, support[:-1] + [foreign])
            out[KINDS[1]].append(measured)
            out[KINDS[2]] += beside
            for kind, source in ((KINDS[3], category), (KINDS[4], other)):
                shown = items[int(rng.choice(rows[source]["defective"]))]
                out[kind].append(example_excess(model, processor, support + [shown])[-1])
            unshown = [i for i in rows[category]["good"] if i not in good]
            sources = (unshown, rows[category]["defective"], rows[other]["good"], rows[other]["defective"])
            for kind, pool in zip(KINDS[5:], sources, strict=True):
                for i in rng.permutation(pool)[:queries]:
                    out[kind].append(normal.excess(compared_features(model, processor, items[int(i)]["image"])))
    return out


def table(found: dict[str, dict[str, list[float]]], margins) -> list[str]:
    """Per data folder and margin, the share of each kind of example called unlike."""
    lines = ["| data | margin | " + " | ".join(KINDS) + " |", "|---" * (2 + len(KINDS)) + "|"]
    for name, kinds in found.items():
        for margin in margins:
            shares = [np.mean(np.array(kinds[k], dtype=float) > margin) for k in KINDS]
            mark = " (kept)" if margin == UNLIKE_MARGIN else ""
            lines.append(f"| {name} | {margin:g}{mark} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
    counts = {k: sum(len(kinds[k]) for kinds in found.values()) for k in KINDS}
    return lines + ["", "Examples measured: " + ", ".join(f"{k} {n}" for k, n in counts.items()) + "."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", action="append", required=True, help="a KensaSynth folder (repeatable)")
    parser.add_argument("--split", default="validation", choices=STUDY_SPLITS)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=8, help="queries of each kind per category and seed")
    parser.add_argument("--margins", default="0.25,0.5,0.75,1")
    args = parser.parse_args()
    model, processor = load_pretrained(args.model)
    found = {}
    for data in args.data:
        items = load_synth(data)[0][args.split]
        found[Path(data).name] = collect(model, processor, items, args.shots, args.seeds, args.queries)
    print("\n".join(table(found, [float(m) for m in args.margins.split(",")])))


if __name__ == "__main__":
    main()
