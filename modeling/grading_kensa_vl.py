"""Grading by example (官能検査): which grade of the prompt's graded examples a query's whole surface belongs to.

A graded example's label is `grade: <name>` after its image (`demos_kensa_vl.read_label`). Grading is about the
distribution of a whole surface, not its farthest patch, so an image is described by whole-image statistics
(`image_statistics`): per compared encoder, the mean and standard deviation of each channel of its raw features
over the grid tiles, and of the pixels, colour and tone (mean and spread per channel, five luminance quantiles),
fine texture (mean absolute Laplacian) and low-frequency unevenness (the spread of a local mean).

`grade_closeness` reads the examples the way the validation study found best (docs/grading.md): each statistic is
weighted by how far the grades' means lie apart against how far one grade's photos do (Fisher's ratio, the
within-grade variance shrunk toward the examples' total); the axis is the first principal direction of the grades'
weighted means (grades are ordered along one attribute; which way is not needed), and a query's closeness to a grade
is minus its distance along the axis from the grade's mean, in units of the mean gap between neighbouring grades.
`DemoPointer` turns the closenesses into the pointer over the grades and its gate, and the answer copies the
grade's label (`demos_kensa_vl.copy_terms`).

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRADE_SLOPE = 4.0  # the grade pointer's logit per grade gap at the start: one gap off is e^4 = 55 times less likely
WITHIN_SHRINK = 0.1  # the within-grade variance is shrunk by this share of the total (one example per grade has none)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
LOCAL_MEAN = 16  # pixels: the window whose mean's spread measures unevenness


def image_statistics(pixel_values: torch.Tensor, grids: dict[str, torch.Tensor], names) -> torch.Tensor:
    """One image's whole-surface statistics `(d,)` from its selected tiles' pixels `(n, 3, T, T)` (as the processor
    normalised them) and raw features (`grids`, name -> `(n, g, g, C)`; the encoders `names`, in order): each part
    divided by the square root of its length, so the pixels' few statistics weigh as much as an encoder's many."""
    parts = []
    for name in names:
        cells = grids[name].float().reshape(-1, grids[name].shape[-1])
        parts.append(torch.cat([cells.mean(0), cells.std(0, unbiased=False)]))
    pixels = pixel_values.float()
    luminance = pixels.mean(1, keepdim=True)  # (n, 1, T, T)
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=pixels.device)
    edges = F.conv2d(luminance, laplace[None, None]).abs().mean()
    window = min(LOCAL_MEAN, luminance.shape[-1])
    uneven = F.avg_pool2d(luminance, window, stride=max(1, window // 2)).std(unbiased=False)
    flat = luminance.flatten()
    sample = flat[torch.linspace(0, len(flat) - 1, min(len(flat), 65536), device=flat.device).long()]
    quantiles = torch.quantile(sample, torch.tensor(QUANTILES, device=flat.device))
    channels = pixels.transpose(0, 1).reshape(3, -1)
    parts.append(torch.cat([channels.mean(1), channels.std(1, unbiased=False), quantiles, edges[None], uneven[None]]))
    return torch.cat([p / len(p) ** 0.5 for p in parts])


def grade_axis(examples: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The direction the grades of `examples` `(n, d)` lie along (`groups` `(n,)`: each example's grade index in
    0..G-1, every grade present): (the unit axis `(d,)`, the grades' mean positions on it `(G,)`, the mean gap
    between neighbouring grades there)."""
    count = int(groups.max()) + 1
    x = examples.float()
    means = torch.stack([x[groups == g].mean(0) for g in range(count)])
    within = torch.stack([x[groups == g].var(0, unbiased=False) for g in range(count)]).mean(0)
    fisher = means.var(0, unbiased=False) / (within + WITHIN_SHRINK * x.var(0, unbiased=False) + 1e-12)
    weighted = (means - means.mean(0)) * fisher
    axis = torch.linalg.svd(weighted, full_matrices=False).Vh[0]  # the grades' direction, Fisher-weighted
    centres = means @ axis
    return axis, centres, ((centres.max() - centres.min()) / max(count - 1, 1)).clamp_min(1e-12)


def grade_closeness(query: torch.Tensor, examples: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """How close a query's statistics `(d,)` lie to each grade's examples (`grade_axis`): `(G,)`, minus the
    distance along the axis from each grade's mean, in mean grade gaps."""
    axis, centres, gap = grade_axis(examples, groups)
    return -(query.float() @ axis - centres).abs() / gap
