"""How many tiles should each support image get? Accuracy and per-query latency of the cached inspector against the
support tile budget, side by side in one run (the query keeps the processor's budget).

    python benchmarks/support_tiles.py --model outputs/main/model --data outputs/kensa-synth-224 [--budgets 1,2,4]

The validation split (held-out categories), k = 4 good supports, 3 seeds, 20 queries per category, scores only (no
generation).
"""

from __future__ import annotations

import argparse
import statistics
import time

from kensa_vl.eval.evaluate import evaluate
from kensa_vl.eval.inspector import Inspector, load_pretrained
from kensa_vl.train.data.synth import load_synth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--budgets", default="1,2,4", help="support max_tiles values (the query keeps the default)")
    parser.add_argument("--shots", type=int, default=4)
    args = parser.parse_args()
    model, processor = load_pretrained(args.model)
    photos = load_synth(args.data)[0]["validation"]
    default = processor.image_processor.max_tiles
    print(f"query max_tiles {default}; k = {args.shots}")
    print("| support max_tiles | balanced accuracy | AUROC | median ms per query (cached) | set_support ms |")
    print("|---|---|---|---|---|")
    for budget in [int(b) for b in args.budgets.split(",")]:
        result = evaluate(model, processor, photos, shots=(args.shots,), seeds=3, queries_per_category=20,
                          controls=(), generate=False, progress=False, support_max_tiles=budget)  # fmt: skip
        overall = result["shots"][args.shots]["overall"]
        inspector = Inspector(model, processor, max_new_tokens=0, support_max_tiles=budget)
        support = [photos[i] for i, label in enumerate(photos["label"]) if label == "good"][: args.shots]
        start = time.perf_counter()
        inspector.set_support(support)
        setup = (time.perf_counter() - start) * 1000
        queries = [photos[i]["image"] for i in range(len(photos))][:30]
        inspector.judge(queries[:1])
        per_query = []
        for query in queries:
            start = time.perf_counter()
            inspector.judge(query)
            per_query.append((time.perf_counter() - start) * 1000)
        print(f"| {budget} | {overall['balanced_accuracy']['mean']:.3f} ± {overall['balanced_accuracy']['std']:.3f} | "
              f"{overall['auroc']['mean']:.3f} | {statistics.median(per_query):.1f} | {setup:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
