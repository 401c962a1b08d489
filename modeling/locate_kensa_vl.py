"""Where an image differs from its references: its heatmap and its defect's box.

From an image's nearest-reference distances (the reference comparison's, one cell map per compared encoder),
`distance_map` stitches the whole image's map, each encoder against its own level, and `locate_box` boxes the
region that grows from its peak (`peak_region_box`). The reference comparison (`comparison_kensa_vl.py`), the
Inspector and the kNN baseline all box this way.

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# `locate_box`: a cell belongs to the defect when its log-distance is LOCATE_MARGIN above the supports' level and
# within LOCATE_RANGE of the peak's (at least e^-1.5 = 22% of its distance: near-identical photos give tiny, noisy
# distances; 1.5 rather than 2 since the region joins the pieces of a defect, chosen on both validation splits and
# KensaSynth's training categories, docs/reference-comparison.md)
LOCATE_MARGIN, LOCATE_RANGE = 0.05, 1.5
# `peak_region_box`: a region of cells above the threshold whose own peak is within LOCATE_JOIN of the map's peak
# joins the peak's region when it comes within LOCATE_GAP of the map's longer side of it (3 cells of a 224 px photo's
# 32): a cut-paste or a shuffled block differs at its seams, which break into pieces (docs/reference-comparison.md)
LOCATE_JOIN, LOCATE_GAP = 0.5, 0.1
# the smallest cosine distance whose log is read: float32 resolves 1 - cos to about 1e-7, and the band-pass cells'
# distances lie at 1e-5-1e-3 (a floor of 1e-4 tied most good photos' scores and cost that encoder 0.05 image AUROC on
# the real-surface validation set, docs/real-surfaces.md)
LOG_FLOOR = 1e-6


def distance_map(
    distances: list[torch.Tensor], rows: int, cols: int, levels=None, excess: list | None = None
) -> torch.Tensor:
    """One image's heatmap: where it differs from its references. From its nearest-reference distances, one
    `(tiles, g, g)` map per compared encoder (grid tiles first, as the processor cuts them): each stitched over the
    tile grid as the log of the cosine distance (at least LOG_FLOOR), measured against that encoder's level as the
    verdict measures its score, `scale * (log-distance - level) - margin` (`excess`: per encoder `(scale, margin)`, 1
    and 0 when not given; `levels`: per encoder or one for all; without, each map's own median), brought to the
    finest encoder's grid; the largest over the encoders: `(rows * g, cols * g)` over the whole image (the tile grid
    covers it, stretched to the grid's shape). Encoders' log-distances lie on different scales (the band-pass cells'
    are some 4 lower than the DCT cells'), so a cell is far when it is far for one encoder by that encoder's
    measure."""
    maps = [stitch_tiles(d, rows, cols).float().clamp_min(LOG_FLOOR).log() for d in distances]
    if levels is None:
        levels = [m.median() for m in maps]
    levels = torch.as_tensor(levels, dtype=torch.float32).expand(len(maps)).tolist()
    excess = excess or [(1.0, 0.0)] * len(maps)
    side = max(m.shape[0] for m in maps) // rows
    relative = [(m - level) * scale - margin for m, level, (scale, margin) in zip(maps, levels, excess, strict=True)]
    return torch.stack([F.interpolate(m[None, None], (rows * side, cols * side))[0, 0] for m in relative]).amax(0)


def locate_box(distances: list[torch.Tensor], rows: int, cols: int, levels=None, excess: list | None = None):
    """The defect's box from one image's nearest-reference distances (`distance_map` against `levels`): the region
    grows from the map's peak through cells LOCATE_MARGIN above their level (without levels, above the map's 95th
    percentile) and within `LOCATE_RANGE` of the peak, and joins nearby groups of such cells about as far as the peak
    (`peak_region_box`). Returns `(box, peak)`, `peak` the largest cell's excess over its level."""
    return map_box(distance_map(distances, rows, cols, levels, excess), levels is not None)


def map_box(cells: torch.Tensor, leveled: bool) -> tuple[list[float], float]:
    """`locate_box` on a `distance_map` already made (`cells`, against levels when `leveled`)."""
    threshold = LOCATE_MARGIN if leveled else cells.float().quantile(0.95).item()
    return peak_region_box(cells, max(threshold, cells.max().item() - LOCATE_RANGE))


def stitch_tiles(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An image's grid tiles' cell maps `(rows * cols, g, g, ...)` (row-major, as the processor cuts them; any tiles
    after them, a thumbnail, left out) -> the map of the whole image `(rows * g, cols * g, ...)`."""
    g, rest = cells.shape[1], cells.shape[3:]
    return cells[: rows * cols].reshape(rows, cols, g, g, *rest).transpose(1, 2).reshape(rows * g, cols * g, *rest)


def peak_region_box(
    cells: torch.Tensor, threshold: float, join: float = LOCATE_JOIN, gap: float = LOCATE_GAP
) -> tuple[list[float], float]:
    """The box around the region of cells above `threshold` that holds the map's largest cell, as `[x0, y0, x1, y1]`
    fractions of the map's width and height, with that cell's value. The region is the peak's connected cells
    (8-neighbourhood) and every other connected group above the threshold whose largest cell is within `join` of the
    peak's and which comes within `gap` of the map's longer side of the region (joined one after another; none with a
    `gap` of 0). When no cell passes the threshold, the box of the largest cell alone."""
    h, w = cells.shape
    at = cells.argmax()
    peak = cells.view(-1)[at].item()
    above = cells > threshold
    groups = connected_groups(above)
    top = torch.full((h * w + 1,), -math.inf, device=cells.device)
    top = top.scatter_reduce(0, groups.flatten() + 1, cells.flatten().float(), "amax")[1:]  # each group's peak
    strong = above & (top[groups.clamp_min(0)] >= peak - join)
    region = above & (groups == groups.view(-1)[at])
    region.view(-1)[at] = True  # the peak itself, also when no cell passes the threshold
    reach = max(1, round(gap * max(h, w)))
    while gap:
        near = region[None, None].float()  # the square around the region, as two 1-D max pools (cheaper)
        near = F.max_pool2d(F.max_pool2d(near, (2 * reach + 1, 1), 1, (reach, 0)), (1, 2 * reach + 1), 1, (0, reach))
        near = near[0, 0].bool()
        joining = groups[near & strong & ~region].unique()
        if not len(joining):
            break
        region |= torch.isin(groups, joining)
    ys, xs = region.nonzero(as_tuple=True)
    box = [xs.min().item() / w, ys.min().item() / h, (xs.max().item() + 1) / w, (ys.max().item() + 1) / h]
    return box, peak


def connected_groups(mask: torch.Tensor) -> torch.Tensor:
    """Each cell's connected group (8-neighbourhood) of a boolean map `(h, w)`: a label per cell, the same within a
    group, -1 outside the mask (the largest flat index in the group, spread by repeated 3x3 max pooling)."""
    labels = torch.where(mask, torch.arange(mask.numel(), device=mask.device).view(mask.shape), -1).float()
    while True:
        spread = torch.where(mask, F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0], -1.0)
        if torch.equal(spread, labels):
            return labels.long()
        labels = spread
