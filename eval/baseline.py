"""The number to beat: a training-free PatchCore-style kNN patch-memory detector on the same support set and the
same encoder features (each compared encoder's cells on its own grid, as KensaVL's reference comparison sees them),
with the inspector's interface.

Score of a query: over its visual tokens, the largest distance (averaged over the encoders) of the token's cells to
the nearest cell of the good support photos, with the comparison's 3x3 neighbourhood (`patch_distances`), over the
query's grid tiles (`scored_tiles`: the thumbnail's distances are mostly scale noise), as the model's summary does.
The bank holds the good supports' cells and their copies in `views` (default: the model's `reference_views`, as
the model's bank does; AnomalyDINO's rotations: `("rot90", "rot180", "rot270")`; none: `()`).

Threshold: `scale` x the supports' level. The level is how far a good photo is from the other good ones: the
largest leave-one-out score over the supports (k >= 2), or with one support the largest score of one of its grid
tiles against its other tiles. `scale` is the baseline's calibration, chosen per k on validation categories
(`calibrate`), as the model's threshold was learnt in training: both get a threshold they did not see test data for.
A defective verdict's box: the model's rule (`locate_box`) on the same distances, each encoder's map against its own
level (its leave-one-out score times `scale`); the heatmap: the model's (`distance_map`), the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from kensa_vl.modeling.comparison_kensa_vl import patch_distances, pooled_distances, scored_tiles
from kensa_vl.modeling.locate_kensa_vl import LOG_FLOOR, distance_map, map_box
from kensa_vl.modeling.search_kensa_vl import nearest_distances

from .inspector import Judgement, pixel_box, pixel_heatmap
from .support_check import compared_features


class PatchCore:
    """`set_support(items)` keeps the good items' patch features; `judge(images)` scores queries against them."""

    def __init__(self, model, processor, max_tiles: int | None = None, scale: float = 1.0, views=None, **_):
        self.model, self.processor, self.max_tiles = model.eval(), processor, max_tiles
        self.scale, self.views = scale, None if views is None else tuple(views)
        self.noun = None  # set by the evaluator; unused

    def _features(self, image, reference: bool = False) -> tuple:
        """The image as the comparison sees it (`compared_features`), the bank with this baseline's views."""
        return compared_features(self.model, self.processor, image, self.max_tiles, self.views, reference)

    def set_support(self, support: list[dict]) -> None:
        self.bank = [self._features(item["image"], reference=True) for item in support if item["defect_type"] is None]
        # each encoder's bank, made once: every query searches the same tensor (`SearchMemo` knows it by then)
        self.cells = {name: _bank(self.bank, name) for name in self.bank[0][-1]} if self.bank else {}
        if len(self.bank) >= 2:  # leave one out: how far a good photo is from the other good photos
            left_out = [self._scores_of(self._nearest(f, self.bank[:i] + self.bank[i + 1 :]), f[1])
                        for i, f in enumerate(self.bank)]  # fmt: skip
            self.level = max(score for score, _ in left_out)
            self.levels = torch.stack([per for _, per in left_out]).amax(0)
        elif self.bank:
            self.level, self.levels = self._tile_level(self.bank[0])

    def _tile_level(self, features) -> tuple[float, torch.Tensor]:
        """One support's level: the largest score of one of its grid tiles against its other grid tiles' cells, and
        each encoder's largest."""
        cells, thumbnail, *_ = features
        grid = (~thumbnail).nonzero().flatten().tolist()
        if len(grid) < 2:
            raise ValueError("with one good support the baseline's threshold needs a photo cut into 2 or more tiles")
        side, scores, per = self.model.config.token_side, [], []
        for t in grid:
            others = [o for o in grid if o != t]
            distances = torch.stack(
                [patch_distances(c[t : t + 1], c[others].flatten(0, 2), side) for c in cells.values()]
            )
            scores.append(float(distances.mean(0).max()))
            per.append(distances.flatten(1).amax(1))
        return max(scores), torch.stack(per).amax(0)

    @property
    def threshold(self) -> float:
        return self.scale * self.level

    @staticmethod
    def _nearest(features, bank: list) -> dict:
        """Each compared encoder's `nearest_distances` of every tile of the query to `bank`'s cells."""
        return {name: nearest_distances(query, _bank(bank, name)) for name, query in features[0].items()}

    def _scores_of(self, nearest: dict, thumbnail: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(the score: the largest over the scored tiles' tokens of the encoders' mean 3x3 distance, and each
        encoder's own largest `(encoders,)`)."""
        side = self.model.config.token_side
        selected = scored_tiles(thumbnail)
        distances = torch.stack([pooled_distances(cells[selected], side) for cells in nearest.values()])
        return float(distances.mean(0).max()), distances.flatten(1).amax(1)

    def judge(self, queries) -> list[Judgement]:
        if not self.bank:
            raise ValueError("PatchCore needs at least one good support image (k >= 1)")
        queries = queries if isinstance(queries, list) else [queries]
        out = []
        for query in queries:
            features = self._features(query)
            # searched once: the score and the evidence read it
            nearest = {name: nearest_distances(cells, self.cells[name]) for name, cells in features[0].items()}
            score, _ = self._scores_of(nearest, features[1])
            p = score / (score + self.threshold + 1e-12)  # p >= 0.5 exactly when score >= threshold
            verdict = "defective" if p >= 0.5 else "good"
            out.append(Judgement(verdict, p, **self._evidence(features, nearest, verdict)))
        return out

    @torch.no_grad()
    def _evidence(self, features, nearest: dict, verdict: str) -> dict:
        _, thumbnail, (rows, cols), size, _ = features
        distances = [cells[~thumbnail] for cells in nearest.values()]
        # each encoder's map against its own level (its leave-one-out score times the threshold's scale): the
        # encoders' distances lie on different scales, and one level for all boxed the whole photo
        levels = (self.scale * self.levels).clamp_min(LOG_FLOOR).log()
        cells = distance_map(distances, rows, cols, levels)
        out = {"heatmap": pixel_heatmap(cells, *size)}
        if verdict == "defective":
            box, _ = map_box(cells, leveled=True)
            out["boxes"] = [pixel_box(box, *size)]
        return out


def calibrate(records: list[dict]) -> dict[int, float]:
    """Per k, the baseline's `scale` with the best balanced accuracy on `records` (the baseline judged at scale 1,
    on validation categories): a query is defective when score / level >= scale, and score / level = p / (1 - p)."""
    scales = {}
    for k in sorted({r["shots"] for r in records}):
        chosen = [r for r in records if r["shots"] == k and r["control"] is None and r.get("verdict") != "error"]
        ratio = np.array([r["p_defective"] / max(1 - r["p_defective"], 1e-12) for r in chosen])
        bad = np.array([r["label"] == "defective" for r in chosen])
        if not bad.any() or bad.all():
            continue
        candidates = np.unique(ratio)
        accuracy = [((ratio[bad] >= c).mean() + (ratio[~bad] < c).mean()) / 2 for c in candidates]
        best = int(np.argmax(accuracy))  # halfway to the next lower score: the rule is not fit to one photo
        lower = candidates[best - 1] if best > 0 else candidates[best]
        scales[k] = float((candidates[best] + lower) / 2)
    return scales


def _bank(bank: list, name: str) -> torch.Tensor:
    """All support cells of one encoder, views included: `(M, C)`."""
    return torch.cat([cells[name] for *_, cells in bank])
