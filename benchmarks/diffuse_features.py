"""Study (issue 22): can a weight-free band-pass brightness and colour stream see the diffuse defects (smears, dents,
sheen changes, discolouration) that the DCT cells miss? Validation split only.

    python -m benchmarks.diffuse_features --model outputs/main/model --data data/kensa-surfaces

Per category and seed, the evaluator's support draw (`support_for`, k good photos) and every other photo of the
category as a query. Three training-free scores, each relative to the supports' own level (the largest leave-one-out
score among the good supports: how far this product's good photos lie from each other), so a ratio of 1 is the
threshold:

- `dct`: the kNN baseline on the model's compared encoder cells (`eval/baseline.py`, scale 1);
- `band-pass`: per photo at 224 px, log-luminance and chroma (Cb, Cr) band-passed at each scale s as
  Gaussian(s) - Gaussian(4 s), sampled every `stride` px; a query's score is the largest Euclidean distance of its
  samples to their nearest support sample (no normalisation: the size of a brightness change is the evidence);
- `max`: the larger of the two ratios; `geometric`: their geometric mean (the model's comparison averages its
  encoders' log-distances).

Prints image AUROC (overall and per defect kind) and balanced accuracy at ratio 1 for each.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

SIDE = 224


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def band_pass(image, scales=(3.0, 6.0), stride: int = 3) -> torch.Tensor:
    """`(samples, 3 * len(scales))`: band-passed log-luminance, Cb and Cr of the photo at 224 px."""
    rgb = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), np.float32) / 255
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    y = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    planes = torch.cat([torch.log(y + 0.03), 0.564 * (x[:, 2:] - y), 0.713 * (x[:, :1] - y)], 1)
    bands = torch.cat([_blur(planes, s) - _blur(planes, 4 * s) for s in scales], 1)[0]
    margin = int(4 * max(scales))  # the reflect-padded border is not seen
    return bands[:, margin:-margin:stride, margin:-margin:stride].flatten(1).T


def _score(query: torch.Tensor, bank: torch.Tensor) -> float:
    return float(torch.cdist(query, bank).amin(1).max())


def band_pass_scores(features: dict, support: list[int], queries: list[int]) -> list[float]:
    bank = torch.cat([features[i] for i in support])
    level = max(_score(features[i], torch.cat([features[j] for j in support if j != i])) for i in support)
    return [_score(features[q], bank) / level for q in queries]


def dct_scores(model, processor, items, support: list[int], queries: list[int]) -> list[float]:
    from kensa_vl.eval.baseline import PatchCore

    baseline = PatchCore(model, processor)
    baseline.set_support([items[i] for i in support])
    judged = baseline.judge([items[q]["image"] for q in queries])
    return [j.p_defective / max(1 - j.p_defective, 1e-12) for j in judged]  # score / level


def study(model, processor, items, k: int = 4, seeds: int = 3, scales=(3.0, 6.0), stride: int = 3) -> dict:
    from sklearn.metrics import roc_auc_score
    from tqdm.auto import tqdm

    from kensa_vl.eval.evaluate import pools, support_for

    rows = pools(items)
    features = {i: band_pass(items[i]["image"], scales, stride) for i in tqdm(range(len(items)), desc="band-pass")}
    records = []
    for seed in range(seeds):
        for category in tqdm(sorted(rows), desc=f"seed {seed}"):
            support, _ = support_for(rows, category, k, 0, seed)
            queries = [i for i in rows[category]["good"] + rows[category]["defective"] if i not in support]
            bands = band_pass_scores(features, support, queries)
            dct = dct_scores(model, processor, items, support, queries)
            for q, b, d in zip(queries, bands, dct, strict=True):
                records.append({"kind": items[q]["defect_type"], "dct": d, "band-pass": b, "max": max(b, d),
                                "geometric": (b * d) ** 0.5})  # fmt: skip
    bad = np.array([r["kind"] is not None for r in records])
    out = {}
    for method in ("dct", "band-pass", "max", "geometric"):
        score = np.array([r[method] for r in records])
        found = {"auroc": roc_auc_score(bad, score)}
        found["balanced_accuracy"] = ((score[bad] >= 1).mean() + (score[~bad] < 1).mean()) / 2
        for kind in sorted({r["kind"] for r in records if r["kind"]}):
            chosen = np.array([r["kind"] in (kind, None) for r in records])
            found[kind] = roc_auc_score(bad[chosen], score[chosen])
        out[method] = {key: round(float(value), 3) for key, value in found.items()}
    return out


def main(argv=None) -> None:
    from kensa_vl.eval.inspector import load_pretrained
    from kensa_vl.train.data import load_synth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a KensaSynth-format folder; its validation split is read")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scales", default="3,6", help="band-pass scales in px at 224 px")
    p.add_argument("--stride", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    model, processor = load_pretrained(a.model)
    items, _ = load_synth(a.data)
    scales = tuple(float(s) for s in a.scales.split(","))
    out = study(model, processor, items["validation"], a.shots, a.seeds, scales, a.stride)
    kinds = [key for key in out["dct"] if key not in ("auroc", "balanced_accuracy")]
    print("| score | image AUROC | balanced accuracy at ratio 1 | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for method, found in out.items():
        cells = [f"{found[key]:.3f}" for key in ("auroc", "balanced_accuracy", *kinds)]
        print(f"| {method} | " + " | ".join(cells) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": out}, f, indent=2)


if __name__ == "__main__":
    main()
