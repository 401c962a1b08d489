"""Which patch features tell a defect from normal variation? A training-free kNN patch memory on KensaSynth's
held-out validation categories, per feature, side by side in one run (the measurement behind the DCT encoder).

    python benchmarks/patch_features.py [--data outputs/kensa-synth-224] [--shots 1,2,4] [--seeds 3]

Each whole photo is one tile (no tiling): the score of a query is the largest 3x3-averaged cosine distance of its
cells to the nearest cell of k good photos of the same category (`patch_distances`). The result is AUROC over all
other photos of the category, as mean over seeds, overall and per defect size.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from kensa_vl.modeling.comparison_kensa_vl import patch_distances
from kensa_vl.modeling.vision_kensa_vl import KensaVLDCTEncoder
from kensa_vl.train.build import build_tiny
from kensa_vl.train.data.synth import load_synth


def features(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> (n, g, g, C) L2-normalised cells for `pixels` (n, 3, S, S) in [0, 1]."""
    side = pixels.shape[-1]
    out = {}
    for block in (7, 14):
        dct = KensaVLDCTEncoder({"patch_size": block, "luma_coefficients": 36, "chroma_coefficients": 3})
        out[f"DCT {block} px"] = dct(pixels).view(len(pixels), side // block, side // block, -1)
    model, _ = build_tiny(tile_size=side)
    with torch.no_grad():
        grids = model.model.image_grids(pixels)
    out.update({f"untrained tiny {name} (14 px)": grid for name, grid in grids.items()})
    raw = F.unfold(pixels, 7, stride=7).transpose(1, 2)
    out["raw pixels 7 px"] = raw.reshape(len(pixels), side // 7, side // 7, -1)
    return {name: F.normalize(f.float(), dim=-1) for name, f in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="outputs/kensa-synth-224")
    parser.add_argument("--shots", default="1,2,4")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    photos = load_synth(args.data)[0]["validation"]
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in photos["image"]]))
    pixels = pixels.permute(0, 3, 1, 2)
    side = pixels.shape[-1] - pixels.shape[-1] % 14
    pixels = pixels[..., :side, :side]
    cats, sizes = np.array(photos["category"]), np.array(photos["size"])
    bad = np.array(photos["label"]) == "defective"
    print(f"{len(photos)} validation photos at {side} px, categories {sorted(set(cats))}")
    print("| features | k | AUROC | tiny | small | medium | large |\n|---|---|---|---|---|---|---|")
    for name, cells in features(pixels).items():
        token_side = cells.shape[1]  # one score per cell
        for k in [int(s) for s in args.shots.split(",")]:
            runs = []
            for seed in range(args.seeds):
                rng, y, score, size = np.random.default_rng(seed), [], [], []
                for cat in sorted(set(cats)):
                    support = rng.choice(np.flatnonzero((cats == cat) & ~bad), k, replace=False)
                    queries = [i for i in np.flatnonzero(cats == cat) if i not in support]
                    bank = cells[support].reshape(-1, cells.shape[-1])
                    score += patch_distances(cells[queries], bank, token_side).amax(1).tolist()
                    y += bad[queries].tolist()
                    size += sizes[queries].tolist()
                y, score, size = np.array(y), np.array(score), np.array(size)
                row = [roc_auc_score(y, score)]
                for s in ("tiny", "small", "medium", "large"):
                    keep = ~y | (size == s)
                    row.append(roc_auc_score(y[keep], score[keep]))
                runs.append(row)
            print(f"| {name} | {k} | " + " | ".join(f"{v:.3f}" for v in np.mean(runs, 0)) + " |", flush=True)


if __name__ == "__main__":
    main()
