"""Which tiles should give an image's anomaly score? The kNN patch memory over the DCT encoder's cells (the features
the main job's reference comparison uses; the DCT encoder has no weights, so the untrained tiny model gives them),
side by side in one run:

- bank: every reference cell ("mixed") or split by scale (grid tiles against grid tiles, thumbnails against
  thumbnails);
- score: the largest token distance over all tiles, or over the grid tiles only (`scored_tiles`).

    python benchmarks/image_score.py --data outputs/kensa-synth-224 [--seeds 3] [--queries 20]

Prints AUROC per k on the validation split (its own held-out categories; test is read only to report), queries
half good, half defective.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from kensa_vl.eval.evaluate import support_for
from kensa_vl.modeling.comparison_kensa_vl import patch_distances, thumbnail_tiles
from kensa_vl.train.build import build_tiny
from kensa_vl.train.data.synth import load_synth
from kensa_vl.train.pipeline import TINY

VARIANTS = ("mixed bank, all tiles", "mixed bank, grid tiles", "split banks, all tiles", "split banks, grid tiles")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=20, help="per category")
    args = parser.parse_args()
    model, processor = build_tiny(**TINY)
    side = model.config.token_side
    photos = load_synth(args.data)[0]["validation"]
    rows = {}
    for i, (category, label) in enumerate(zip(photos["category"], photos["label"], strict=True)):
        rows.setdefault(category, {"good": [], "defective": []})[label].append(i)
    cache = {}

    @torch.no_grad()
    def cells(i):
        if i not in cache:
            batch = processor.image_processor([photos[i]["image"].convert("RGB")], return_tensors="pt")
            grid = model.model.image_grids(batch["pixel_values"])["dct"]
            cache[i] = (F.normalize(grid.float(), dim=-1), thumbnail_tiles(batch["image_grid"]))
        return cache[i]

    print("| k | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for k in (1, 2, 4):
        scores = {v: ([], []) for v in VARIANTS}
        for seed in tqdm(range(args.seeds), desc=f"k={k}", leave=False):
            for category in sorted(rows):
                good, _ = support_for(rows, category, k, 0, seed)
                bank = [cells(i) for i in good]
                mixed, grid_bank, thumb_bank = (
                    torch.cat([f[select(t)].reshape(-1, f.shape[-1]) for f, t in bank])
                    for select in (lambda t: slice(None), lambda t: ~t, lambda t: t)
                )
                half = args.queries // 2
                unused = {lab: [x for x in rows[category][lab] if x not in good] for lab in ("good", "defective")}
                queries = unused["good"][:half] + unused["defective"][:half]
                for j in queries:
                    f, thumb = cells(j)
                    d_mixed = patch_distances(f, mixed, side)
                    d_split = torch.zeros_like(d_mixed)
                    d_split[~thumb] = patch_distances(f[~thumb], grid_bank, side)
                    d_split[thumb] = patch_distances(f[thumb], thumb_bank, side)
                    for name, d in zip(VARIANTS, (d_mixed, d_mixed, d_split, d_split), strict=True):
                        chosen = d[~thumb] if "grid" in name else d
                        scores[name][0].append(photos[j]["label"] == "defective")
                        scores[name][1].append(float(chosen.max()))
        print(f"| {k} | " + " | ".join(f"{roc_auc_score(*scores[v]):.3f}" for v in VARIANTS) + " |")


if __name__ == "__main__":
    main()
