"""Would cells learnt here beat the weight-free DCT and band-pass cells? (issue 22, "features that see them": a
small patch encoder trained on real surfaces, if it beats the DCT cells on the real-surface validation set.)

    python benchmarks/learned_cells.py --train outputs/kensa-synth-224-surfaces \
        --data outputs/kensa-synth-224-surfaces --data outputs/kensa-synth-224 [--steps 1500]

A small convolutional cell encoder (`CellNet`: one cell per 7 px block, as the DCT cells, then two 3x3 layers of
context on the cell grid) is trained on the `--train` folders' training split only: a photo's cells against the
cells of three other good photos of the same surface, the loss a cross-entropy on each cell's log nearest-cell
cosine distance, positive on the drawn defect's cells (a 7 px block at least 30% inside its mask), negative on
good photos' cells. No photo of a validation or test surface is seen. Then every encoder is judged as
`benchmarks/patch_features.py` judges features: the kNN patch memory on each `--data` folder's validation split,
each 224 px photo one tile, a query's score the largest 3x3-averaged distance of its cells to the nearest cell of
k good photos of its category, AUROC over every other photo of the category, mean over seeds, overall and per
defect kind.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import trange

from kensa_vl.modeling.comparison_kensa_vl import patch_distances
from kensa_vl.modeling.locate_kensa_vl import LOG_FLOOR
from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder, KensaVLDCTEncoder
from kensa_vl.train.data.synth import load_synth

CELL = 7


class CellNet(nn.Module):
    """`(n, 3, S, S)` RGB in [0, 1] -> `(n, S / 7, S / 7, dim)` unit cells."""

    def __init__(self, dim: int = 32, width: int = 96):
        super().__init__()
        self.stem = nn.Conv2d(3, width, CELL, stride=CELL)
        self.context = nn.Sequential(
            nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, dim, 1)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.context(self.stem((pixels - 0.5) / 0.25))
        return F.normalize(x, dim=1).permute(0, 2, 3, 1)


def load(folder: str, split: str):
    """Pixels `(n, 3, S, S)` float in [0, 1] (S a multiple of 7), per-cell defect labels `(n, S/7, S/7)` (1 inside,
    0 outside, -1 ignored), categories, labels, defect kinds."""
    photos = load_synth(folder)[0][split]
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in photos["image"]])).permute(0, 3, 1, 2)
    side = pixels.shape[-1] - pixels.shape[-1] % CELL
    pixels = pixels[..., :side, :side].float() / 255
    masks = [np.zeros((side, side), np.float32) if m is None else np.asarray(m, np.float32)[:side, :side] / 255
             for m in photos["mask"]]  # fmt: skip
    share = F.avg_pool2d(torch.from_numpy(np.stack(masks))[:, None], CELL)[:, 0]
    cells = torch.where(share >= 0.3, 1.0, torch.where(share > 0, -1.0, 0.0))
    kinds = np.array([k or "good" for k in photos["defect_type"]])
    return pixels, cells, np.array(photos["category"]), np.array(photos["label"]) == "defective", kinds


def train(net: CellNet, sets: list, steps: int, batch: int = 8, refs: int = 3, seed: int = 0) -> list[float]:
    """The loss per step; `sets` are `load` outputs of training splits."""
    rng, losses = np.random.default_rng(seed), []
    scale, shift = nn.Parameter(torch.tensor(2.0)), nn.Parameter(torch.tensor(-3.0))
    optimiser = torch.optim.AdamW([*net.parameters(), scale, shift], lr=2e-3, weight_decay=1e-4)
    for step in trange(steps, desc="training cells"):
        pixels, cells, cats, bad, _ = sets[rng.integers(len(sets))]
        queries = rng.choice(len(pixels), batch, replace=False)
        logits, labels = [], []
        for i in queries:
            good = np.flatnonzero((cats == cats[i]) & ~bad)
            others = rng.choice(good[good != i], refs, replace=False)
            bank_pixels = torch.rot90(pixels[others], int(rng.integers(4)), (2, 3))  # the bank's views
            feats = net(torch.cat([pixels[i : i + 1], bank_pixels]))
            query, bank = feats[0].reshape(-1, feats.shape[-1]), feats[1:].reshape(-1, feats.shape[-1])
            distance = (1 - (query @ bank.T).amax(1)).clamp_min(LOG_FLOOR)
            logits.append(scale * (distance.log() - shift))
            labels.append(cells[i].flatten())
        logits, labels = torch.cat(logits), torch.cat(labels)
        keep = labels >= 0
        positive = (labels[keep] == 1).float()
        weight = torch.where(positive == 1, (1 - positive.mean()) / positive.mean().clamp_min(1e-3), 1.0)
        loss = F.binary_cross_entropy_with_logits(logits[keep], positive, weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for group in optimiser.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
        losses.append(loss.item())
    return losses


def judged(cells: torch.Tensor, cats, bad, kinds, shots: int, seeds: int) -> dict[str, float]:
    """AUROC of the kNN patch memory, overall and per defect kind, mean over seeds."""
    runs = []
    for seed in range(seeds):
        rng, y, score, kind = np.random.default_rng(seed), [], [], []
        for cat in sorted(set(cats)):
            support = rng.choice(np.flatnonzero((cats == cat) & ~bad), shots, replace=False)
            queries = [i for i in np.flatnonzero(cats == cat) if i not in support]
            bank = cells[support].reshape(-1, cells.shape[-1])
            score += patch_distances(cells[queries].flatten(1, 2), bank, cells.shape[1]).amax(1).tolist()
            y += bad[queries].tolist()
            kind += kinds[queries].tolist()
        y, score, kind = np.array(y), np.array(score), np.array(kind)
        row = {"all": roc_auc_score(y, score)}
        row.update({k: roc_auc_score(y[~y | (kind == k)], score[~y | (kind == k)]) for k in sorted(set(kind[y]))})
        runs.append(row)
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def weight_free(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight-free cells the model compares, on the whole photo as one tile: name -> `(n, g, g, C)` unit."""
    n, side = len(pixels), pixels.shape[-1] // CELL
    dct = KensaVLDCTEncoder({"patch_size": CELL, "luma_coefficients": 36, "chroma_coefficients": 3})
    bands = KensaVLBandPassEncoder({"patch_size": CELL, "sigmas": [6.0, 12.0]})  # 3 and 6 px of a 112 px tile
    return {name: F.normalize(enc(pixels).view(n, side, side, -1), dim=-1) for name, enc in
            (("DCT cells", dct), ("band-pass cells", bands))}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="append", required=True, help="a KensaSynth folder to train on")
    parser.add_argument("--data", action="append", required=True, help="a KensaSynth folder to judge on")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net, start = CellNet(args.dim), time.time()
    losses = train(net, [load(folder, "train") for folder in args.train], args.steps)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s; loss {np.mean(losses[:50]):.3f} -> "
          f"{np.mean(losses[-50:]):.3f}")  # fmt: skip
    net.eval()
    for folder in args.data:
        pixels, _, cats, bad, kinds = load(folder, "validation")
        with torch.no_grad():
            encoders = {**weight_free(pixels), "learnt cells": torch.cat([net(p) for p in pixels.split(64)])}
        rows = {name: judged(cells, cats, bad, kinds, args.shots, args.seeds) for name, cells in encoders.items()}
        columns = list(next(iter(rows.values())))
        print(f"\n{folder} validation, k = {args.shots}, {args.seeds} seeds: image AUROC")
        print("| cells | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
        for name, row in rows.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
