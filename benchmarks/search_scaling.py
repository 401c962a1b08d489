"""The comparison's nearest-cell search against the number of support photos: exact and approximate
(`inverted_file_similarity`) side by side in one run, their growth exponents, a plot, and what the approximation costs
in accuracy on the validation categories; with `--coreset R`, also the exact search on a bank of a greedy k-center
coreset of R of each support's cells (`reference_coreset`) and what building it costs.

    python -m benchmarks.search_scaling --model outputs/main/model --data outputs/kensa-synth-224 \
        [--supports 1,4,8,16] [--probes 2,4,8] [--coreset 0.25] [--shots 4] [--seeds 3] \
        [--plot docs/search_scaling.png]

Cost: one query photo of the validation split against 1-16 good photos (each in every reference view of the model),
the search alone (`nearest_distances` on the model's compared cells), median of 5; the approximate search with its
lists built per search, and with lists built once (a cached support set's). Accuracy: `evaluate` on the
validation split at `--shots`, exact search against the approximate one at each `--probes` (every bank searched
approximately: `exact_search_cells` = 0 and no minimum query share), same supports and queries, scores only. Reads
only the validation split.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from kensa_vl.eval.evaluate import evaluate
from kensa_vl.eval.inspector import load_pretrained
from kensa_vl.eval.measure import machine, timed
from kensa_vl.modeling.search_kensa_vl import InvertedLists, coreset, nearest_distances
from kensa_vl.train.data.synth import load_synth


def growth(sizes: list[int], times: list[float]) -> float:
    """The exponent b of time ~ supports^b, a least-squares line through the log-log points."""
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


@torch.no_grad()
def cost(model, processor, photos, supports: list[int], probes: list[int], ratio: float | None = None) -> dict:
    """Seconds of the search for one query against each support count: {"exact": [...], probes: [...]}; with
    `ratio`, also "coreset" (the exact search on each support's coreset) and "coreset build" (making them)."""
    good = [photos[i]["image"] for i, label in enumerate(photos["label"]) if label == "good"]
    if len(good) < max(supports) + 1:
        raise ValueError(f"the split has {len(good)} good photos; {max(supports)} supports and a query need more")
    batch = processor.image_processor(good[: max(supports) + 1], return_tensors="pt")
    name = model.config.reference_encoder_names()[0]
    tiles = batch["image_grid"][:, 2].tolist()
    starts = np.cumsum([0, *tiles])
    cells = model.model.reference_comparison.features(model.model.image_grids(batch["pixel_values"], [name]))[name]
    query = cells[starts[-2] : starts[-1]]
    out = {
        "bank cells": [],
        "exact": [],
        **{p: [] for p in probes},
        "kept": [],
        "coreset": [],
        "coreset, lists built once": [],
        "coreset build": [],
    }
    kept = model.config.search_probes
    for count in tqdm(supports, desc="supports"):
        pixels = batch["pixel_values"][: starts[count]]
        bank = model.model.reference_cells(pixels, {name: cells[: starts[count]]})[name]
        out["bank cells"].append(len(bank))
        out["exact"].append(timed(lambda b=bank: nearest_distances(query, b), 5))
        for p in probes:
            out[p].append(timed(lambda b=bank, p=p: nearest_distances(query, b, probes=p), 5))
        lists = InvertedLists.build(bank)  # a cached support set's, built once (`ReferenceBank.inverted_lists`)
        out["kept"].append(timed(lambda b=bank, s=lists: nearest_distances(query, b, probes=kept, lists=s), 5))
        if ratio is not None:
            own = [model.model.reference_cells(batch["pixel_values"][a:b], {name: cells[a:b]})[name]
                   for a, b in zip(starts[:count], starts[1 : count + 1], strict=True)]  # fmt: skip
            out["coreset build"].append(timed(lambda o=own: [coreset(c, ratio) for c in o], 3))
            reduced = torch.cat([coreset(c, ratio) for c in own])
            out["coreset"].append(timed(lambda b=reduced: nearest_distances(query, b), 5))
            lists = InvertedLists.build(reduced)  # both: the coreset searched through lists built once
            search = lambda b=reduced, s=lists: nearest_distances(query, b, probes=kept, lists=s)  # noqa: E731
            out["coreset, lists built once"].append(timed(search, 5))
    return out


def accuracy(model, processor, photos, shots: int, seeds: int, probes: list[int], ratio: float | None = None) -> dict:
    """Validation metrics at `shots`: {"exact": overall, probes: overall, "coreset": overall (exact search)}."""
    out = {}
    config = model.config
    module = sys.modules[type(model.model.reference_comparison).__module__]  # the model folder's own code
    saved = config.exact_search_cells, config.search_probes, getattr(module, "APPROXIMATE_MIN_SHARE", None)
    share = config.reference_coreset
    try:
        for setting in ["exact", *probes, *(["coreset"] if ratio is not None else [])]:
            exact = setting in ("exact", "coreset")
            config.exact_search_cells, config.search_probes = (saved[0], 0) if exact else (0, setting)
            config.reference_coreset = ratio if setting == "coreset" else share
            module.APPROXIMATE_MIN_SHARE = 10**9  # every bank, whatever the query's size
            result = evaluate(model, processor, photos, shots=(shots,), seeds=seeds, controls=(), generate=False)
            out[setting] = result["shots"][shots]["overall"]
    finally:
        config.exact_search_cells, config.search_probes, module.APPROXIMATE_MIN_SHARE = saved
        config.reference_coreset = share
    return out


def label(key, ratio: float | None) -> str:
    """A row's name: "exact", "approximate, P probes", the lists built once, or the exact search on a coreset."""
    names = {"exact": "exact", "kept": "approximate, lists built once", "coreset": f"exact, {ratio} coreset",
             "coreset, lists built once": f"{ratio} coreset, approximate, lists built once"}  # fmt: skip
    return names.get(key, f"approximate, {key} probes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--supports", default="1,4,8,16")
    parser.add_argument("--probes", default="2,4,8")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--coreset", type=float, default=None, help="also a coreset of this share of each support")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--no-accuracy", action="store_true", help="the cost only")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = load_pretrained(args.model)
    photos = load_synth(args.data)[0]["validation"]
    supports, probes = [int(s) for s in args.supports.split(",")], [int(p) for p in args.probes.split(",")]
    costs = cost(model.eval(), processor, photos, supports, probes, args.coreset)
    print(f"{machine()}; one query photo, views {model.config.reference_views}")
    kept = f"{model.config.search_probes} probes, lists built once ms"
    reduced = ["coreset", "coreset, lists built once", "coreset build"] if args.coreset is not None else []
    keys = ["exact", *probes, "kept", *reduced]
    extra = (f" | exact on a {args.coreset} coreset ms | the coreset, lists built once ms | building the coresets ms"
             if args.coreset is not None else "")  # fmt: skip
    print(
        "| supports | bank cells | exact ms | " + " | ".join(f"{p} probes ms" for p in probes) + f" | {kept}{extra} |"
    )
    print("|---|---|---|" + "---|" * (len(keys) - 1))
    for i, count in enumerate(supports):
        row = [costs[key][i] for key in keys]
        print(f"| {count} | {costs['bank cells'][i]:,} | " + " | ".join(f"{t * 1e3:.1f}" for t in row) + " |")
    exponents = {key: growth(supports, costs[key]) for key in keys if key != "coreset build"}
    print("growth exponent (time ~ supports^b): " + ", ".join(f"{k}: {b:.2f}" for k, b in exponents.items()))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in exponents:
            shown = f"{label(key, args.coreset)} (b = {exponents[key]:.2f})"
            ax.loglog(supports, [t * 1e3 for t in costs[key]], "o-", label=shown)
        ax.set_xlabel("support photos (every view in the bank)")
        ax.set_ylabel("search ms per query photo")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    if args.no_accuracy:
        return
    scores = accuracy(model, processor, photos, args.shots, args.seeds, probes, args.coreset)
    print(f"validation, k = {args.shots}, {args.seeds} seeds, scores only")
    print("| search | balanced accuracy | image AUROC | pixel AUROC |")
    print("|---|---|---|---|")
    for key, overall in scores.items():
        cells = [overall[m]["mean"] for m in ("balanced_accuracy", "auroc", "pixel_auroc")]
        print(f"| {label(key, args.coreset)} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
