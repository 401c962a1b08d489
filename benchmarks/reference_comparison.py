"""Does the reference comparison help? Plain in-context learning, ICL with the comparison, and the training-free
kNN baseline, from two `kensa-vl eval` outputs of models trained by the same recipe and budget:

    kensa-vl train --out outputs/comparison                                 # the main job's default
    kensa-vl train --out outputs/plain --tiny reference_comparison=false    # the same without the comparison
    kensa-vl eval --model outputs/comparison/model --data outputs/kensa-synth-224 --shots 1,2,4,8 \
        --out outputs/eval-comparison                                       # and the same for outputs/plain
    python -m benchmarks.reference_comparison outputs/eval-plain outputs/eval-comparison \
        --plot docs/reference-comparison.png

Prints a markdown table (balanced accuracy, AUROC, box hit rate; mean ± std over seeds) and writes the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kensa_vl.eval.plots import accuracy_vs_shots

METRICS = ("balanced_accuracy", "auroc", "box_hit_rate")


def cell(value: dict | None) -> str:
    return "n/a" if not value or value["mean"] is None else f"{value['mean']:.3f} ± {value['std']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plain", help="kensa-vl eval output of the model trained without the comparison")
    parser.add_argument("comparison", help="kensa-vl eval output of the model trained with it")
    parser.add_argument("--plot", default=None, help="PNG to write (accuracy vs shots, three methods)")
    args = parser.parse_args()
    plain, comparison = (json.loads((Path(d) / "metrics.json").read_text()) for d in (args.plain, args.comparison))
    methods = {
        "plain ICL": plain["kensa"]["shots"],
        "ICL + reference comparison": comparison["kensa"]["shots"],
        "kNN patch memory": comparison["patchcore"]["shots"],
    }
    print("| method | k | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    draws_boxes = {name: name != "kNN patch memory" for name in methods}  # the baseline only scores
    for name, shots in methods.items():
        for k in sorted(shots, key=int):
            cells = [cell(shots[k]["overall"].get(m)) if draws_boxes[name] or m != "box_hit_rate" else "n/a"
                     for m in METRICS]  # fmt: skip
            print(f"| {name} | {k} | " + " | ".join(cells) + " |")
    print("\nBox hit rate (IoU >= 0.5) on defects covering at least 1% of the image (sizes medium and large):")
    for name, shots in [(n, s) for n, s in methods.items() if draws_boxes[n]]:
        rates = {k: [(v["per_size"].get(size) or {}).get("box_hit_rate") for size in ("medium", "large")]
                 for k, v in shots.items()}  # fmt: skip
        print(f"- {name}: " + "; ".join(f"k={k} medium {cell(m)}, large {cell(g)}" for k, (m, g) in rates.items()))
    if args.plot:
        accuracy_vs_shots(methods, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
