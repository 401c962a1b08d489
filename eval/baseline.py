"""The number to beat: a training-free PatchCore-style kNN patch-memory detector on the same support set and the
same encoder features (the merged tower features KensaVL feeds its projector), with the inspector's interface.

Score of a query: the largest distance of any of its patch features to the nearest patch feature of the good
support photos. Threshold: the largest leave-one-out score of the good supports (needs two or more; with one, every
query is judged good and only AUROC is meaningful).
"""

from __future__ import annotations

import torch

from .inspector import Judgement, _rgb


class PatchCore:
    """`set_support(items)` keeps the good items' patch features; `judge(images)` scores queries against them."""

    def __init__(self, model, processor, max_tiles: int | None = None, **_):
        self.model, self.processor, self.max_tiles = model.eval(), processor, max_tiles
        self.noun = None  # set by the evaluator; unused

    @torch.no_grad()
    def _features(self, image) -> torch.Tensor:
        batch = self.processor.image_processor([_rgb(image)], max_tiles=self.max_tiles, return_tensors="pt")
        return self.model.model.reference_features(batch["pixel_values"].to(self.model.device))

    def set_support(self, support: list[dict]) -> None:
        self.bank = [self._features(item["image"]) for item in support if item["defect_type"] is None]
        self.threshold = None
        if len(self.bank) >= 2:  # leave one out: how far a good photo is from the other good photos
            scores = [self._score(f, torch.cat(self.bank[:i] + self.bank[i + 1 :])) for i, f in enumerate(self.bank)]
            self.threshold = max(scores)

    @staticmethod
    def _score(features: torch.Tensor, bank: torch.Tensor) -> float:
        return float((1 - features @ bank.T).amin(-1).max())

    def judge(self, queries) -> list[Judgement]:
        if not self.bank:
            raise ValueError("PatchCore needs at least one good support image (k >= 1)")
        queries = queries if isinstance(queries, list) else [queries]
        bank = torch.cat(self.bank)
        out = []
        for query in queries:
            score = self._score(self._features(query), bank)
            # p >= 0.5 exactly when score >= threshold; without a threshold every verdict is "good" (p < 0.5) and
            # only the ranking, hence AUROC, means anything
            p = score / (score + (self.threshold if self.threshold is not None else score + 1.0) + 1e-12)
            out.append(Judgement("defective" if p >= 0.5 else "good", p))
        return out
