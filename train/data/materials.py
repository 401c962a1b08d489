"""KensaSynth materials: real textures bundled with scikit-image, procedural surfaces and drawn products.

A material draws one large *master* (a production line's product); every sample is a different photo of it
(`view`): another crop, rotation, scale, lighting gradient, colour cast and sensor noise. A good query is
therefore never a copy of a support image, and all variation between good images is nuisance, not defect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .noise import blur, fractal, upsample
from .surfaces import MARGIN, SURFACES, WHEELS
from .surfaces import draw as surface_draw


@dataclass(frozen=True)
class Material:
    name: str
    noun: str  # how a description names it ("wood panel")
    source: str  # "scikit-image", "procedural" or "drawn"
    draw: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray | None]]
    max_rotation: float  # degrees a photo may be turned
    margin: float = 2.0  # master side / output side: room for crops and rotations
    realism: bool = False  # photographed like a real part: slight perspective, focus and JPEG quality vary


def ramp(field: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """Map a [0, 1] field through a colour ramp → (H, W, 3) float32 in [0, 1]."""
    stops = np.linspace(0, 1, len(colors))
    table = np.asarray(colors, np.float32) / 255.0
    return np.stack([np.interp(field, stops, table[:, c]) for c in range(3)], -1).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float32) / size
    return axis[:, None], axis[None, :]


def _skimage(name: str, colors: list[tuple[int, int, int]], zoom: float):
    def draw(rng: np.random.Generator, size: int):
        from skimage import data

        gray = getattr(data, name)().astype(np.float32) / 255.0  # 512x512, CC0, shipped inside the wheel
        reps = math.ceil(size / (gray.shape[0] * zoom)) + 1
        tiled = np.pad(gray, [(0, gray.shape[0] * (reps - 1))] * 2, mode="symmetric")
        side = int(tiled.shape[0] * zoom)
        big = upsample(tiled, side, side)[:size, :size]
        tint = 0.9 + 0.2 * fractal(rng, size, size, base=2, octaves=3)
        return ramp(np.clip(big * tint, 0, 1), colors), None

    return draw


def wood(rng, size):
    y, x = _grid(size)
    warp = fractal(rng, size, size, base=2, octaves=3)
    rings = (x * 18 + warp * 5 + 0.3 * y) % 1.0
    grain = upsample(rng.random((8, size // 4)), size, size)  # long vertical fibres
    field = 0.55 * rings**3 + 0.3 * grain + 0.15 * fractal(rng, size, size, base=16, octaves=3)
    return ramp(field, [(122, 78, 42), (170, 118, 70), (205, 160, 105), (225, 190, 135)]), None


def brushed_metal(rng, size):
    streaks = upsample(rng.random((size // 2, 12)), size, size)  # fine horizontal brushing
    sheen = fractal(rng, size, size, base=2, octaves=2)
    field = 0.45 * streaks + 0.4 * sheen + 0.15 * rng.random((size, size), np.float32)
    return ramp(field, [(105, 110, 118), (160, 165, 172), (205, 208, 214)]), None


def fabric(rng, size):
    period = size / 160
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / period
    warp_on_top = (np.floor(xx) + np.floor(yy)) % 2 == 0
    across = np.where(warp_on_top, np.sin(np.pi * (xx % 1)), np.sin(np.pi * (yy % 1)))
    threads = upsample(rng.random((size // 8, size // 8)), size, size)
    field = 0.6 * across + 0.25 * threads + 0.15 * fractal(rng, size, size, base=3, octaves=2)
    return ramp(np.clip(field, 0, 1), [(30, 45, 80), (55, 80, 130), (110, 135, 180)]), None


def paper(rng, size):
    canvas = Image.fromarray((fractal(rng, size, size, base=8, octaves=5) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(size // 3):  # loose fibres
        x, y, angle = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        length = rng.uniform(0.01, 0.04) * size
        shade = int(rng.uniform(40, 160))
        draw.line([(x, y), (x + length * np.cos(angle), y + length * np.sin(angle))], fill=shade, width=1)
    field = 0.5 + 0.45 * (np.asarray(canvas, np.float32) / 255.0 - 0.5)
    return ramp(field, [(200, 195, 180), (238, 235, 225), (250, 249, 244)]), None


def marble(rng, size):
    y, x = _grid(size)
    turbulence = fractal(rng, size, size, base=3, octaves=6)
    veins = np.abs(np.sin((x * 3 + y * 2 + turbulence * 4) * np.pi)) ** 0.35
    return ramp(veins * 0.85 + 0.15 * turbulence, [(95, 95, 105), (180, 178, 182), (236, 234, 230)]), None


def leather(rng, size):
    from scipy import ndimage

    cell = max(6, size // 90)
    points = np.zeros((size, size), bool)
    count = int(0.6 * (size / cell) ** 2)
    points[rng.integers(0, size, count), rng.integers(0, size, count)] = True
    dist = ndimage.distance_transform_edt(~points).astype(np.float32)
    pebbles = np.clip(dist / cell, 0, 1) ** 0.7
    field = 0.55 * (1 - pebbles) + 0.3 * fractal(rng, size, size, base=4, octaves=3) + 0.15
    return ramp(np.clip(field, 0, 1), [(60, 35, 20), (110, 70, 40), (150, 105, 65)]), None


def tiles(rng, size):
    count = 6
    cell = size / count
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / cell
    grout = np.minimum(np.minimum(xx % 1, 1 - xx % 1), np.minimum(yy % 1, 1 - yy % 1)) < 0.03
    tone = rng.uniform(0.6, 0.8, (count + 1, count + 1))[yy.astype(int), xx.astype(int)]
    field = np.where(grout, 0.15, tone + 0.1 * fractal(rng, size, size, base=6, octaves=3))
    return ramp(field, [(70, 70, 70), (150, 170, 175), (225, 235, 235)]), None


def concrete(rng, size):
    pores = blur((rng.random((size, size)) < 0.004).astype(np.float32), 2) > 0.08
    field = 0.7 * fractal(rng, size, size, base=6, octaves=6) + 0.3 * rng.random((size, size), np.float32)
    return ramp(np.where(pores, 0.1, field), [(80, 80, 78), (150, 148, 142), (190, 188, 182)]), None


def _backdrop(rng, size, colors):
    return ramp(0.4 + 0.3 * fractal(rng, size, size, base=4, octaves=4), colors)


def _metal_shade(rng, size, light: np.ndarray) -> np.ndarray:
    """Grey metal lit by `light` (a [0, 1] field), with faint machining noise."""
    return ramp(
        np.clip(0.75 * light + 0.25 * fractal(rng, size, size, base=24, octaves=2), 0, 1),
        [(70, 72, 78), (150, 152, 158), (225, 226, 230)],
    )


def screw(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = 0.05
    cy, x0, x1, tip = 0.5, 0.34, 0.66, 0.72
    shaft = (np.abs(yy - cy) < r) & (xx > x0) & (xx < x1)
    point = (xx >= x1) & (xx < tip) & (np.abs(yy - cy) < r * (tip - xx) / (tip - x1))
    head = (np.abs(yy - cy) < 2.2 * r) & (xx > x0 - 0.05) & (xx <= x0)
    across = np.clip(1 - ((yy - cy) / (2.2 * r)) ** 2, 0, 1)
    threads = ((xx + 0.4 * (yy - cy)) / 0.018) % 1.0
    light = np.where(head, 0.4 + 0.6 * across, 0.25 + 0.5 * across * (0.5 + 0.5 * np.sin(2 * np.pi * threads)))
    fg = shaft | point | head
    return np.where(
        fg[..., None], _metal_shade(rng, size, light), _backdrop(rng, size, [(40, 60, 45), (70, 95, 75)])
    ), fg


def nut(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    radius, angle = np.hypot(xx, yy), np.arctan2(yy, xx)
    hex_radius = 0.2 * np.cos(np.pi / 6) / np.cos((angle % (np.pi / 3)) - np.pi / 6)
    fg = (radius < hex_radius) & (radius > 0.09)
    light = 0.55 + 0.35 * np.cos(angle - 0.8) * np.clip(radius / 0.2, 0, 1) + 0.1 * (radius < 0.16)
    background = _backdrop(rng, size, [(30, 30, 34), (60, 60, 66)])
    return np.where(fg[..., None], _metal_shade(rng, size, np.clip(light, 0, 1)), background), fg


def cap(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    radius, angle = np.hypot(xx, yy), np.arctan2(yy, xx)
    fg = radius < 0.25
    rim = (radius > 0.22) * (0.5 + 0.5 * np.sin(angle * 90))
    dome = 1 - (radius / 0.25) ** 2
    ring = np.abs(radius - 0.15) < 0.005
    field = np.clip(0.35 + 0.45 * dome - 0.25 * rim - 0.2 * ring + 0.1 * fractal(rng, size, size, 16, 2), 0, 1)
    plastic = ramp(field, [(90, 10, 15), (180, 30, 35), (240, 90, 90)])
    return np.where(fg[..., None], plastic, _backdrop(rng, size, [(200, 200, 195), (235, 235, 230)])), fg


def pcb(rng, size):
    board = Image.fromarray(
        (ramp(0.5 + 0.2 * fractal(rng, size, size, 8, 3), [(10, 70, 35), (30, 120, 60)]) * 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(board)
    unit = size / 100
    for _ in range(60):  # copper traces, Manhattan routing
        x, y = rng.uniform(5, 95, 2) * unit
        points = [(x, y)]
        for _ in range(int(rng.integers(2, 5))):
            x, y = (x + rng.uniform(-25, 25) * unit, y) if rng.random() < 0.5 else (x, y + rng.uniform(-25, 25) * unit)
            points.append((float(np.clip(x, 3 * unit, 97 * unit)), float(np.clip(y, 3 * unit, 97 * unit))))
        draw.line(points, fill=(60, 150, 80), width=max(1, int(0.6 * unit)), joint="curve")
        for px, py in (points[0], points[-1]):
            draw.ellipse([px - unit, py - unit, px + unit, py + unit], fill=(205, 170, 80))
    for _ in range(6):  # chips with pins and silkscreen outlines
        w, h = rng.uniform(8, 20, 2) * unit
        x, y = rng.uniform(5, 95 - w / unit) * unit, rng.uniform(5, 95 - h / unit) * unit
        draw.rectangle(
            [x - unit, y - unit, x + w + unit, y + h + unit], outline=(235, 235, 230), width=max(1, int(unit / 3))
        )
        for px in np.arange(x + unit, x + w - unit, 1.6 * unit):
            draw.rectangle([px, y - 0.8 * unit, px + 0.7 * unit, y + h + 0.8 * unit], fill=(190, 190, 195))
        draw.rectangle([x, y, x + w, y + h], fill=(25, 25, 28))
    return np.asarray(board, np.float32) / 255.0, None


MATERIALS: dict[str, Material] = {
    m.name: m
    for m in [
        Material(
            "brick",
            "brick wall",
            "scikit-image",
            _skimage("brick", [(70, 30, 20), (150, 70, 45), (215, 150, 110)], 1.5),
            8,
        ),
        Material(
            "grass",
            "grass turf",
            "scikit-image",
            _skimage("grass", [(20, 45, 10), (70, 120, 35), (175, 200, 90)], 1.5),
            180,
        ),
        Material(
            "gravel",
            "gravel bed",
            "scikit-image",
            _skimage("gravel", [(45, 40, 35), (125, 115, 100), (215, 205, 190)], 1.5),
            180,
        ),
        Material("wood", "wood panel", "procedural", wood, 6),
        Material("metal", "brushed metal plate", "procedural", brushed_metal, 6),
        Material("fabric", "woven fabric", "procedural", fabric, 4),
        Material("paper", "paper sheet", "procedural", paper, 180),
        Material("marble", "marble slab", "procedural", marble, 20),
        Material("leather", "leather hide", "procedural", leather, 180),
        Material("tiles", "tiled surface", "procedural", tiles, 4),
        Material("concrete", "concrete slab", "procedural", concrete, 180),
        Material("screw", "screw", "drawn", screw, 180, margin=1.6),
        Material("nut", "hex nut", "drawn", nut, 180, margin=1.6),
        Material("cap", "bottle cap", "drawn", cap, 180, margin=1.6),
        Material("pcb", "circuit board", "drawn", pcb, 3, margin=1.6),
    ]
}


REAL_MATERIALS: dict[str, Material] = {
    name: Material(name, " ".join(noun), f"photo ({WHEELS[name.split('-')[0]].package}, "
                   f"{WHEELS[name.split('-')[0]].licence})", surface_draw(name), float(turn), MARGIN, realism=True)
    for name, (_, _, *noun, turn) in SURFACES.items()
}  # fmt: skip


def material(name: str) -> Material:
    """A KensaSynth material or a real surface (`surfaces.py`) by name."""
    if name not in MATERIALS and name not in REAL_MATERIALS:
        raise KeyError(f"unknown material {name!r}; known: {list(MATERIALS)} and {len(REAL_MATERIALS)} real surfaces")
    return MATERIALS.get(name) or REAL_MATERIALS[name]


def noun(name: str, default: str | None = None) -> str:
    """How a description names material `name`; `default` (else the name itself) for a category of another dataset."""
    known = MATERIALS.get(name) or REAL_MATERIALS.get(name)
    return known.noun if known else default or name


def master(name: str, seed: int, resolution: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The product every photo of `name` shows: uint8 RGB (margin·res)² and its foreground mask (None = all)."""
    index = list(MATERIALS).index(name) if name in MATERIALS else len(MATERIALS) + list(SURFACES).index(name)
    rng = np.random.default_rng([seed, index, 7])
    rgb, fg = material(name).draw(rng, int(resolution * material(name).margin))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8), fg


PERSPECTIVE = 0.08  # realism: the most a tilted camera changes the scale across the photo (w in 1 +- 0.08)
FOCUS = 1.2  # realism: the most defocus blur, Gaussian sigma in pixels at 1024 px
JPEG = (72, 96)  # realism: JPEG quality drawn from this range


def view(name: str, product: np.ndarray, fg: np.ndarray | None, resolution: int, rng: np.random.Generator,
         lighting: float = 1.0, zoom: float = 1.0):  # fmt: skip
    """One photo of the product: crop, rotation, scale and position, then lighting, colour cast and sensor noise.

    `lighting` scales how far gain, gamma, gradient, vignetting and colour cast stray from neutral (a light booth:
    under 1); `zoom` magnifies the product (over 1: its pattern looks coarser). The defaults give the inspection
    photos. Returns float32 RGB (res, res, 3) in [0, 1], the foreground mask (bool) and the view parameters.
    """
    surface = material(name)
    side = product.shape[0]
    angle = float(rng.uniform(-surface.max_rotation, surface.max_rotation))
    scale = float(rng.uniform(0.92, 1.08)) * zoom
    tilt = rng.uniform(-PERSPECTIVE, PERSPECTIVE, 2) / resolution if surface.realism else np.zeros(2)
    reach = side / 2 - resolution * math.sqrt(2) / 2 / scale / (1 - PERSPECTIVE * surface.realism)  # centre's leeway
    shift = rng.uniform(-1, 1, 2) * max(0.0, min(reach, 0.05 * resolution if surface.source == "drawn" else reach))
    cos, sin = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
    cx, cy = side / 2 + shift[0], side / 2 + shift[1]
    c = resolution / 2
    affine = (cos, -sin, cx - cos * c + sin * c, sin, cos, cy - sin * c - cos * c)
    transform = (Image.AFFINE, affine)
    if surface.realism:  # output (x, y) -> product (cx, cy) + R((x, y) - c) / w, w = 1 + tilt . ((x, y) - c)
        (g, h), w0 = tilt, 1 - tilt.sum() * c
        perspective = [cos + cx * g, -sin + cx * h, cx * w0 - (cos - sin) * c,
                       sin + cy * g, cos + cy * h, cy * w0 - (sin + cos) * c, g, h]  # fmt: skip
        transform = (Image.PERSPECTIVE, tuple(float(v / w0) for v in perspective))
    image = Image.fromarray(product).transform((resolution, resolution), *transform, Image.BILINEAR)
    mask = None
    if fg is not None:
        mask = Image.fromarray(fg).transform((resolution, resolution), *transform, Image.NEAREST)
        mask = np.asarray(mask, bool)
    rgb = np.asarray(image, np.float32) / 255.0
    y, x = _grid(resolution)
    gain = 1 + lighting * (float(rng.uniform(0.85, 1.12)) - 1)
    gamma = 1 + lighting * (float(rng.uniform(0.9, 1.1)) - 1)
    gx, gy = lighting * rng.uniform(-0.12, 0.12, 2)
    vignette = lighting * rng.uniform(0, 0.25)
    light = gain * (1 + gx * (x - 0.5) + gy * (y - 0.5) - vignette * ((x - 0.5) ** 2 + (y - 0.5) ** 2))
    cast = (1 + lighting * (rng.uniform(0.96, 1.04, 3) - 1)).astype(np.float32)
    rgb = np.clip(rgb**gamma * light[..., None] * cast, 0, 1).astype(np.float32)
    params = {"angle": round(angle, 2), "scale": round(scale, 3), "shift": [round(float(s), 1) for s in shift]}
    params.update(
        {"gain": round(gain, 3), "gamma": round(gamma, 3), "noise": round(float(rng.uniform(0.004, 0.015)), 4)}
    )
    if surface.realism:  # focus and compression vary from photo to photo
        focus = float(rng.uniform(0, FOCUS)) * resolution / 1024
        params.update(tilt=[round(float(t) * resolution, 3) for t in tilt], focus=round(focus, 2),
                      jpeg=int(rng.integers(*JPEG)))  # fmt: skip
    return rgb, (mask if mask is not None else np.ones((resolution, resolution), bool)), params


def finish(rgb: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """Focus blur, sensor noise and quantisation, applied after any defect: a defect is photographed like the rest."""
    if params.get("focus", 0) > 0:
        from scipy import ndimage

        rgb = ndimage.gaussian_filter(rgb, (params["focus"], params["focus"], 0))
    noisy = rgb + rng.normal(0, params["noise"], rgb.shape).astype(np.float32)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)
