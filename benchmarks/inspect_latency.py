"""Inspection throughput: per-query latency with the support set cached vs the whole prompt recomputed, at several
shot counts, and queries per second with the cache at batch 8, side by side in one run.

    python -m benchmarks.inspect_latency [--shots 1,2,4,8] [--queries 20] [--size 448] [--batch 8] [--model DIR]

Without --model: the tiny offline KensaVL (random weights; 224 px tiles, up to 6 tiles + thumbnail per image).
Scores only (P(defective)); the generated description costs the same in both modes (it always reuses the cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from benchmarks.episode import photos
from kensa_vl.eval.inspector import Inspector, load_pretrained, support_item
from kensa_vl.eval.measure import machine


def per_query(inspector: Inspector, queries) -> tuple[float, list[float]]:
    """Median seconds per query judged one by one, and the scores."""
    inspector.judge(queries[:1])  # warm-up
    times, scores = [], []
    for query in queries:
        start = time.perf_counter()
        scores.append(inspector.judge(query)[0].p_defective)
        times.append(time.perf_counter() - start)
    return statistics.median(times), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="1,2,4,8")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model:
        model, processor = load_pretrained(args.model)
    else:
        from kensa_vl.train.build import build_tiny

        model, processor = build_tiny()
    queries = photos(args.queries, args.size, seed=1)
    rows = []
    for k in tqdm([int(k) for k in args.shots.split(",")], desc="shots"):
        support = [support_item(image) for image in photos(k, args.size)]
        cached = Inspector(model, processor, max_new_tokens=0)
        cached.set_support(support)
        recomputed = Inspector(model, processor, cache=False, max_new_tokens=0)
        recomputed.set_support(support)
        fast, a = per_query(cached, queries)
        slow, b = per_query(recomputed, queries)
        start = time.perf_counter()
        batched = cached.judge(queries, batch_size=args.batch)
        qps = len(queries) / (time.perf_counter() - start)
        others = b + [r.p_defective for r in batched]  # recomputed and batched, each against one-by-one cached
        diff = max(abs(x - y) for x, y in zip(a + a, others, strict=True))
        rows.append((k, cached._prefix["input_ids"].shape[1], fast, slow, qps, diff))
    print(f"{machine()}; {args.size} px photos, {args.queries} queries, scores only")
    print(
        "| k | prefix tokens | cached ms/query | recomputed ms/query | speed-up | queries/s one by one (cached) "
        f"| queries/s at batch {args.batch} (cached) | max ΔP(defective) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k, prefix, fast, slow, qps, diff in rows:
        print(
            f"| {k} | {prefix} | {fast * 1e3:.1f} | {slow * 1e3:.1f} | {slow / fast:.1f}× | {1 / fast:.0f} "
            f"| {qps:.0f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
