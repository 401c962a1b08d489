"""Which rule turns the reference comparison's cell map into a box: hit rates (IoU >= 0.5) on defects covering at
least 1% of the image, every defective photo of a split, k good supports, 3 seeds (docs/reference-comparison.md).

    python benchmarks/locate_rules.py outputs/main/model --data outputs/kensa-synth-224 [--split validation]

The kept rule is `KensaVLModel.locate`; the others are what it was chosen against: on the DCT cells alone, each
encoder alone, the DCT cells with one other, every encoder against its own level (the largest), the encoder that
decides the verdict, the DCT cells unless only another encoder flags the photo (then the deciding encoder's map, or
every encoder's: the kept rule since 2026-12-05, `finder`), and their log-distances averaged and measured against
their levels' mean (the rule before each encoder was measured against its own level). The rules on the encoders'
maps (from "dct cells alone" on) join the nearby groups of cells about as far as the peak (`peak_region_box`); on the
kept map the peak's connected cells alone (the region before) are a row too. Encoders with an `own_window` are
compared with the photo itself too, as in the model. `--sweep` adds the region's margin above the level and range
below the peak on every encoder's map, and the joined groups' reach and gap on the kept map. A photo counts whether
or not the verdict would find it (no verdict is computed here).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from benchmarks import STUDY_SPLITS
from kensa_vl.eval.evaluate import control_support, support_for
from kensa_vl.eval.inspector import Inspector, load_pretrained
from kensa_vl.eval.metrics import LARGE_AREA, box_iou
from kensa_vl.modeling.comparison_kensa_vl import VERDICT_MARGIN, image_scores, over_levels
from kensa_vl.modeling.locate_kensa_vl import (
    LOCATE_MARGIN,
    LOCATE_RANGE,
    LOG_FLOOR,
    distance_map,
    peak_region_box,
    stitch_tiles,
)
from kensa_vl.modeling.search_kensa_vl import nearest_distances
from kensa_vl.train.data.synth import load_synth


def _box(region: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(region)
    h, w = region.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


def _peak_region(cells: np.ndarray, threshold: float, dilate: int = 0) -> list[float]:
    peak = np.unravel_index(cells.argmax(), cells.shape)
    mask = cells > threshold
    mask[peak] = True
    bridged = ndimage.binary_dilation(mask, np.ones((3, 3)), iterations=dilate) if dilate else mask
    labels, _ = ndimage.label(bridged, np.ones((3, 3)))
    return _box((labels == labels[peak]) & mask)


def rules(raw: torch.Tensor, averaged: torch.Tensor, level: float) -> dict[str, list[float]]:
    m, a = raw.numpy(), averaged.numpy()
    return {
        "box around all cells above the level": _box(m > level) if (m > level).any() else _peak_region(m, level),
        "the same on the 3x3-averaged map": _box(a > level) if (a > level).any() else _peak_region(a, level),
        "peak's region, above the level": _peak_region(m, level),
        f"peak's region, above level + {LOCATE_MARGIN}": _peak_region(m, level + LOCATE_MARGIN),
        "the same, regions bridged by a 1-cell dilation": _peak_region(m, level + LOCATE_MARGIN, dilate=1),
    }


def encoder_rules(
    near: dict, rows: int, cols: int, levels: torch.Tensor, comparison, sweep: bool = False
) -> dict[str, list[float]]:
    """With more than one compared encoder, each rule's region above its level + LOCATE_MARGIN and within
    LOCATE_RANGE of the peak: each encoder alone; every encoder against its own level, the largest (`distance_map`;
    with `sweep`, other margins and ranges); the first encoder with each other one; the encoder with the largest
    excess on its map alone; the encoder that decides the verdict (the largest excess of its score) alone; the first
    encoder unless it stays below VERDICT_MARGIN where another does not; the encoders' log-distances averaged, against
    their levels' mean."""
    names, excess = comparison.encoders, comparison.excess

    def box(cells: torch.Tensor) -> list[float]:
        return peak_region_box(cells, max(LOCATE_MARGIN, cells.max().item() - LOCATE_RANGE))[0]

    own = [distance_map([near[n]], rows, cols, levels[e : e + 1], excess[e : e + 1]) for e, n in enumerate(names)]
    out = {f"{n} cells alone": box(cells) for n, cells in zip(names, own, strict=True)}
    every = distance_map([near[n] for n in names], rows, cols, levels, excess)
    out["every encoder against its own level, the largest"] = box(every)
    for margin, reach in [(m, r) for m in (-0.1, 0.0, 0.05, 0.1, 0.2) for r in (1.0, 1.5, 2.0, 3.0)] if sweep else []:
        threshold = max(margin, every.max().item() - reach)
        out[f"the same, above level + {margin}, within {reach} of the peak"] = peak_region_box(every, threshold)[0]
    for e, n in list(enumerate(names))[1:] if len(names) > 2 else []:
        pick = [0, e]
        out[f"{names[0]} and {n} against their own levels, the largest"] = box(
            distance_map([near[names[i]] for i in pick], rows, cols, levels[pick], [excess[i] for i in pick])
        )
    out["the encoder with the largest excess alone"] = box(max(own, key=lambda cells: cells.max().item()))
    # the verdict's own excess per encoder (`KensaVLReferenceComparison.forward`): the largest 3x3-averaged
    # log-distance over the grid tiles, `scale * (score - level) - margin`
    relative = over_levels(image_scores([near[n] for n in names], rows * cols, comparison.token_side), levels, excess)
    decider = int(relative.argmax())
    out["the encoder that decides the verdict alone"] = box(own[decider])
    flagged = relative[0] > VERDICT_MARGIN or relative.max() <= VERDICT_MARGIN
    chosen = own[0] if flagged else own[decider]
    out[f"{names[0]} cells when they flag the photo, else the deciding encoder's"] = box(chosen)
    kept = own[0] if flagged else every
    out[f"{names[0]} cells when they flag the photo, else every encoder's"] = box(kept)
    before = max(LOCATE_MARGIN, kept.max().item() - 2.0)  # the region before 2026-12-05: no groups joined, range 2
    out["the same, the peak's connected cells within 2 of it (the region before)"] = peak_region_box(
        kept, before, gap=0
    )[0]
    variants = [(r, g, j) for r in (1.0, 1.5, 2.0) for g in (0, 0.05, 0.1, 0.15) for j in (0.25, 0.5, 0.75)]
    for reach, gap, join in [(r, g, j) for r, g, j in variants if g or j == 0.5] if sweep else []:
        region = peak_region_box(kept, max(LOCATE_MARGIN, kept.max().item() - reach), join, gap)[0]
        out[f"the same, within {reach} of the peak, groups within {join} of it joined across {gap}"] = region
    maps = [stitch_tiles(near[n], rows, cols).clamp_min(LOG_FLOOR).log()[None, None] for n in names]
    size = max(m.shape[-2:] for m in maps)
    mean = torch.cat([F.interpolate(m, size) for m in maps]).mean(0)[0]
    out["the encoders' mean log-distance, against their levels' mean"] = box(mean - levels.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="validation", choices=STUDY_SPLITS)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="every encoder's map: margins and ranges")
    args = parser.parse_args()
    model, processor = load_pretrained(args.model)
    items = load_synth(args.data)[0][args.split]
    rows = {}
    for i, (category, label) in enumerate(zip(items["category"], items["label"], strict=True)):
        rows.setdefault(category, {"good": [], "defective": []})[label].append(i)
    inspector, hits = Inspector(model, processor, max_new_tokens=0), {}
    for seed in tqdm(range(args.seeds), desc="seeds"):
        for category in sorted(rows):
            good, bad = support_for(rows, category, args.shots, 0, seed)
            inspector.set_support(control_support(items, good, bad, None, seed))
            references, levels = inspector._bank.cells, inspector._bank.levels
            encoders = model.model.reference_comparison.encoders
            level = levels[encoders.index("dct")].item()
            for i in rows[category]["defective"]:
                item = items[i]
                if item["area"] < LARGE_AREA:
                    continue
                inputs = processor.image_processor([item["image"].convert("RGB")], return_tensors="pt")
                pixels, grid = inputs["pixel_values"], inputs["image_grid"]
                rows_, cols, _ = grid[0].tolist()
                with torch.no_grad():
                    grids = model.model.image_grids(pixels, encoders)
                    features = model.model.reference_comparison.features(grids)
                    near = [nearest_distances(features[n], references[n].float()) for n in encoders]
                    comparison = model.model.reference_comparison  # an encoder's own window, as `locate` has it
                    near = dict(zip(encoders, comparison.with_own(features, near, (rows_, cols)), strict=True))
                    pooled = F.avg_pool2d(near["dct"][:, None], 3, 1, 1, count_include_pad=False)[:, 0]
                maps = (near["dct"], pooled)
                raw, averaged = (stitch_tiles(d, rows_, cols).clamp_min(LOG_FLOOR).log() for d in maps)
                boxes = rules(raw, averaged, level)
                if len(encoders) > 1:
                    boxes.update(encoder_rules(near, rows_, cols, levels, comparison, args.sweep))
                boxes["kept (`locate`)"] = model.model.locate(pixels, grid, inspector._bank)[0]
                w, h = item["image"].size
                for name, (x0, y0, x1, y1) in boxes.items():
                    box = [x0 * w, y0 * h, x1 * w, y1 * h]
                    hits.setdefault(name, []).append(any(box_iou(box, t) >= 0.5 for t in item["boxes"]))
    print(f"{args.split}, k = {args.shots}, {args.seeds} seeds, {len(next(iter(hits.values())))} defects >= 1%")
    print("| rule | hit rate, defects >= 1% |\n|---|---|")
    for name, values in hits.items():
        print(f"| {name} | {np.mean(values):.2f} |")


if __name__ == "__main__":
    main()
