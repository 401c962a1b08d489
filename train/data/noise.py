"""Noise fields for materials and defect masks (numpy + PIL, float32, values roughly in [0, 1])."""

from __future__ import annotations

import numpy as np
from PIL import Image


def upsample(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a 2-D float field (PIL's C resampler: far faster than scipy at 1024² and above)."""
    return np.asarray(Image.fromarray(field.astype(np.float32)).resize((width, height), Image.BICUBIC))


def fractal(rng: np.random.Generator, height: int, width: int, base: int = 4, octaves: int = 5, gain: float = 0.5):
    """Fractal value noise: random lattices of `base * 2**o` cells, upsampled and summed with weight `gain**o`."""
    total, norm = np.zeros((height, width), np.float32), 0.0
    for octave in range(octaves):
        cells = base * 2**octave
        side = max(height, width)
        lattice = rng.random((max(2, cells * height // side) + 1, max(2, cells * width // side) + 1))
        total += gain**octave * upsample(lattice, height, width)
        norm += gain**octave
    return np.clip(total / norm, 0.0, 1.0)


def perlin(rng: np.random.Generator, height: int, width: int, res_y: int, res_x: int) -> np.ndarray:
    """Perlin gradient noise with `res_y x res_x` lattice cells over the field, in [-1, 1] (about ±0.7 in practice)."""
    angles = rng.uniform(0, 2 * np.pi, (res_y + 1, res_x + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    y = np.linspace(0, res_y, height, endpoint=False, dtype=np.float32)[:, None]
    x = np.linspace(0, res_x, width, endpoint=False, dtype=np.float32)[None, :]
    yi, xi = y.astype(int), x.astype(int)
    fy, fx = y - yi, x - xi

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[yi + dy, xi + dx]  # (H, W, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (top * (1 - v) + bottom * v).astype(np.float32)


def blur(field: np.ndarray, factor: int) -> np.ndarray:
    """Cheap smoothing: shrink by `factor` and grow back (box-filter quality is enough for shading)."""
    h, w = field.shape[:2]
    small = Image.fromarray(field.astype(np.float32)).resize((max(1, w // factor), max(1, h // factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BICUBIC))
