"""Inspection throughput: per-query latency with the support set cached vs the whole prompt recomputed, at several
shot counts, against the query alone (`floor`: its own forward pass against a ready bank), and queries per second
with the cache at batch 8, side by side in one run; and what showing the support set costs (`set_support`, median
of 5). The cached runner is what users get, with the check of each query against the good examples
(`support_check`, `Judgement.unlike`); a cached runner without it (`check_examples=False`, as the evaluations run)
gives the check's cost. With `--coreset R`, a fifth runner: the cached support set's bank reduced to a greedy
k-center coreset of R of its cells (`reference_coreset`), and how far its P(defective) moves from the exact bank's.

    python -m benchmarks.inspect_latency [--shots 1,2,4,8] [--queries 20] [--size 448] [--batch 8] [--model DIR]
        [--data DIR [--split validation]] [--coreset 0.25]

Without --model: the tiny offline KensaVL (random weights; 224 px tiles, up to 6 tiles + thumbnail per image).
Without --data: noise photos of `--size` px; with it, KensaSynth photos of the split's first category (good supports,
queries half good, half defective), so a trained model's defective verdicts also place their boxes.
Scores only (P(defective)); the generated description costs the same in both modes (it always reuses the cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from benchmarks import STUDY_SPLITS
from benchmarks.episode import photos
from kensa_vl.eval.inspector import Inspector, load_pretrained, support_item
from kensa_vl.eval.measure import machine, timed


def per_query(runners: list, queries) -> list[tuple[float, float, list]]:
    """Per runner (a function: query -> P(defective), or None): mean and median seconds per query, and what it gave.
    The runners take turns on each query, so a slow spell of the machine falls on all of them alike. The mean is the
    one to compare: with a trained model, a defective verdict also places its box, and over a mix of verdicts the
    median jumps between the two kinds of query."""
    for run in runners:
        run(queries[0])  # warm-up
    times, scores = [[] for _ in runners], [[] for _ in runners]
    for query in queries:
        for run, spent, scored in zip(runners, times, scores, strict=True):
            start = time.perf_counter()
            scored.append(run(query))
            spent.append(time.perf_counter() - start)
    return [(statistics.mean(t), statistics.median(t), scored) for t, scored in zip(times, scores, strict=True)]


def judged(inspector: Inspector):
    return lambda query: inspector.judge(query)[0].p_defective


def floor(inspector: Inspector, queries):
    """The query alone, as a runner for `per_query`: one forward pass of its own tokens and tiles (processed
    beforehand), against the support set's ready bank, without the support prefix, the processor call or the
    evidence. What a cached query cannot go below."""
    tiles = inspector.query_max_tiles
    prepared = {id(q): inspector._encode(inspector._suffix_text, [q], tiles, first=False) for q in queries}
    extra = {"reference_banks": [inspector._bank]} if inspector._bank else {}

    @torch.no_grad()
    def run(query):
        inspector.model(**prepared[id(query)], **extra, logits_to_keep=1)

    return run


def with_coreset(inspector: Inspector, support: list, ratio: float) -> Inspector:
    """`inspector` shown `support` with its bank built at `reference_coreset` = `ratio` (the model's setting is put
    back after: the query itself reads the ready bank)."""
    config = inspector.model.config
    kept, config.reference_coreset = config.reference_coreset, ratio
    try:
        inspector.set_support(support)
    finally:
        config.reference_coreset = kept
    return inspector


def synth_photos(path: str, split: str, shots: int, queries: int) -> tuple[list, list]:
    """The first category's first `shots` good photos as supports, and `queries` of its other photos, half good and
    half defective (alternating)."""
    from kensa_vl.train.data.synth import load_synth

    items = load_synth(path)[0][split]
    first = items[0]["category"]
    rows = {"good": [], "defective": []}
    for i, (category, label) in enumerate(zip(items["category"], items["label"], strict=True)):
        if category == first:
            rows[label].append(i)
    good, bad = rows["good"][shots:], rows["defective"]
    if len(good) < queries // 2 or len(bad) < queries - queries // 2 or len(rows["good"]) < shots:
        raise ValueError(
            f"category {first!r} of {path} ({split}) has {len(rows['good'])} good and {len(bad)} defective photos; "
            f"{shots} supports and {queries} queries need more"
        )
    chosen = [i for pair in zip(good, bad, strict=False) for i in pair][:queries]
    return [items[i]["image"] for i in rows["good"][:shots]], [items[i]["image"] for i in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="1,2,4,8")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None, help="a KensaSynth folder: its photos instead of noise")
    parser.add_argument("--split", default="validation", choices=STUDY_SPLITS)
    parser.add_argument("--coreset", type=float, default=None, help="also time a cached bank of this share of cells")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model:
        model, processor = load_pretrained(args.model)
    else:
        from kensa_vl.train.build import build_tiny

        model, processor = build_tiny()
    shots = [int(k) for k in args.shots.split(",")]
    if args.data:
        supports, queries = synth_photos(args.data, args.split, max(shots), args.queries)
    else:
        supports, queries = photos(max(shots), args.size), photos(args.queries, args.size, seed=1)
    rows = []
    for k in tqdm(shots, desc="shots"):
        support = [support_item(image) for image in supports[:k]]
        cached = Inspector(model, processor, max_new_tokens=0)
        shown = timed(lambda c=cached, s=support: c.set_support(s), repeats=5)  # the support set, encoded once
        recomputed = Inspector(model, processor, cache=False, max_new_tokens=0)
        recomputed.set_support(support)
        unchecked = Inspector(model, processor, max_new_tokens=0, check_examples=False)
        unchecked.set_support(support)
        runners = [judged(cached), judged(recomputed), floor(cached, queries), judged(unchecked)]
        if args.coreset is not None:
            runners.append(judged(with_coreset(Inspector(model, processor, max_new_tokens=0), support, args.coreset)))
        results = per_query(runners, queries)
        (fast, fast_median, a), (slow, slow_median, b), (alone, _, _), (bare, _, _) = results[:4]
        reduced = ()
        if args.coreset is not None:
            reduced = (results[4][0], max(abs(x - y) for x, y in zip(a, results[4][2], strict=True)))
        start = time.perf_counter()
        batched = cached.judge(queries, batch_size=args.batch)
        qps = len(queries) / (time.perf_counter() - start)
        others = b + [r.p_defective for r in batched]  # recomputed and batched, each against one-by-one cached
        diff = max(abs(x - y) for x, y in zip(a + a, others, strict=True))
        prefix = cached._prefix["input_ids"].shape[1]
        query_tokens = cached._query_inputs(queries[0])["input_ids"].shape[1] - prefix
        rows.append((k, prefix, query_tokens, shown, fast, fast_median, alone, bare, slow, slow_median, qps, diff,
                     reduced))  # fmt: skip
    source = f"KensaSynth {args.split} photos" if args.data else f"{args.size} px noise photos"
    print(f"{machine()}; {source}, {args.queries} queries, scores only")
    print(
        "| k | prefix tokens | query tokens | set_support ms | cached ms/query: mean (median) "
        "| query alone (floor) ms | cached / floor | cached without the check ms/query | cached / without "
        "| recomputed ms/query: mean (median) "
        "| speed-up (means) "
        "| queries/s one by one (cached) "
        f"| queries/s at batch {args.batch} (cached) | max ΔP(defective) |"
        + (f" cached, coreset {args.coreset} ms/query | its max ΔP(defective) |" if args.coreset else "")
    )
    print("|---" * (16 if args.coreset else 14) + "|")
    for k, prefix, query_tokens, shown, fast, fast_median, alone, bare, slow, slow_median, qps, diff, reduced in rows:
        print(
            f"| {k} | {prefix} | {query_tokens} | {shown * 1e3:.0f} | {fast * 1e3:.1f} ({fast_median * 1e3:.1f}) "
            f"| {alone * 1e3:.1f} | {fast / alone:.2f}× | {bare * 1e3:.1f} | {fast / bare:.2f}× "
            f"| {slow * 1e3:.1f} ({slow_median * 1e3:.1f}) "
            f"| {slow / fast:.1f}× | {1 / fast:.0f} "
            f"| {qps:.0f} | {diff:.1e} |" + (f" {reduced[0] * 1e3:.1f} | {reduced[1]:.3f} |" if reduced else "")
        )


if __name__ == "__main__":
    main()
