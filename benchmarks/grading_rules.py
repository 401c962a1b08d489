"""Which whole-image statistics and which in-context rule grade a photo best against its examples: the study that
chose the grading baseline's distance and the statistics the model's grade pointer is to read (docs/grading.md).

    python -m benchmarks.grading_rules --model outputs/main/model --data outputs/kensa-synth-224 [--seeds 3]

On the validation split's grading sets (`eval.grading.grading_sets`: 3 grades x 3 examples, limit samples shown),
per statistic and rule, the accuracy overall and per attribute. Statistics: `encoder` (the baseline's: mean and
standard deviation of each channel of the compared encoders over the grid tiles), `pixel` (RGB mean and standard
deviation, five luminance percentiles, mean absolute Laplacian, spread of a 16 px local mean) and `both` (each part
divided by the square root of its length). Rules over the examples' statistics:

- `plain`: the grade whose examples' mean is nearest (L2); `scaled`: each channel divided by its spread over the
  examples; `fisher`: each channel weighted by its between-grade over within-grade variance;
- `axis`: project onto the grade-mean difference from the first to the last grade, Fisher-weighted, and take the
  grade whose examples' mean projection is nearest; `axis-limits`: the same projection cut at the limit samples'.

Reads only the validation split.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm.auto import tqdm

from kensa_vl.eval.grading import PooledNearest, grading_sets
from kensa_vl.eval.inspector import load_pretrained
from kensa_vl.eval.measure import machine
from kensa_vl.modeling.grading_kensa_vl import grade_closeness
from kensa_vl.train.data import load_grading


def pixel_statistics(image) -> np.ndarray:
    from scipy import ndimage

    rgb = np.asarray(image.convert("RGB"), np.float32) / 255
    luminance = rgb.mean(-1)
    return np.concatenate([
        rgb.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).std(0), np.percentile(luminance, [5, 25, 50, 75, 95]),
        [np.abs(ndimage.laplace(luminance)).mean(), ndimage.uniform_filter(luminance, 16).std()],
    ])  # fmt: skip


def rules(x: np.ndarray, grades: np.ndarray, limits: np.ndarray, q: np.ndarray) -> dict[str, np.ndarray]:
    """Each rule's grade for queries `q` `(m, d)` from examples `x` `(n, d)` of `grades` (limit samples flagged)."""
    n = grades.max() + 1
    means = np.stack([x[grades == g].mean(0) for g in range(n)])
    within = np.mean([x[grades == g].var(0) for g in range(n)], 0) + 1e-8
    fisher = means.var(0) / within
    squared = (q[:, None] - means[None]) ** 2
    axis = (means[-1] - means[0]) * fisher
    axis /= np.linalg.norm(axis) + 1e-12
    along, shown = (q - means[0]) @ axis, (x - means[0]) @ axis
    centres = np.array([shown[grades == g].mean() for g in range(n)])
    cuts = [shown[(grades == g) & limits].mean() for g in range(n - 1)]
    return {
        "plain": squared.sum(-1).argmin(1),
        "scaled": (squared / (x.var(0) + 1e-8)).sum(-1).argmin(1),
        "fisher": (squared * fisher).sum(-1).argmin(1),
        "axis": np.abs(along[:, None] - centres[None]).argmin(1),
        "axis-limits": (along[:, None] > np.array(cuts)[None]).sum(1),
    }


@torch.no_grad()
def model_statistics(model, processor, image) -> torch.Tensor:
    """`grading_kensa_vl.image_statistics` of one image, on its grid tiles as the model sees them."""
    from kensa_vl.modeling.comparison_kensa_vl import scored_tiles, thumbnail_tiles
    from kensa_vl.modeling.grading_kensa_vl import image_statistics

    batch = processor.image_processor([image.convert("RGB")], return_tensors="pt")
    names = model.config.reference_encoder_names()
    grids = model.model.image_grids(batch["pixel_values"], names)
    selected = scored_tiles(thumbnail_tiles(batch["image_grid"]))
    return image_statistics(batch["pixel_values"][selected], {n: g[selected] for n, g in grids.items()}, names)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    model, processor = load_pretrained(args.model)
    items = load_grading(args.data)[0]["validation"]
    baseline, limits, cache = PooledNearest(model, processor), items["limit"], {}

    def statistics(row: int) -> dict[str, np.ndarray]:
        if row not in cache:
            encoder = torch.cat(list(baseline.statistics(items[row]["image"]).values())).numpy()
            pixel = pixel_statistics(items[row]["image"])
            both = np.concatenate([encoder / len(encoder) ** 0.5, pixel / len(pixel) ** 0.5])
            cache[row] = {"encoder": encoder, "pixel": pixel, "both": both,
                          "model": model_statistics(model, processor, items[row]["image"])}  # fmt: skip
        return cache[row]

    hits = {}
    for chosen in tqdm(grading_sets(items, args.seeds), desc="grading sets"):
        truth = np.array([g for _, g in chosen["queries"]])
        for name in ("encoder", "pixel", "both"):
            x = np.stack([statistics(i)[name] for i in chosen["support"]])
            q = np.stack([statistics(i)[name] for i, _ in chosen["queries"]])
            flags = np.array([limits[i] for i in chosen["support"]])
            for rule, predicted in rules(x, np.array(chosen["grades"]), flags, q).items():
                hits.setdefault((name, rule), {}).setdefault(chosen["attribute"], []).extend(predicted == truth)
        examples = torch.stack([statistics(i)["model"] for i in chosen["support"]])
        groups = torch.tensor(chosen["grades"])
        predicted = [
            int(grade_closeness(statistics(i)["model"], examples, groups).argmax()) for i, _ in chosen["queries"]
        ]
        hits.setdefault(("model", "grade_closeness"), {}).setdefault(chosen["attribute"], []).extend(
            np.array(predicted) == truth)  # fmt: skip
    attributes = sorted({a for by in hits.values() for a in by})
    print(f"validation grading, 3 grades x 3 examples, {args.seeds} seeds; {machine()}")
    print("| statistics | rule | accuracy | " + " | ".join(attributes) + " |")
    print("|---|---|---|" + "---|" * len(attributes))
    for (name, rule), by in hits.items():
        cells = " | ".join(f"{np.mean(by[a]):.2f}" for a in attributes)
        print(f"| {name} | {rule} | {np.mean(np.concatenate(list(by.values()))):.3f} | {cells} |")


if __name__ == "__main__":
    main()
