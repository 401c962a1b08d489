"""The number to beat: a training-free PatchCore-style kNN patch-memory detector on the same support set and the
same encoder features (each compared encoder's cells on its own grid, as KensaVL's reference comparison sees them),
with the inspector's interface.

Score of a query: over its visual tokens, the largest distance (averaged over the encoders) of the token's cells to
the nearest cell of the good support photos, with the comparison's 3x3 neighbourhood (`patch_distances`), over the
query's grid tiles (`scored_tiles`: the thumbnail's distances are mostly scale noise), as the model's summary does.
Threshold: the largest leave-one-out score of the good supports (needs two or more; with one, every
query is judged good and only AUROC is meaningful).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kensa_vl.modeling.modeling_kensa_vl import patch_distances, scored_tiles, thumbnail_tiles

from .inspector import Judgement, _rgb


class PatchCore:
    """`set_support(items)` keeps the good items' patch features; `judge(images)` scores queries against them."""

    def __init__(self, model, processor, max_tiles: int | None = None, **_):
        self.model, self.processor, self.max_tiles = model.eval(), processor, max_tiles
        self.noun = None  # set by the evaluator; unused

    @torch.no_grad()
    def _features(self, image) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(name -> `(tiles, g, g, C)` L2-normalised cells of each encoder the model compares, thumbnail flags)."""
        batch = self.processor.image_processor([_rgb(image)], max_tiles=self.max_tiles, return_tensors="pt")
        grids = self.model.model._grids(batch["pixel_values"].to(self.model.device))
        names = self.model.config.reference_encoder_names()
        cells = {name: F.normalize(grids[name].float(), dim=-1) for name in names}
        return cells, thumbnail_tiles(batch["image_grid"]).to(self.model.device)

    def set_support(self, support: list[dict]) -> None:
        self.bank = [self._features(item["image"]) for item in support if item["defect_type"] is None]
        self.threshold = None
        if len(self.bank) >= 2:  # leave one out: how far a good photo is from the other good photos
            scores = [self._score(f, self.bank[:i] + self.bank[i + 1 :]) for i, f in enumerate(self.bank)]
            self.threshold = max(scores)

    def _score(self, features, bank: list) -> float:
        side = self.model.config.grid_size // self.model.config.pixel_shuffle
        cells, thumbnail = features
        distances = [
            patch_distances(query, torch.cat([b[name].reshape(-1, query.shape[-1]) for b, _ in bank]), side)
            for name, query in cells.items()
        ]
        return float(torch.stack(distances).mean(0)[scored_tiles(thumbnail)].max())

    def judge(self, queries) -> list[Judgement]:
        if not self.bank:
            raise ValueError("PatchCore needs at least one good support image (k >= 1)")
        queries = queries if isinstance(queries, list) else [queries]
        out = []
        for query in queries:
            score = self._score(self._features(query), self.bank)
            # p >= 0.5 exactly when score >= threshold; without a threshold every verdict is "good" (p < 0.5) and
            # only the ranking, hence AUROC, means anything
            p = score / (score + (self.threshold if self.threshold is not None else score + 1.0) + 1e-12)
            out.append(Judgement("defective" if p >= 0.5 else "good", p))
        return out
