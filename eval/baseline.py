"""The number to beat: a training-free PatchCore-style kNN patch-memory detector on the same support set and the
same encoder features (each compared encoder's cells on its own grid, as KensaVL's reference comparison sees them),
with the inspector's interface.

Score of a query: over its visual tokens, the largest distance (averaged over the encoders) of the token's cells to
the nearest cell of the good support photos, with the comparison's 3x3 neighbourhood (`patch_distances`), over the
query's grid tiles (`scored_tiles`: the thumbnail's distances are mostly scale noise), as the model's summary does.
The bank holds the good supports' cells, and their flipped or turned copies when the model's config has
`reference_views` (as the model's bank does). Threshold: the largest leave-one-out score of the good supports
(needs two or more; with one, every query is judged good and only AUROC is meaningful). A defective verdict's box:
the model's rule (`locate_box`) on the same distances, with the threshold as the level.
"""

from __future__ import annotations

import math

import torch

from kensa_vl.modeling.comparison_kensa_vl import (
    locate_box,
    nearest_distances,
    patch_distances,
    scored_tiles,
    thumbnail_tiles,
    unit_cells,
)
from kensa_vl.processing.image_processing_kensa_vl import to_rgb

from .inspector import Judgement, pixel_box


class PatchCore:
    """`set_support(items)` keeps the good items' patch features; `judge(images)` scores queries against them."""

    def __init__(self, model, processor, max_tiles: int | None = None, **_):
        self.model, self.processor, self.max_tiles = model.eval(), processor, max_tiles
        self.noun = None  # set by the evaluator; unused

    @torch.no_grad()
    def _features(self, image, reference: bool = False) -> tuple:
        """(name -> `(tiles, g, g, C)` L2-normalised cells of each encoder the model compares, thumbnail flags,
        the tile grid's rows and columns, the image's width and height, and for a `reference` its bank cells,
        name -> `(cells, C)`, views included)."""
        image = to_rgb(image)
        batch = self.processor.image_processor([image], max_tiles=self.max_tiles, return_tensors="pt")
        names = self.model.config.reference_encoder_names()
        pixel_values = batch["pixel_values"].to(self.model.device)
        grids = self.model.model.image_grids(pixel_values, names)
        cells = unit_cells(grids, names)
        grid = batch["image_grid"][0, :2].tolist()
        # the model's own bank (views included; it needs no comparison module, so a plain-ICL model's works too)
        bank = self.model.model.reference_cells(pixel_values, cells) if reference else None
        return cells, thumbnail_tiles(batch["image_grid"]).to(self.model.device), grid, image.size, bank

    def set_support(self, support: list[dict]) -> None:
        self.bank = [self._features(item["image"], reference=True) for item in support if item["defect_type"] is None]
        self.threshold = None
        if len(self.bank) >= 2:  # leave one out: how far a good photo is from the other good photos
            scores = [self._score(f, self.bank[:i] + self.bank[i + 1 :]) for i, f in enumerate(self.bank)]
            self.threshold = max(scores)

    def _score(self, features, bank: list) -> float:
        side = self.model.config.token_side
        cells, thumbnail, *_ = features
        distances = [patch_distances(query, _bank(bank, name), side) for name, query in cells.items()]
        return float(torch.stack(distances).mean(0)[scored_tiles(thumbnail)].max())

    def judge(self, queries) -> list[Judgement]:
        if not self.bank:
            raise ValueError("PatchCore needs at least one good support image (k >= 1)")
        queries = queries if isinstance(queries, list) else [queries]
        out = []
        for query in queries:
            features = self._features(query)
            score = self._score(features, self.bank)
            # p >= 0.5 exactly when score >= threshold; without a threshold every verdict is "good" (p < 0.5) and
            # only the ranking, hence AUROC, means anything
            p = score / (score + (self.threshold if self.threshold is not None else score + 1.0) + 1e-12)
            out.append(Judgement("defective", p, boxes=self._box(features)) if p >= 0.5 else Judgement("good", p))
        return out

    @torch.no_grad()
    def _box(self, features) -> list[list[int]]:
        cells, thumbnail, (rows, cols), size, _ = features
        distances = [nearest_distances(f[~thumbnail], _bank(self.bank, name)) for name, f in cells.items()]
        box, _ = locate_box(distances, rows, cols, math.log(max(self.threshold, 1e-4)))
        return [pixel_box(box, *size)]


def _bank(bank: list, name: str) -> torch.Tensor:
    """All support cells of one encoder, views included: `(M, C)`."""
    return torch.cat([cells[name] for *_, cells in bank])
