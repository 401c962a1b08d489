"""KensaVL's reference comparison: PatchCore inside the model, with a learned anomaly map.

An image with references (the earlier images of its prompt, or a cached support set given as a `ReferenceBank`) is
compared cell by cell with them on the compared encoders' own patch grids (`nearest_distances`). The per-token
evidence (`KensaVLReferenceComparison.distances`) becomes an anomaly logit per visual token, an embedding added to
each visual token, and a summary embedding added to the image's `</img>` token and the text after it
(`add_summaries`). The same distances give a defective image's box (`locate_box`, `locate_kensa_vl.py`).
`compare_prompt` runs the whole prompt; its result is a `PromptComparison`.

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_kensa_vl import BANDPASS_MODEL_TYPE, KensaVLConfig
from .demos_kensa_vl import (
    Demo,
    DemoPointer,
    Pointer,
    copy_terms,
    cut_tiles,
    farthest_cells,
    label_box,
    located_tokens,
    match_similarity,
    read_label,
    region_descriptor,
    within_box,
)
from .grading_kensa_vl import grade_closeness, image_statistics
from .locate_kensa_vl import LOG_FLOOR, connected_groups, distance_map, locate_box, stitch_tiles
from .search_kensa_vl import InvertedLists, PairCache, approximate_pays, nearest_distances

# the verdict logit's start (`KensaVLReferenceComparison.verdict`): VERDICT_SLOPE * (relative score - VERDICT_MARGIN),
# defective when a compared encoder's kNN log-score lies VERDICT_MARGIN above the supports' own level for it. Read off
# KensaSynth's validation categories (DCT cells, 4 shots: good photos at -0.17 +- 0.18, defective at +0.61 +- 0.41);
# training moves both.
VERDICT_SLOPE, VERDICT_MARGIN = 8.0, 0.2
# `own_nearest`: the most cells of an image's own map a cell is compared with (a larger map is sampled on a coarser
# lattice, every `stride`-th cell each way)
OWN_BANK_CELLS = 1024
# `product_mask` (an encoder entry's `masks_background`, AnomalyDINO's masking for objects on a background): an
# image's cells split in two along their first principal component; the side off the border is the product, grown by
# MASK_GROW cells. Used only where the border is background (at least MASK_BORDER of its cells on the other side)
# and the product covers MASK_COVER of the image: a texture or a product that fills the frame is not masked.
MASK_BORDER, MASK_COVER, MASK_GROW = 0.9, (0.05, 0.85), 1


@dataclass
class ReferenceBank:
    """Reference images as a later image compares with them: what a support set is cached as.

    `cells`: per compared encoder, the references' L2-normalised cells, every reference view included, `(M, C)`.
    `scores`: each reference image's own kNN score per compared encoder against the references before it, `(images,
    encoders)` (the first image has none, so a bank of one image has an empty tensor). Their median per encoder is
    `levels`: how far good photos of this product lie from each other, what a query's scores and heatmap
    (`distance_map`) are measured against. `demos`: the defective
    examples (`Demo`, with their defects), which are not in `cells`; `graded`: the graded examples (`Demo`, with their
    whole-image statistics), which are."""

    cells: dict[str, torch.Tensor]
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    demos: list[Demo] = field(default_factory=list)
    graded: list[Demo] = field(default_factory=list)
    # per encoder, the cells' `InvertedLists`, built on first use and kept for every later query
    lists: dict = field(default_factory=dict, repr=False, compare=False)

    def inverted_lists(self, name: str) -> InvertedLists:
        if name not in self.lists:
            self.lists[name] = InvertedLists.build(self.cells[name].float())
        return self.lists[name]

    @property
    def levels(self) -> torch.Tensor | None:
        return self.scores.float().median(0).values if len(self.scores) else None

    def to(self, device) -> ReferenceBank:
        cells = {n: c.to(device) for n, c in self.cells.items()}
        return ReferenceBank(cells, self.scores.to(device), [d.to(device) for d in self.demos],
                             [d.to(device) for d in self.graded])  # fmt: skip


@dataclass
class Summary:
    """A compared image's summary embedding `(D,)`, added from token `start` (its `</img>`) of batch row `row`."""

    row: int
    start: int
    embedding: torch.Tensor
    verdict: torch.Tensor | None = None  # the image's verdict logit, a scalar
    copy: Pointer | None = None  # what an answer about the image may copy (its `start` set by `pointers`)


@dataclass
class PromptComparison:
    """What `compare_prompt` finds for every image of a batch of prompts.

    `token_embeddings` `(N, tokens_per_tile, D)`: added to the visual tokens (zero for images without references).
    `anomaly_map` `(N, token positions per tile)`: logits, NaN for images without references.
    `summaries`: one per compared image whose `</img>` is in the input.
    `image_scores` `(num_images, encoders)`: kNN score per image and compared encoder, NaN without references.
    `distances`: per image, the compared encoders' `nearest_distances` maps (None without references).
    `banks`: with `keep`, per sample, the bank a later image compares with (None for a sample without images)."""

    token_embeddings: torch.Tensor
    anomaly_map: torch.Tensor
    summaries: list[Summary]
    image_scores: torch.Tensor
    distances: tuple
    banks: tuple | None = None


APPROXIMATE_MIN_SHARE = 8  # `KensaVLReferenceComparison.nearest`: a smaller query searches exactly


def pooled_distances(nearest: torch.Tensor, token_side: int) -> torch.Tensor:
    """`nearest_distances` `(n, g, g)` averaged over the 3x3 neighbourhood and max-pooled onto a `token_side` grid:
    `(n, token_side^2)`."""
    d = F.avg_pool2d(nearest.unsqueeze(1), 3, 1, 1, count_include_pad=False)
    return F.adaptive_max_pool2d(d, token_side).flatten(1)


def image_scores(distances: list[torch.Tensor], tiles: int, token_side: int) -> torch.Tensor:
    """Each compared encoder's kNN score of one image from its `nearest_distances` (`(n, g, g)` each): the largest
    3x3-averaged log-distance over its first `tiles` tiles (its grid tiles), what the verdict reads: `(encoders,)`."""
    pooled = [pooled_distances(d[:tiles].float(), token_side).amax() for d in distances]
    return torch.stack(pooled).clamp_min(LOG_FLOOR).log()


def over_levels(scores: torch.Tensor, levels: torch.Tensor, excess) -> torch.Tensor:
    """Each compared encoder's log score `(encoders,)` over its level as the verdict takes it, `scale * (score -
    level) - margin` (`excess`: per encoder `(scale, margin)`, the entries' `verdict_scale` and `verdict_margin`), in
    float32: above VERDICT_MARGIN, that encoder alone calls the image defective."""
    scale, margin = torch.tensor(excess, dtype=torch.float32, device=scores.device).unbind(-1)
    return (scores.float() - levels.to(scores.device, torch.float32)) * scale - margin


def patch_distances(
    query: torch.Tensor, bank: torch.Tensor, token_side: int, chunk: int | None = None
) -> torch.Tensor:
    """`pooled_distances` of `query`'s cells against `bank`: `(n, token_side^2)`."""
    return pooled_distances(nearest_distances(query, bank, chunk), token_side)


def own_nearest(cells: torch.Tensor, rows: int, cols: int, window: float, chunk: int = 2**22) -> torch.Tensor:
    """Each grid cell's cosine distance to the nearest cell of the same image outside the square around it of half
    side `window` times the image's longer side (MuSc's zero-shot idea: a surface is its own reference; a defect
    smaller than the window finds no look-alike elsewhere in the photo, a lighting or texture change of the whole
    photo does). `cells` `(n, g, g, C)` unit, the image's tiles (grid tiles first, row-major, as the processor cuts
    them); returns `(rows * cols, g, g)` for the grid tiles. The candidates are every cell up to OWN_BANK_CELLS,
    else a coarser lattice of them. A cell's candidates are the lattice rows outside its window's rows (their
    row maxima) and, in its window's rows, the columns outside it: no per-pair mask."""
    surface = stitch_tiles(cells, rows, cols)  # (H, W, C)
    height, width = surface.shape[:2]
    radius = max(1, round(window * max(height, width)))
    stride = max(1, math.ceil(math.sqrt(height * width / OWN_BANK_CELLS)))
    lattice = surface[::stride, ::stride]  # (Hb, Wb, C)
    lattice_y = torch.arange(0, height, stride, device=cells.device)
    lattice_x = torch.arange(0, width, stride, device=cells.device)
    beside = (torch.arange(width, device=cells.device)[:, None] - lattice_x).abs() < radius  # (W, Wb)
    best, step = [], max(1, chunk // (width * lattice_y.numel() * lattice_x.numel()))
    for top in range(0, height, step):
        ys = torch.arange(top, min(top + step, height), device=cells.device)
        similarity = torch.einsum("ywc,vuc->ywvu", surface[ys], lattice)
        within = ((ys[:, None] - lattice_y).abs() < radius)[:, None, :]  # (R, 1, Hb): rows in the window's band
        outside = similarity.amax(-1).masked_fill(within, -1.0).amax(-1)
        band = similarity.masked_fill(~within[..., None], -1.0).amax(2).masked_fill(beside, -1.0).amax(-1)
        best.append(torch.maximum(outside, band))
    return cut_tiles((1 - torch.cat(best)).clamp_min(0), rows, cols)


def product_mask(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """Where one image shows the product rather than its background, from one encoder's cells of its grid tiles
    `(rows * cols, g, g, C)` (any tiles after them, a thumbnail, left out): `(rows * g, cols * g)` bool, True on
    the product; None where the image shows no background (MASK_BORDER, MASK_COVER). The cells' projections on
    their first principal component are split in two by iterated means (the threshold halfway between the two
    sides' means), which holds for a small part as for a large one; the product is the largest connected piece of
    its side (a speck of dust on the background is another)."""
    grid = stitch_tiles(cells, rows, cols).float()
    h, w, channels = grid.shape
    flat = grid.reshape(-1, channels)
    flat = flat - flat.mean(0)
    axis = torch.linalg.eigh(flat.T @ flat).eigenvectors[:, -1]
    projection = (flat @ axis).view(h, w)
    threshold = projection.mean()
    for _ in range(16):
        high = projection > threshold
        if high.all() or not high.any():
            return None
        threshold = (projection[high].mean() + projection[~high].mean()) / 2
    high = projection > threshold
    border = torch.cat([high[0], high[-1], high[1:-1, 0], high[1:-1, -1]]).float().mean()
    product = ~high if border > 0.5 else high
    on_border = min(float(border), 1 - float(border))
    if on_border > 1 - MASK_BORDER or not MASK_COVER[0] <= product.float().mean() <= MASK_COVER[1]:
        return None
    groups = connected_groups(product)  # the product is its largest piece: a speck of dust is not
    product = groups == groups.flatten()[groups.flatten() >= 0].mode().values
    grown = F.max_pool2d(product[None, None].float(), 2 * MASK_GROW + 1, 1, MASK_GROW)
    return grown[0, 0].bool()


def product_cells(product: torch.Tensor, rows: int, cols: int, g: int) -> torch.Tensor:
    """A `product_mask` brought to an encoder whose tiles hold `g` x `g` cells: `(rows * cols, g, g)` bool."""
    mask = F.interpolate(product[None, None].float(), size=(rows * g, cols * g), mode="nearest")[0, 0].bool()
    return cut_tiles(mask, rows, cols)


def on_product(nearest: torch.Tensor, product: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """One encoder's `nearest` distances of an image `(tiles, g, g)` with its background's grid-tile cells (off the
    `product_mask`, brought to this encoder's grid) set to the median over the product's: never the largest, and
    the median over the image that the distances are also read against moves little."""
    mask = product_cells(product, rows, cols, nearest.shape[1])
    grid = nearest[: rows * cols]
    neutral = grid[mask].median()
    return torch.cat([torch.where(mask, grid, neutral), nearest[rows * cols :]])


def median_level(scores: list[torch.Tensor]) -> torch.Tensor | None:
    """The level of a product's good photos from their kNN scores (each `(encoders,)`): the median per encoder,
    as `ReferenceBank.levels` gives it; None without scores."""
    return torch.stack(scores).median(0).values if scores else None


def unit_cells(grids: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """The compared encoders' (`names`) cells, L2-normalised in float32: name -> `(n, g, g, C)`."""
    return {name: F.normalize(grids[name].float(), dim=-1) for name in names}


def reference_view(pixel_values: torch.Tensor, view: str) -> torch.Tensor:
    """Square tiles `(n, 3, T, T)` seen as one of `REFERENCE_VIEWS`: flipped left-right or up-down, or turned
    counter-clockwise by 90, 180 or 270 degrees."""
    if view == "hflip":
        return pixel_values.flip(-1)
    if view == "vflip":
        return pixel_values.flip(-2)
    return pixel_values.rot90(int(view.removeprefix("rot")) // 90, (-2, -1))


def thumbnail_tiles(image_grid: torch.Tensor) -> torch.Tensor:
    """`(N,)` bool over all tiles of `image_grid` (rows, cols, tiles per image): True for each image's thumbnail."""
    flags = [[False] * (rows * cols) + [True] * (tiles - rows * cols) for rows, cols, tiles in image_grid.tolist()]
    return torch.tensor(sum(flags, []), dtype=torch.bool, device=image_grid.device)


def scored_tiles(thumbnail: torch.Tensor) -> torch.Tensor:
    """The tiles whose tokens give an image's overall score: its grid tiles, or all tiles when it has no grid (one
    tile). A thumbnail sees the photo at a coarser scale than any grid tile, so its nearest-patch distances to the
    references are mostly scale noise: on KensaSynth's test split the largest distance over grid tiles ranked
    defective photos at 0.95 AUROC (k = 4), over all tiles at 0.88 (BENCHMARKS.md)."""
    return ~thumbnail if (~thumbnail).any() else torch.ones_like(thumbnail)


class PromptImages:
    """The images of one `compare_prompt` batch, by index: their spans of tiles, compared cells (`query`), bank
    cells (`cells`: made when a search needs them, which a `PairCache` hit does not), whole-image statistics (for
    grading), and their search against a good bank (`search`), or a defective demo's (`defect`)."""

    def __init__(self, comparison: KensaVLReferenceComparison, grids: dict, image_grid: torch.Tensor, pixel_values,
                 bank_cells: Callable[[torch.Tensor, dict], dict], pairs: PairCache | None):  # fmt: skip
        self.comparison, self.grids = comparison, grids
        self.features = comparison.features(grids)  # name -> (N, g, g, C)
        self.image_grid, self.pixel_values, self.thumbnail = image_grid, pixel_values, thumbnail_tiles(image_grid)
        self.bank_cells, self.pairs = bank_cells, pairs
        self.starts = [0, *torch.tensor(image_grid[:, 2].tolist()).cumsum(0).tolist()]
        spans = [self.span(m) for m in range(len(self))]
        self.keys = [] if pairs is None else [PairCache.key(pixel_values[a:b]) for a, b in spans]
        self.made, self.made_stats = {}, {}  # image -> its bank cells; image -> its statistics
        # a reference's bank cells before they are made: its own cells and one copy per view (`reference_cells`)
        views = 1 + len(comparison.config.reference_views)
        self.cells_per_tile = self.features[comparison.encoders[0]].shape[1:3].numel() * views

    def __len__(self) -> int:
        return len(self.starts) - 1

    def span(self, m: int) -> tuple[int, int]:
        """Image `m`'s tiles: `(first, last)`, last exclusive."""
        return self.starts[m], self.starts[m + 1]

    def grid(self, m: int) -> list[int]:
        return self.image_grid[m, :2].tolist()

    def key(self, m: int) -> str | None:
        return self.keys[m] if self.keys else None

    def query(self, m: int) -> dict[str, torch.Tensor]:
        a, b = self.span(m)
        return {name: f[a:b] for name, f in self.features.items()}

    def stats(self, m: int) -> torch.Tensor:
        if m not in self.made_stats:
            a, b = self.span(m)
            grids = {n: g[a:b] for n, g in self.grids.items()}
            self.made_stats[m] = self.comparison.statistics(self.pixel_values[a:b], grids, self.thumbnail[a:b])
        return self.made_stats[m]

    def cells(self, m: int, name: str) -> torch.Tensor:
        if m not in self.made:
            a, b = self.span(m)
            self.made[m] = self.bank_cells(self.pixel_values[a:b], {n: f[a:b] for n, f in self.features.items()})
        return self.made[m][name]

    def bank(self, cached: ReferenceBank | None, members: list[int]) -> dict[str, torch.Tensor]:
        """The good bank of a `cached` support set and the prompt's earlier good images (`members`)."""
        if cached is not None and not members:  # the cached set's own tensors: the same for every query
            return {n: cached.cells[n].float() for n in self.features}
        prefix = {n: [] if cached is None else [cached.cells[n].float()] for n in self.features}
        return {n: torch.cat(prefix[n] + [self.cells(m, n) for m in members]) for n in self.features}

    def search(self, m: int, cached: ReferenceBank | None, members: list[int]):
        """Image `m` against the good bank: (its nearest distances from the pair cache, or None and the bank)."""
        size = sum(self.starts[r + 1] - self.starts[r] for r in members) * self.cells_per_tile
        if self.pairs is not None and size <= self.comparison.config.exact_search_cells:
            query = self.query(m)
            refs = {n: [(self.keys[r], partial(self.cells, r, n)) for r in members] for n in self.comparison.encoders}
            return [self.pairs.nearest(query[n], (self.keys[m], n), refs[n]) for n in self.comparison.encoders], None
        return None, self.bank(cached, members)

    def defect(self, m: int, demo: Demo, cached: ReferenceBank | None, members: list[int], level) -> Demo:
        """Defective demo `m` compared with the good bank (`level`: its level): `demo` with its defect, the farthest
        cells within its label's box if it gives one, and its look (`shown_demo`)."""
        comparison, query, grid = self.comparison, self.query(m), self.grid(m)
        found, bank = self.search(m, cached, members)
        if found is None:
            lists = self.lists(cached, members) or {}
            found = [comparison.nearest(query[n], bank[n], lists.get(n)) for n in comparison.encoders]
        found = comparison.with_own(query, found, grid, self.key(m))
        a, b = self.span(m)
        tiles, thumbnail = self.pixel_values[a:b], self.thumbnail[a:b]
        return comparison.shown_demo(demo.name, demo.box, query, found, tiles, thumbnail, grid, level)

    def lists(self, cached: ReferenceBank | None, members: list[int]) -> dict | None:
        """The cached support set's lists when it is the whole bank (built once, they serve every query); else None."""
        return self.comparison.bank_lists(cached) if cached is not None and not members else None


class KensaVLReferenceComparison(nn.Module):
    """PatchCore inside the model, with a learned anomaly map.

    For each image with references, per compared encoder and per cell of that encoder's own patch grid: the cosine
    distance to the nearest cell of any reference tile, averaged over the 3x3 neighbourhood (PatchCore's locally
    aware patches) and max-pooled onto the visual tokens, and the farthest single cell under each token (a defect of
    a cell or two, which the mean dilutes); each raw and relative to the image's median.
    Their logarithms become one anomaly logit per visual token (trained on defect masks when they are given, see
    `loss`): a linear term that starts as their mean (farther is more anomalous, so an untrained map already ranks
    like PatchCore) plus an MLP that starts at zero.

    The model receives it twice: the token logit and the image's largest logit become an embedding added to each
    visual token (through a last layer that starts at zero), and the image's summary becomes an embedding added to
    the image's closing `</img>` token and the text that follows it (AnomalyGPT's prompt embedding, see
    `add_summaries`). The summary, over the image's grid tiles (`scored_tiles`): the largest, top-mean and mean
    logit, the image's kNN score, that score minus the prompt's level (see `forward`), and whether there is one.

    And a verdict: a logit linear in the score over the level (and whether there is a level), which sets the odds
    of "defective" against "good" where the answer about the image starts (`set_verdict_odds`). The language model's
    own logits are added to it, so an untrained language model still gives the comparison's verdict, and a trained
    one need not find the summary among its inputs to use it. Its threshold is relative to the product's own good
    photos (how far they lie from each other), not to what was typical in training."""

    PER_ENCODER = 4  # log-distances per encoder and token: 3x3 mean and farthest cell, raw and over the median

    def __init__(self, config: KensaVLConfig):
        super().__init__()
        self.config = config  # read when used: the builders set the token ids after the model is made
        self.encoders = config.reference_encoder_names()
        # each compared encoder's excess over its level enters the verdict as scale * excess - margin (an encoder
        # entry's `verdict_scale`, `verdict_margin`; 1 and 0 unless set: `train/build.py`'s band-pass entry)
        entries = {encoder["name"]: encoder for encoder in config.vision_encoders}
        self.excess = [
            (entries[n].get("verdict_scale", 1.0), entries[n].get("verdict_margin", 0.0)) for n in self.encoders
        ]
        # an encoder entry's `own_window`: its cells are also compared with the image's own cells outside that window
        # (`own_nearest`; none unless set: `train/build.py`'s band-pass entry)
        self.own_windows = [entries[n].get("own_window") for n in self.encoders]
        # the encoder entry that `masks_background`: its cells tell the product from its background (`product_mask`)
        self.masking = next((n for n in self.encoders if entries[n].get("masks_background")), None)
        # the encoders whose cells place the box and the heatmap (`locate`; all unless an entry says `locate: false`)
        self.locating = [self.encoders.index(n) for n in config.locating_encoder_names()]
        # the band-pass family's cells are blurred over their surround: where a sharp encoder found the defect, its
        # cells place the box (`finder`)
        self.blurred = [entries[n]["config"]["model_type"] == BANDPASS_MODEL_TYPE for n in self.encoders]
        # the encoders whose cells say which example a defect is like, beside the region's look: the sharp ones, all
        # when all are of one kind (the blurred ones measure what the look does: docs/naming-by-example.md)
        self.naming = [n for n, b in zip(self.encoders, self.blurred, strict=True) if not b] or list(self.encoders)
        self.token_side = config.token_side
        width = config.text_config.hidden_size
        inputs = self.PER_ENCODER * len(self.encoders)
        self.linear = nn.Linear(inputs, 1)
        self.mlp = nn.Sequential(nn.Linear(inputs, 64), nn.GELU(), nn.Linear(64, 1))
        self.embed = nn.Sequential(nn.Linear(2, width), nn.GELU(), nn.Linear(width, width))
        self.summary = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, width))
        # (largest score over its encoder's level, whether there is a level) -> verdict logit
        self.verdict = nn.Linear(2, 1)
        self.demo_pointer = DemoPointer()  # which defective example a query shows, and whether to copy its name
        self.grade_pointer = DemoPointer("grade_pointer")  # which grade a query is, and whether to copy its label
        self.pair_cache: PairCache | None = None  # set by training when the compared encoders stay fixed
        # how `_init_weights` starts them: the mean of the log-distances, residuals that change nothing yet, and
        # the verdict's VERDICT_SLOPE * (relative - VERDICT_MARGIN)
        self.linear.kensa_init = "mean"
        self.verdict.kensa_init = "verdict"
        self.mlp[-1].kensa_init = self.embed[-1].kensa_init = "zero"

    def features(self, grids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compared encoders' L2-normalised cells on their own grids: name -> `(n, g, g, C)`."""
        return unit_cells(grids, self.encoders)

    def statistics(self, pixel_values: torch.Tensor, grids: dict[str, torch.Tensor], thumbnail: torch.Tensor):
        """One image's whole-surface statistics (`image_statistics`) over its scored tiles: `pixel_values`
        `(n, 3, T, T)`, the raw `grids` of its tiles (name -> `(n, g, g, C)`) and their `thumbnail` flags `(n,)`."""
        selected = scored_tiles(thumbnail)
        return image_statistics(pixel_values[selected], {n: grids[n][selected] for n in self.encoders}, self.encoders)

    def grade_pointer_of(self, query: torch.Tensor, graded: list[Demo]) -> tuple[list[list[int]], torch.Tensor,
                                                                                   torch.Tensor] | None:  # fmt: skip
        """A query's grade pointer over the grades of `graded` examples (named, with statistics): (the grades'
        names in order of first appearance, pointer logits `(G,)`, gate logit); None with fewer than two grades."""
        names = []
        for demo in graded:
            if demo.name not in names:
                names.append(demo.name)
        if len(names) < 2:
            return None
        groups = torch.tensor([names.index(d.name) for d in graded], device=query.device)
        closeness = grade_closeness(query, torch.stack([d.stats.to(query.device) for d in graded]), groups)
        logits, gate = self.grade_pointer(closeness)
        return names, logits, gate

    def nearest(self, query: torch.Tensor, bank: torch.Tensor, lists: InvertedLists | None = None) -> torch.Tensor:
        """`nearest_distances`, exact up to `config.exact_search_cells` bank cells, approximate beyond: on the bank's
        `lists` when they are built already (a cached support set's, `ReferenceBank.inverted_lists`), else when the
        query has at least 1/APPROXIMATE_MIN_SHARE as many cells as the bank (lists built per search cost about as
        much as searching a few thousand query cells exactly, BENCHMARKS.md). On a CPU only (`approximate_pays`)."""
        cells = query.shape[:-1].numel()
        worth = lists is not None or cells * APPROXIMATE_MIN_SHARE >= len(bank)
        large = len(bank) > self.config.exact_search_cells and worth and approximate_pays(bank.device)
        return nearest_distances(query, bank, probes=self.config.search_probes if large else 0, lists=lists)

    def bank_lists(self, bank: ReferenceBank) -> dict | None:
        """A cached bank's lists per compared encoder, where the approximate search will use them (built once)."""
        if not self.config.search_probes or not approximate_pays(next(iter(bank.cells.values())).device):
            return None
        large = [n for n in self.encoders if len(bank.cells[n]) > self.config.exact_search_cells]
        return {n: bank.inverted_lists(n) for n in large} or None

    def locate(self, distances: list[torch.Tensor], rows: int, cols: int, levels=None):
        """`locate_box` on the locating encoders' distances (`distances` and `levels` per compared encoder): on the
        maps of those that found the defect (`finder`), or without levels on all of theirs."""
        chosen, levels, excess = self._locating(distances, levels)
        if levels is not None:
            keep = self.finder(chosen, rows, cols, levels, excess)
            chosen, levels, excess = [chosen[i] for i in keep], levels[keep], [excess[i] for i in keep]
        return locate_box(chosen, rows, cols, levels, excess)

    def demo_region(self, tiles: torch.Tensor, distances: list[torch.Tensor], grid, box, levels) -> torch.Tensor:
        """A defective demo's look (`region_descriptor` of its `tiles`) on its region located as a query's is
        (`locate` on its `distances`, `levels` per compared encoder), so that the two looks are read alike; within
        the `box` its label gives when it gives one (the cells outside it set to no distance). The box itself is
        tighter than any located region, and its look agreed less with the queries' (docs/naming-by-example.md)."""
        if box is not None:
            distances = [d * within_box(box, grid, d) for d in distances]
        return region_descriptor(tiles, *grid, self.locate(distances, *grid, levels)[0])

    def defect_cells(self, cells: dict, distances: list[torch.Tensor], selected: torch.Tensor, box=None, grid=None):
        """`farthest_cells` of an image (its unit `cells` per compared encoder, its `distances` in their order) on
        the encoders whose cells say which example a defect is like (`naming`): what `match_similarity` compares."""
        keep = [distances[self.encoders.index(n)] for n in self.naming]
        return farthest_cells(cells, keep, selected, self.naming, box, grid)

    def shown_demo(self, name, box, cells: dict, distances: list, tiles, thumbnail, grid, levels) -> Demo:
        """A defective demo as the pointer reads it: a `Demo` of its `name` and `box` with its defect cells
        (`defect_cells`, within the box) and its look (`demo_region`), from its unit `cells` per compared encoder, its
        `distances` from the good bank (`with_own` applied), its `tiles`, their `thumbnail` flags and its `grid`."""
        defect = self.defect_cells(cells, distances, scored_tiles(thumbnail), box, grid)
        return Demo(name, defect, box=box, region=self.demo_region(tiles, distances, grid, box, levels))

    def finder(self, distances: list[torch.Tensor], rows: int, cols: int, levels: torch.Tensor, excess) -> list[int]:
        """Which of the locating encoders (`distances` in their order) place the box: the sharp ones (not of the
        band-pass family, `blurred`) when one of their scores' excess over its level, as the verdict takes it, would
        flag the image by itself, or when no encoder's would; else all of them. A blurred encoder's cells spread a
        sharp defect over its surround; a diffuse one only they see is where they see it. Chosen on both validation
        splits (docs/reference-comparison.md); all of them when they are all of one kind."""
        blurred = [self.blurred[i] for i in self.locating]
        sharp = [i for i, b in enumerate(blurred) if not b]
        if len(sharp) in (0, len(blurred)):
            return list(range(len(blurred)))
        flagged = over_levels(image_scores(distances, rows * cols, self.token_side), levels, excess) > VERDICT_MARGIN
        if flagged[sharp].any() or not flagged.any():
            return sharp
        return list(range(len(blurred)))

    def heatmap(self, distances: list[torch.Tensor], rows: int, cols: int, levels=None) -> torch.Tensor:
        """`distance_map` of the locating encoders' distances (`distances` and `levels` per compared encoder)."""
        chosen, levels, excess = self._locating(distances, levels)
        return distance_map(chosen, rows, cols, levels, excess)

    def _locating(self, distances, levels):
        keep = self.locating
        levels = None if levels is None else torch.as_tensor(levels, dtype=torch.float32).flatten()[keep]
        return [distances[i] for i in keep], levels, [self.excess[i] for i in keep]

    def distances(
        self, query: dict[str, torch.Tensor], bank, lists: dict | None = None, nearest=None, grid=None, key=None
    ):
        """`query` name -> (n, g, g, C) tiles of one image, `bank` name -> (M, C) -> (log-distances
        `(n, tokens_per_tile, PER_ENCODER * E)`, each encoder's `nearest_distances` `(n, g, g)`). `nearest`, when
        given, holds those already (`PairCache`), and `bank` is not read. With the image's `grid` (rows, cols), an
        encoder with an `own_window` takes the nearer of the bank's cells and the image's own (`with_own`, `key`:
        the image's `PairCache.key`)."""
        lists = lists or {}
        if nearest is None:
            nearest = [self.nearest(query[name], bank[name], lists.get(name)) for name in self.encoders]
        if grid is not None:
            nearest = self.with_own(query, nearest, grid, key)
        out = []
        for cells in nearest:
            d = pooled_distances(cells, self.token_side)  # (n, tokens_per_tile)
            # the single farthest cell under each token: a defect of a cell or two, which the 3x3 mean dilutes
            far = F.adaptive_max_pool2d(cells.unsqueeze(1), self.token_side).flatten(1)
            out += [d, d / d.median().clamp_min(1e-6), far, far / far.median().clamp_min(1e-6)]
        return torch.stack(out, -1).clamp_min(LOG_FLOOR).log(), nearest

    def with_own(self, query: dict[str, torch.Tensor], nearest: list[torch.Tensor], grid, key=None) -> list:
        """Each encoder's `nearest` distances `(n, g, g)` of one image (`query`: name -> its unit cells, `grid`:
        rows, cols), for an encoder with an `own_window` the smaller of them and `own_nearest` on its grid tiles;
        with the image's `key` (`PairCache.key`), the `pair_cache` keeps an image's own distances too (training
        meets each image many times). Where an encoder `masks_background` and the image shows a background
        (`product_mask`), every encoder's distances there are set off (`on_product`): the score, the heatmap, the box
        and the defect's cells are read on the product alone."""
        rows, cols = grid
        out = []
        for name, found, window in zip(self.encoders, nearest, self.own_windows, strict=True):
            if window:
                own = self.own_nearest(query[name], rows, cols, window, key and (key, name)).to(found.dtype)
                found = torch.cat([torch.minimum(found[: rows * cols], own), found[rows * cols :]])
            out.append(found)
        product = None if self.masking is None else product_mask(query[self.masking][: rows * cols], rows, cols)
        return out if product is None else [on_product(found, product, rows, cols) for found in out]

    def own_nearest(self, cells: torch.Tensor, rows: int, cols: int, window: float, key=None) -> torch.Tensor:
        """`own_nearest` of one image's `cells`, kept in the `pair_cache` under `key` when both are given."""
        pairs, key = (self.pair_cache, ("own", key, rows, cols)) if key is not None else (None, None)
        found = None if pairs is None else pairs.get(key)
        if found is None:
            found = own_nearest(cells, rows, cols, window)
            if pairs is not None:
                pairs.put(key, found)
        return found.view(rows * cols, *cells.shape[1:3])

    def forward(
        self,
        query,
        thumbnail: torch.Tensor,
        bank,
        level: torch.Tensor | None = None,
        lists=None,
        nearest=None,
        grid=None,
        key=None,
    ):
        """One image whose tiles are `thumbnail`-flagged `(n,)` against `bank` -> (token embeddings
        `(n, tokens_per_tile, D)`, anomaly logits `(n, tokens_per_tile)`, the summary embedding `(D,)`, the verdict
        logit, the image's kNN scores `(encoders,)`, each encoder's `nearest_distances`). An encoder's score is its
        largest 3x3 log-distance over the grid tiles (PatchCore's); `level` `(encoders,)` is the median score of the
        earlier images of the prompt (each against the images before it), the prompt's own measure of how far good
        photos of this product lie from each other, per encoder: encoders see different things (the DCT cells fine
        texture, the band-pass cells brightness and colour) with different spreads, and a defect one of them sees is
        a defect (the verdict starts from the largest score over its level). `grid`: the image's (rows, cols), for
        the encoders compared with the image itself too (`with_own`; `key`: the image's `PairCache.key`)."""
        x, nearest = self.distances(query, bank, lists, nearest, grid, key)
        x = x.to(self.linear.weight.dtype)
        logits = (self.linear(x) + self.mlp(x)).squeeze(-1)
        selected = scored_tiles(thumbnail)
        scored = logits[selected].flatten()
        top = scored.topk(min(len(scored), logits.shape[-1])).values.mean()
        # each encoder's largest 3x3 log-distance, and how far it lies above that encoder's own level
        score = x[selected][..., 0 :: self.PER_ENCODER].flatten(0, 1).amax(0)  # (encoders,)
        relative, known = (
            (over_levels(score, level, self.excess), 1.0) if level is not None else (torch.zeros_like(score), 0.0)
        )
        relative, known = relative.to(x.dtype), torch.full_like(score[0], known)  # a float32 level, a bf16 model
        image = torch.stack([scored.max(), top, scored.mean(), score.mean(), relative.max(), known])
        summary = torch.stack([logits, image[0].expand_as(logits)], -1)
        verdict = self.verdict(torch.stack([relative.max(), known])).squeeze(-1)
        return self.embed(summary), logits, self.summary(image), verdict, score.detach(), nearest

    def compare_prompt(
        self,
        image_features: torch.Tensor,
        grids: dict[str, torch.Tensor],
        input_ids: torch.Tensor,
        image_grid: torch.Tensor,
        pixel_values: torch.Tensor,
        bank_cells: Callable[[torch.Tensor, dict], dict],
        references: list[ReferenceBank] | None = None,
        keep: bool = False,
    ) -> PromptComparison:
        """Compare every image of each prompt that has references (the earlier images of its sample, plus
        `references[sample]`, a cached support set, when given) with them (see `PromptComparison`). `bank_cells`
        turns an image's tiles and compared features into its bank cells (the model's `reference_cells`: every
        reference view). With `keep`, per sample, the bank a later image would compare with: the cached support
        set's, then every image's own (what `reference_cells` gives, image by image), with their scores."""
        pairs = self.pair_cache if references is None else None
        images = PromptImages(self, grids, image_grid, pixel_values, bank_cells, pairs)
        per_tile = image_features.shape[1]
        streams = per_tile // self.token_side**2  # tokens per position: one per encoder when interleaved
        is_image = input_ids == self.config.image_token_id
        added = torch.zeros_like(image_features)
        anomaly = image_features.new_full((len(image_features), self.token_side**2), float("nan"), dtype=torch.float32)
        scores = anomaly.new_full((len(images), len(self.encoders)), float("nan"))
        summaries, nearest, kept, image = [], [None] * len(images), [], 0
        reads_labels = bool(self.config.good_label_ids and self.config.defective_label_ids or self.config.grade_marks)
        for row, row_tokens in enumerate(is_image.sum(1).tolist()):
            positions = is_image[row].nonzero().flatten()
            ids = input_ids[row].tolist() if reads_labels else None
            cached = None if references is None else references[row]
            levels = [] if cached is None else list(cached.scores.float().to(anomaly.device))
            # members: the earlier good (or unlabeled) images of this row, in the bank after `cached`'s cells;
            # demos: the defective ones, never in the bank (image, its `Demo`, its defect once searched)
            # graded: the graded examples (in the bank too), their names and statistics
            seen, members, demos, defects, graded = 0, [], [], {}, []
            while seen < row_tokens:
                first, last = images.span(image)
                end = int(positions[seen + (last - first) * per_tile - 1]) + 1  # the image's `</img>`
                role, name = read_label(ids, end, self.config) if ids is not None else (None, None)
                if cached is not None or members:
                    level = median_level(levels)
                    found, bank = images.search(image, cached, members)
                    lists = images.lists(cached, members)
                    delta, logits, summary, verdict, scores[image], nearest[image] = self(
                        images.query(image), images.thumbnail[first:last], bank, level, lists, found,
                        images.grid(image), images.key(image),
                    )  # fmt: skip
                    if role != "defective":  # the level: how far good photos lie from each other
                        levels.append(scores[image])
                    added[first:last] = delta.repeat_interleave(streams, 1).to(added.dtype)
                    anomaly[first:last] = logits.float()
                    copy = None  # what an answer about a query may copy: a demo's name, the box, where it is
                    if role is None and end < input_ids.shape[1]:
                        shown = ([] if cached is None else cached.graded) + [
                            Demo(n, stats=images.stats(m)) for m, n in graded
                        ]
                        copy = self.grade_copy(row, images.stats(image), shown) if len(shown) > 1 else None
                        if copy is not None:  # a grading answer: its grade's label, no verdict, no box
                            verdict = None
                        else:
                            named = self.named_demos(images, cached, members, demos, defects, level)
                            copy = self.answer_copy(row, images, image, nearest[image], level, named)
                    if end < input_ids.shape[1]:
                        summaries.append(Summary(row, end, summary, verdict, copy))
                seen += (last - first) * per_tile
                if role == "defective":
                    demos.append((image, Demo(name, box=label_box(ids, end, self.config))))
                elif seen < row_tokens or keep:  # a later image of the row (or a caller's later query) compares
                    members.append(image)
                if role == "grade" and name and (seen < row_tokens or keep):
                    graded.append((image, name))
                image += 1
            if keep:
                kept.append(self.kept_bank(images, cached, members, demos, graded, levels))
        return PromptComparison(added, anomaly, summaries, scores, tuple(nearest), tuple(kept) if keep else None)

    def grade_copy(self, row: int, stats: torch.Tensor, shown: list[Demo]) -> Pointer | None:
        """What a graded answer (batch row `row`, the query's whole-image `stats`) copies: the grade pointer over the
        `shown` graded examples (`grade_pointer_of`); None with fewer than two grades."""
        pointer = self.grade_pointer_of(stats, shown)
        if pointer is None:
            return None
        copy = Pointer(row, -1, graded=True, stats=stats)  # `pointers` sets where the answer starts
        copy.names, copy.logits, copy.gate = pointer
        return copy

    def named_demos(self, images: PromptImages, cached, members: list, demos: list, defects: dict, level):
        """The named defective demos a query's answer may copy, with their defects: the `cached` set's, then the
        prompt's own (`demos`, each compared with the good bank of `members` once: `defects` keeps them)."""
        named = [d for d in (cached.demos if cached is not None else []) if d.name]
        for m, d in [(m, d) for m, d in demos if d.name]:
            if (m, len(members)) not in defects:
                defects[(m, len(members))] = images.defect(m, d, cached, members, level)
            named.append(defects[(m, len(members))])
        return named

    def answer_copy(self, row: int, images: PromptImages, m: int, found: list, level, named: list[Demo]) -> Pointer:
        """What an answer about image `m` (batch row `row`, its nearest distances `found`, the prompt's `level`) may
        copy: the `named` defective examples' names, pointed at by how alike its defect and theirs are
        (`match_similarity`), and its located box (`locate`), which is also where its look is read."""
        copy = Pointer(row, -1)  # `pointers` sets where the answer starts
        boxed = len(self.config.box_token_ids) == 2
        if not named and not boxed:
            return copy
        first, last = images.span(m)
        located = self.locate(found, *images.grid(m), level)[0]
        if named:
            suspect = self.defect_cells(images.query(m), found, scored_tiles(images.thumbnail[first:last]))
            region = region_descriptor(images.pixel_values[first:last], *images.grid(m), located)
            similarity = torch.stack([match_similarity(suspect, d.defect, (region, d.region)) for d in named])
            copy.names = [d.name for d in named]
            copy.logits, copy.gate = self.demo_pointer(similarity)
        if boxed:
            copy.box, copy.position = located_tokens(located, self.config)
        return copy

    def kept_bank(self, images: PromptImages, cached, members: list, demos: list, graded: list, levels: list):
        """The bank a caller's later query of this row compares with (`compare_prompt`'s `keep`): the cached set's
        cells, then its `members`' own, their scores (`levels`), every defective demo with its defect, and the graded
        examples with their statistics; None for a row with no references."""
        known = cached is not None or members
        if not known:
            return None
        level = median_level(levels)
        own = [images.defect(m, d, cached, members, level) for m, d in demos]
        scores = torch.stack(levels) if levels else images.pixel_values.new_empty(0, len(self.encoders))
        return ReferenceBank(
            images.bank(cached, members),
            scores.float(),
            ([] if cached is None else list(cached.demos)) + own,
            ([] if cached is None else list(cached.graded)) + [Demo(n, stats=images.stats(m)) for m, n in graded],
        )

    def add_summaries(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, summaries: list[Summary]):
        """Add each compared image's summary embedding to its `</img>` token and the text after it, up to the next
        stop token (`config.summary_stop_token_ids`: the next image or chat turn) or the end of the input. The
        question about an image then carries its comparison, so the answer's first token (in the next turn, a few
        tokens on) reads it from nearby text instead of searching hundreds of visual tokens; the answer itself never
        carries it, in training as in generation."""
        if not summaries:
            return inputs_embeds
        stop_ids = self.config.summary_stop_token_ids
        stops = torch.isin(input_ids, torch.tensor(stop_ids, device=input_ids.device))
        span_rows, span_cols, values = [], [], []
        for summary in summaries:
            after = stops[summary.row, summary.start :].nonzero().flatten() if stop_ids else None
            start = summary.start
            stop = start + 1 if after is None else start + int(after[0]) if len(after) else input_ids.shape[1]
            span_rows += [summary.row] * (stop - start)
            span_cols += range(start, stop)
            values.append(summary.embedding.expand(stop - start, -1))
        index = (torch.tensor(span_rows, device=input_ids.device), torch.tensor(span_cols, device=input_ids.device))
        return inputs_embeds.index_put(index, torch.cat(values).to(inputs_embeds.dtype), accumulate=True)

    def answer_starts(self, input_ids: torch.Tensor, summaries: list[Summary], offset: int = 0):
        """Where an answer about a compared image starts: the last token of each generation prompt
        (`config.answer_prompt_ids`) after the image's `</img>`, the most recent compared image of its row. Returns
        (rows, positions, those images' summaries), positions counted from `offset`; positions before it are left
        out."""
        prompt, rows, cols, chosen = self.config.answer_prompt_ids, [], [], []
        if not summaries or not prompt or input_ids.shape[1] < len(prompt):
            return rows, cols, chosen
        pattern = torch.tensor(prompt, device=input_ids.device)
        for row, first in (input_ids.unfold(1, len(pattern), 1) == pattern).all(-1).nonzero().tolist():
            end = first + len(prompt) - 1
            before = [s for s in summaries if s.row == row and s.start < end]
            if before and end >= offset:
                rows.append(row)
                cols.append(end - offset)
                chosen.append(max(before, key=lambda s: s.start))
        return rows, cols, chosen

    def verdict_positions(self, input_ids: torch.Tensor, summaries: list[Summary], offset: int = 0):
        """`answer_starts` of the images with a verdict logit: (rows, positions, verdict logits)."""
        if len(self.config.verdict_token_ids) != 2:
            return [], [], []
        found = zip(*self.answer_starts(input_ids, summaries, offset), strict=True)
        kept = [(r, c, s.verdict) for r, c, s in found if s.verdict is not None]
        return tuple(map(list, zip(*kept, strict=True))) if kept else ([], [], [])

    def pointers(self, input_ids: torch.Tensor, summaries: list[Summary], base: int = 0) -> list[Pointer]:
        """The answers' `Pointer`s: one per answer start after an image compared with named defective demos or
        with a box to copy.
        `input_ids` begin at absolute position `base` (the length of a cache before them)."""
        starts = zip(*self.answer_starts(input_ids, summaries), strict=True)
        return [
            replace(summary.copy, start=base + col)
            for _, col, summary in starts
            if summary.copy is not None and (summary.copy.names or summary.copy.box)
        ]

    def pointer_loss(self, hidden_states: torch.Tensor, head: torch.Tensor, input_ids: torch.Tensor, pointers):
        """For a trainer whose loss never sees `copy_names` (TRL's fused head): the negative log-likelihood of each
        answer's name tokens (and its end mark) under the pointer-generator's mix, the language model's
        probabilities (`hidden_states` times `head`) held fixed, so the pointer and its gate learn what the
        language model misses. Positions where no demo's name agrees with the answer are left out. None without
        any."""
        terms = []
        for pointer in pointers:
            if not pointer.names:
                continue
            names = replace(pointer, box=None, position=None)  # the box's weight is fixed: not trained
            for t in range(pointer.start, input_ids.shape[1] - 1):
                copy = copy_terms(names, input_ids[pointer.row, pointer.start + 1 : t + 1].tolist(), self.config)
                if copy is not None:
                    terms.append((pointer, t, *copy))
        if not terms:
            return None
        rows = torch.tensor([p.row for p, *_ in terms])
        cols = torch.tensor([t for _, t, *_ in terms])
        with torch.no_grad():
            lm = torch.log_softmax(hidden_states[rows, cols].float() @ head.float().T, -1)  # (n, vocab)
        losses = []
        for (pointer, t, tokens, share, gate), lp in zip(terms, lm, strict=True):
            target = int(input_ids[pointer.row, t + 1])
            mixed = lp[target] + F.logsigmoid(-gate.float())
            if target in tokens:
                mixed = torch.logaddexp(mixed, share[tokens.index(target)])
            losses.append(-mixed)
        return torch.stack(losses).mean()

    def set_verdict_odds(self, logits: torch.Tensor, input_ids: torch.Tensor, summaries: list[Summary]):
        """Add each compared image's verdict logit to the odds of "defective" against "good"
        (`config.verdict_token_ids`) where an answer about it starts (`verdict_positions`). The two tokens keep
        their joint probability, so an answer that is not a verdict (a box, a caption) is unchanged. `logits`
        `(batch, positions, vocab)` are the last positions of `input_ids` (`logits_to_keep`)."""
        rows, cols, verdicts = self.verdict_positions(input_ids, summaries, input_ids.shape[1] - logits.shape[1])
        if not rows:
            return logits
        words = self.config.verdict_token_ids
        index = (torch.tensor(rows)[:, None], torch.tensor(cols)[:, None], torch.tensor(words)[None])
        index = tuple(i.to(logits.device) for i in index)
        pair = logits[index].float()  # (n, 2): good, defective
        odds = pair[:, 1] - pair[:, 0] + torch.stack(verdicts).float()
        new = pair.logsumexp(-1, keepdim=True) + torch.stack([F.logsigmoid(-odds), F.logsigmoid(odds)], -1)
        return logits.index_put(index, new.to(logits.dtype))

    def verdict_loss(self, hidden_states: torch.Tensor, head: torch.Tensor, input_ids: torch.Tensor, summaries):
        """For a trainer that takes its loss from the backbone's hidden states through its own LM head (TRL's fused
        head never sees `set_verdict_odds`): the binary cross-entropy of each verdict logit plus the language
        model's own odds (`hidden_states` `(batch, seq, D)` times the verdict tokens' rows of `head` `(vocab, D)`,
        held fixed) against the answer's first token in `input_ids` (teacher forcing), where it is "good" or
        "defective". The verdict then learns what the language model's odds miss, as the summed odds are read at
        inference. None without such an answer."""
        rows, cols, verdicts = self.verdict_positions(input_ids[:, :-1], summaries)
        words = torch.tensor(self.config.verdict_token_ids, device=input_ids.device)
        keep = [i for i, (r, c) in enumerate(zip(rows, cols, strict=True)) if input_ids[r, c + 1] in words]
        if not keep:
            return None
        rows, cols = torch.tensor([rows[i] for i in keep]), torch.tensor([cols[i] for i in keep])
        with torch.no_grad():
            pair = hidden_states[rows, cols].float() @ head[words].float().T  # (n, 2): good, defective
        odds = pair[:, 1] - pair[:, 0] + torch.stack([verdicts[i] for i in keep]).float()
        target = (input_ids[rows, cols + 1] == words[1]).float()
        return F.binary_cross_entropy_with_logits(odds, target)

    def loss(self, anomaly_map: torch.Tensor, anomaly_labels: torch.Tensor) -> torch.Tensor | None:
        """Class-balanced binary cross-entropy of the map against `anomaly_labels` (1 defect, 0 not, -1 unknown),
        times `config.anomaly_loss_weight`; None when no token with references has a known label."""
        if anomaly_labels.shape != anomaly_map.shape:
            raise ValueError(
                f"anomaly_labels must be (num_tiles, token positions per tile) = {tuple(anomaly_map.shape)}, "
                f"got {tuple(anomaly_labels.shape)}."
            )
        known = (anomaly_labels >= 0) & ~anomaly_map.isnan()
        if not known.any():
            return None
        target = anomaly_labels[known].float()
        # defects cover a few % of the tokens: weigh them as much as the rest, or the map learns "never"
        balance = (target == 0).sum() / (target == 1).sum().clamp_min(1)
        bce = F.binary_cross_entropy_with_logits(anomaly_map[known], target, pos_weight=balance)
        return self.config.anomaly_loss_weight * bce
