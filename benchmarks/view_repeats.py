"""What the band-pass cells' reference views cost: the cached Inspector with the support bank as built now (a
view-invariant encoder's cells once) against the bank before 7da9d8a (its cells again in every view, where a view
only moves them), side by side in one run, taking turns per query (`per_query`).

    python -m benchmarks.view_repeats --model outputs/main/model --data outputs/kensa-synth-224-surfaces [--shots 4,8]

Needs a model that compares a view-invariant encoder (the main job's: DCT and band-pass cells) and has reference
views. KensaSynth photos of the split's first category (`synth_photos`), scores only.
"""

from __future__ import annotations

import argparse

from benchmarks import STUDY_SPLITS
from benchmarks.inspect_latency import judged, per_query, synth_photos
from kensa_vl.eval.inspector import Inspector, load_pretrained, support_item
from kensa_vl.eval.measure import machine, timed


def inspectors(model, processor, support: list) -> tuple[Inspector, Inspector, tuple[float, float], int]:
    """(the bank as built now, the bank with repeated views), each one's `set_support` seconds (median of 3), and
    how many cells the repeats add."""
    invariant = [t for t in model.model.vision_towers.values() if getattr(t, "view_invariant", False)]
    if not invariant or not model.config.reference_views:
        raise ValueError("the model compares no view-invariant encoder, or has no reference views: nothing to compare")
    now, before = Inspector(model, processor, max_new_tokens=0), Inspector(model, processor, max_new_tokens=0)
    shown_now = timed(lambda: now.set_support(support), repeats=3)
    for tower in invariant:
        tower.view_invariant = False
    try:
        shown_before = timed(lambda: before.set_support(support), repeats=3)
    finally:
        for tower in invariant:
            del tower.view_invariant  # the class's own again
    added = sum(len(before._bank.cells[n]) - len(now._bank.cells[n]) for n in now._bank.cells)
    return now, before, (shown_now, shown_before), added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="validation", choices=STUDY_SPLITS)
    parser.add_argument("--shots", default="4,8")
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    model, processor = load_pretrained(args.model)
    shots = [int(k) for k in args.shots.split(",")]
    supports, queries = synth_photos(args.data, args.split, max(shots), args.queries)
    print(f"{machine()}; {args.data} ({args.split}), {args.queries} queries, scores only")
    print("| k | cells the repeats add | set_support ms: now / before | ms per query: now / before | now / before "
          "| max ΔP(defective) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for k in shots:
        now, before, (shown_now, shown_before), added = inspectors(
            model, processor, [support_item(s) for s in supports[:k]]
        )
        (fast, _, a), (slow, _, b) = per_query([judged(now), judged(before)], queries)
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        print(f"| {k} | {added:,} | {shown_now * 1e3:.0f} / {shown_before * 1e3:.0f} | {fast * 1e3:.1f} / "
              f"{slow * 1e3:.1f} | {fast / slow:.2f} | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
