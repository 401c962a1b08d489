"""Per-query latency of the inspection API with the support set cached vs recomputed, side by side in one run.

    python benchmarks/inspect_latency.py [--shots 4] [--queries 20] [--size 448] [--model DIR]

Without --model: the tiny offline KensaVL (random weights; 224 px tiles, up to 6 tiles + thumbnail per image).
Scores only (P(defective)); the generated description costs the same in both modes (it always reuses the cache).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from kensa_vl.eval.inspector import Inspector, load_pretrained, support_item


def _photo(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model:
        model, processor = load_pretrained(args.model)
    else:
        from kensa_vl.train.build import build_tiny

        model, processor = build_tiny()
    support = [support_item(_photo(args.size, i)) for i in range(args.shots)]
    queries = [_photo(args.size, 1000 + i) for i in range(args.queries)]
    timings, scores, prefix = {}, {}, None
    for cache in (True, False):
        inspector = Inspector(model, processor, cache=cache, max_new_tokens=0)
        start = time.perf_counter()
        inspector.set_support(support)
        setup = time.perf_counter() - start
        prefix = prefix or inspector._prefix["input_ids"].shape[1]  # the cached run comes first
        inspector.judge(queries[:1])  # warm-up
        per_query = []
        for query in tqdm(queries, desc=f"cache={cache}"):
            start = time.perf_counter()
            scores.setdefault(cache, []).append(inspector.judge(query)[0].p_defective)
            per_query.append(time.perf_counter() - start)
        timings[cache] = (setup, statistics.median(per_query))
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.shots}-shot, {args.size} px photos, prefix {prefix} tokens, {args.queries} queries")
    print("| mode | set_support (s) | median per query (ms) |")
    print("|---|---|---|")
    for cache, label in ((True, "support cached (KV + features)"), (False, "prefix recomputed per query")):
        print(f"| {label} | {timings[cache][0]:.3f} | {timings[cache][1] * 1000:.1f} |")
    print(
        f"speed-up per query: {timings[False][1] / timings[True][1]:.1f}x; "
        f"max |ΔP(defective)| = {max(abs(a - b) for a, b in zip(scores[True], scores[False], strict=True)):.2e}"
    )


if __name__ == "__main__":
    main()
