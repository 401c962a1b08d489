"""KensaSynth defect generators (scratch, stain, crack, hole, DRAEM contamination, CutPaste/scar, MemSeg shuffle).

Each generator takes a float RGB photo, the product's foreground and a target defect area in pixels, and returns
the defective photo, the defect's alpha (float, where it changed the image) and metadata a description is written
from. `apply_defect` places it on the product, cleans the mask and measures boxes, area and contrast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .noise import perlin

# Defect area as a fraction of the image. "tiny" (0.05–0.2%) vanishes in a 448-px thumbnail of a 1024-px photo.
SIZES = {"tiny": (0.0005, 0.002), "small": (0.002, 0.01), "medium": (0.01, 0.03), "large": (0.03, 0.08)}
MIN_COMPONENT_PX = 6  # smaller specks (anti-aliasing leftovers) are removed from the mask, not boxed
GROUP_PX = 3  # components closer than this are one defect with one box
TRIES = 20  # placements tried before a defect is declared impossible on this photo


@dataclass(frozen=True)
class Defect:
    name: str
    make: Callable[..., tuple[np.ndarray, np.ndarray, dict]]
    template: str  # one sentence; formatted with the metadata, `position` and `noun`
    min_contrast: float = 0.03  # mean absolute change inside the mask below which a placement is retried


def _stroke(res: int, points: list, width: int) -> np.ndarray:
    canvas = Image.new("L", (res, res), 0)
    ImageDraw.Draw(canvas).line([(float(x), float(y)) for x, y in points], fill=255, width=width, joint="curve")
    return np.asarray(canvas, np.float32) / 255.0


def _blob(res: int, center, radius: float, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """An irregular disc: the radius is modulated by Perlin noise; soft one-pixel edge."""
    alpha = np.zeros((res, res), np.float32)
    half = int(radius * (1 + wobble) + 3)
    y0, x0 = max(0, int(center[1]) - half), max(0, int(center[0]) - half)
    y1, x1 = min(res, int(center[1]) + half), min(res, int(center[0]) + half)
    if y1 <= y0 or x1 <= x0:
        return alpha
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.hypot(xx - center[0], yy - center[1])
    bumps = perlin(rng, y1 - y0, x1 - x0, 3, 3)
    alpha[y0:y1, x0:x1] = np.clip(radius * (1 + wobble * bumps) - dist, 0, 1)
    return alpha


def _thin(area: float, res: int, rng: np.random.Generator) -> tuple[float, int]:
    """Length and width of a line-like defect covering about `area` pixels: longer first, wider when it must be."""
    length = min(math.sqrt(area) * rng.uniform(4, 9), 0.9 * res)
    return length, int(np.clip(round(area / length), 1, max(2, res // 40)))  # a large scratch is a gouge


def _blend(rgb: np.ndarray, alpha: np.ndarray, color) -> np.ndarray:
    return rgb * (1 - alpha[..., None]) + np.asarray(color, np.float32) * alpha[..., None]


def scratch(rgb, fg, area, center, rng, res, **_):
    length, width = _thin(area, res, rng)
    angle = rng.uniform(0, np.pi)
    direction, normal = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    bend = rng.uniform(-0.2, 0.2) * length
    t = np.linspace(-0.5, 0.5, 32)[:, None]
    points = center + t * length * direction + (1 - 4 * t**2) * bend * normal  # a gently curved stroke
    local = rgb[int(center[1]), int(center[0])].mean()
    bright = rng.random() < (0.2 if local > 0.6 else 0.8)  # mostly the tone that shows on this surface
    alpha = _stroke(res, points, width) * rng.uniform(0.5, 0.9)
    meta = {"length_px": round(length), "width_px": width, "tone": "bright" if bright else "dark"}
    return _blend(rgb, alpha, (0.97, 0.97, 0.95) if bright else (0.08, 0.07, 0.06)), alpha, meta


STAINS = {"oil": (0.18, 0.15, 0.08), "rust": (0.55, 0.25, 0.08), "ink": (0.1, 0.12, 0.35), "dust": (0.75, 0.72, 0.65)}


def stain(rgb, fg, area, center, rng, res, **_):
    kind = str(rng.choice(list(STAINS)))
    radius = math.sqrt(area / math.pi)
    alpha = _blob(res, center, radius, rng, 0.35) * rng.uniform(0.45, 0.85)
    return _blend(rgb, alpha, STAINS[kind]), alpha, {"kind": kind, "diameter_px": round(2 * radius)}


def crack(rgb, fg, area, center, rng, res, **_):
    total, width = _thin(area, res, rng)
    branches = int(rng.integers(0, 3))
    alpha = np.zeros((res, res), np.float32)
    heading, trunk = rng.uniform(0, 2 * np.pi), None
    for branch in range(branches + 1):
        length = total / (branches + 1)
        start = center if trunk is None else trunk[len(trunk) // 2]  # branches fork off the trunk's middle
        angle = heading if branch == 0 else heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        steps = max(4, int(length / (6 * res / 1024)))
        turns = np.cumsum(rng.normal(0, 0.35, steps)) * 0.5 + angle  # a jagged random walk
        step = length / steps
        points = np.cumsum(np.stack([np.cos(turns), np.sin(turns)], 1) * step, 0) + start
        points = np.vstack([start, points]).clip(0, res - 1)
        alpha = np.maximum(alpha, _stroke(res, points, width))
        trunk = points if trunk is None else trunk
    alpha *= rng.uniform(0.7, 0.95)
    return rgb * (1 - 0.85 * alpha[..., None]), alpha, {"length_px": round(total), "branches": branches}


def hole(rgb, fg, area, center, rng, res, **_):
    radius = math.sqrt(area / math.pi)
    alpha = _blob(res, center, radius, rng, 0.2)
    yy = np.arange(res, dtype=np.float32)[:, None]
    shadow = np.clip(0.05 + 0.12 * (yy - center[1] + radius) / (2 * radius + 1), 0.03, 0.2)  # lit from below
    return rgb * (1 - alpha[..., None]) + (shadow * alpha)[..., None], alpha, {"diameter_px": round(2 * radius)}


def contamination(rgb, fg, area, center, rng, res, foreign=None, **_):
    """DRAEM: a thresholded Perlin mask blends a foreign texture A as I(1-M) + (1-b)AM + bIM."""
    side = int(min(res, math.sqrt(area / 0.35)))
    y0 = int(np.clip(center[1] - side / 2, 0, res - side))
    x0 = int(np.clip(center[0] - side / 2, 0, res - side))
    scale = 2 ** int(rng.integers(1, 4))
    noise = perlin(rng, side, side, scale, scale)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    window = np.clip(1.5 - 3 * np.hypot(xx, yy), 0, 1)  # keeps the blot local: fades out before the square's edge
    local = ((noise * 2 + 0.35) * window > 0.35).astype(np.float32)
    alpha = np.zeros((res, res), np.float32)
    alpha[y0 : y0 + side, x0 : x0 + side] = local
    if foreign is None:
        source, foreign_name = np.stack([perlin(rng, res, res, 16, 16) * 0.5 + 0.5] * 3, -1), "noise"
    else:
        source, foreign_name = foreign
    beta = rng.uniform(0.0, 0.6)
    mixed = rgb * (1 - alpha[..., None]) + ((1 - beta) * source + beta * rgb) * alpha[..., None]
    return mixed, alpha * (1 - beta), {"foreign": foreign_name, "extent_px": side}


def cutpaste(rgb, fg, area, center, rng, res, **_):
    """CutPaste: a patch from elsewhere, colour-jittered and pasted here; the scar variant is a thin rotated strip."""
    scar = rng.random() < 0.5
    aspect = rng.uniform(8, 20) if scar else rng.uniform(0.3, 3.3)
    h = max(2, round(math.sqrt(area / aspect)))
    w = max(2, min(res // 2, round(h * aspect)))
    sy, sx = int(rng.integers(0, res - h)), int(rng.integers(0, res - w))
    patch = rgb[sy : sy + h, sx : sx + w] * rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, 3)
    angle = float(rng.uniform(0, 180))
    rotated = Image.fromarray((np.clip(patch, 0, 1) * 255).astype(np.uint8)).rotate(angle, Image.BILINEAR, expand=True)
    shape = Image.new("L", (w, h), 255).rotate(angle, Image.NEAREST, expand=True)
    ph, pw = rotated.size[1], rotated.size[0]
    y0 = int(np.clip(center[1] - ph / 2, 0, res - ph))
    x0 = int(np.clip(center[0] - pw / 2, 0, res - pw))
    alpha = np.zeros((res, res), np.float32)
    alpha[y0 : y0 + ph, x0 : x0 + pw] = np.asarray(shape, np.float32) / 255.0
    canvas = rgb.copy()
    canvas[y0 : y0 + ph, x0 : x0 + pw] = np.asarray(rotated, np.float32) / 255.0
    out = rgb * (1 - alpha[..., None]) + canvas * alpha[..., None]
    return out, alpha, {"variant": "scar" if scar else "patch", "size_px": f"{w}x{h}"}


def structure(rgb, fg, area, center, rng, res, **_):
    """MemSeg: a square region replaced by a grid-shuffled copy of itself."""
    cells = int(rng.integers(2, 5))
    side = max(cells * 2, int(math.sqrt(area)) // cells * cells)
    y0 = int(np.clip(center[1] - side / 2, 0, res - side))
    x0 = int(np.clip(center[0] - side / 2, 0, res - side))
    step = side // cells
    region = rgb[y0 : y0 + side, x0 : x0 + side]
    blocks = [region[r * step : (r + 1) * step, c * step : (c + 1) * step] for r in range(cells) for c in range(cells)]
    order = rng.permutation(len(blocks))
    while np.all(order == np.arange(len(blocks))):
        order = rng.permutation(len(blocks))
    turns = rng.integers(0, 4, len(blocks))
    rows = [
        np.concatenate([np.rot90(blocks[i], turns[i]) for i in order[r * cells : (r + 1) * cells]], 1)
        for r in range(cells)
    ]
    out = rgb.copy()
    out[y0 : y0 + side, x0 : x0 + side] = np.concatenate(rows, 0)
    alpha = np.zeros((res, res), np.float32)
    alpha[y0 : y0 + side, x0 : x0 + side] = 1.0
    return out, alpha, {"cells": cells, "side_px": side}


def _soft_blob(res: int, center, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A diffuse blot: an irregular disc whose edge fades over about half its radius."""
    from scipy import ndimage

    core = _blob(res, center, radius * 0.8, rng, 0.5)
    return np.clip(ndimage.gaussian_filter(core, max(1.0, radius / 3)) * 1.6, 0, 1)


def _strength(rng: np.random.Generator, low: float, high: float) -> float:
    """Log-uniform: from barely visible to obvious."""
    return float(np.exp(rng.uniform(math.log(low), math.log(high))))


def smear(rgb, fg, area, center, rng, res, **_):
    """A diffuse, low-contrast smear (grease, a wiped fingerprint): the texture is softened and shifted towards a
    tone over a soft-edged blot."""
    from scipy import ndimage

    radius = math.sqrt(area / math.pi)
    alpha = _soft_blob(res, center, radius, rng)
    strength, dark = _strength(rng, 0.15, 0.6), rng.random() < 0.6
    local = rgb[alpha > 0.5].mean(0) if (alpha > 0.5).any() else rgb.mean((0, 1))
    tone = local * (0.55 if dark else 1.35)
    softened = ndimage.gaussian_filter(rgb, (2, 2, 0)) * (1 - strength) + strength * np.clip(tone, 0, 1)
    out = rgb * (1 - alpha[..., None]) + softened * alpha[..., None]
    return out, alpha, {"tone": "dark" if dark else "pale", "diameter_px": round(2 * radius)}


def fibre(rgb, fg, area, center, rng, res, **_):
    """Thin fibres or hairs lying on the surface: loosely curling lines one or two pixels wide with a faint shadow
    beside them; a larger defect is a longer fibre, then a tuft of several."""
    width = 1 if rng.random() < 0.7 else 2
    length = min(math.sqrt(area) * rng.uniform(3, 6), 0.6 * res)
    strands = int(np.clip(round(area / (length * width)), 1, 12))
    alpha, steps = np.zeros((res, res), np.float32), 48
    for _ in range(strands):
        turns = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, steps))  # a loose curl
        points = np.cumsum(np.stack([np.cos(turns), np.sin(turns)], 1) * length / steps, 0)
        start = center + rng.normal(0, length / 8, 2) * (strands > 1)
        alpha = np.maximum(alpha, _stroke(res, (points - points.mean(0) + start).clip(0, res - 1), width))
    alpha *= rng.uniform(0.5, 0.95)
    shadow = np.roll(alpha, (width + 1, width + 1), (0, 1)) * 0.35
    dark = rng.random() < 0.6
    out = _blend(rgb * (1 - shadow[..., None]), alpha, (0.1, 0.08, 0.07) if dark else (0.92, 0.9, 0.86))
    what = "fibre" if strands == 1 else f"tuft of {strands} fibres"
    return out, np.maximum(alpha, shadow), {"tone": "dark" if dark else "light", "length_px": round(length),
                                           "what": what}  # fmt: skip


def dent(rgb, fg, area, center, rng, res, **_):
    """A shallow dent seen only as shading: the light (from a random side) brightens one slope and darkens the
    other; the colour and texture are unchanged."""
    radius = math.sqrt(area / math.pi)
    stretch, angle = rng.uniform(1, 2), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    u = ((xx - center[0]) * math.cos(angle) + (yy - center[1]) * math.sin(angle)) / (radius * stretch)
    v = (-(xx - center[0]) * math.sin(angle) + (yy - center[1]) * math.cos(angle)) * stretch / radius
    depth = -np.exp(-2 * (u**2 + v**2))  # a Gaussian hollow
    gy, gx = np.gradient(depth)
    light = rng.uniform(0, 2 * np.pi)
    shade = (gx * math.cos(light) + gy * math.sin(light)) * radius
    shade *= _strength(rng, 0.15, 0.6) / max(float(np.abs(shade).max()), 1e-6)
    alpha = np.clip(np.abs(shade) / max(float(np.abs(shade).max()), 1e-6) * 2, 0, 1)
    return np.clip(rgb * (1 + shade[..., None]), 0, 1), alpha, {"diameter_px": round(2 * radius)}


def sheen(rgb, fg, area, center, rng, res, **_):
    """A gloss change: a glossy patch on a matt surface (paler, less contrast, as a reflection washes the texture
    out) or a dull one on a glossy surface (darker, flatter)."""
    radius = math.sqrt(area / math.pi)
    alpha = _soft_blob(res, center, radius, rng)
    glossy, strength = rng.random() < 0.6, _strength(rng, 0.2, 0.7)
    mean = rgb[alpha > 0.5].mean(0) if (alpha > 0.5).any() else rgb.mean((0, 1))
    flat = mean + (rgb - mean) * (1 - 0.6 * strength)
    changed = flat + strength * 0.35 * (1 - flat) if glossy else flat * (1 - 0.25 * strength)
    out = rgb * (1 - alpha[..., None]) + changed * alpha[..., None]
    return out, alpha, {"kind": "glossy" if glossy else "dull", "diameter_px": round(2 * radius)}


DISCOLOURATIONS = {"yellowed": (1.04, 1.0, 0.78), "bleached": (1.18, 1.18, 1.18), "scorched": (0.72, 0.58, 0.45),
                   "greyed": (0.0, 0.0, 0.0)}  # fmt: skip


def discolour(rgb, fg, area, center, rng, res, **_):
    """Discolouration: a soft region yellowed, bleached, scorched (browned, darkest at its centre) or greyed
    (desaturated); the texture stays."""
    radius = math.sqrt(area / math.pi)
    shape = _soft_blob(res, center, radius, rng)  # the ground truth: where the blot is, however faint
    alpha = shape * _strength(rng, 0.35, 1.0)
    kind = str(rng.choice(list(DISCOLOURATIONS)))
    if kind == "greyed":
        changed = np.repeat(rgb.mean(-1, keepdims=True), 3, -1) * 0.95
    else:
        weight = alpha[..., None] if kind == "scorched" else 1.0  # a burn is darkest where it was hottest
        changed = rgb * (1 + (np.asarray(DISCOLOURATIONS[kind], np.float32) - 1) * weight)
    out = rgb * (1 - alpha[..., None]) + np.clip(changed, 0, 1) * alpha[..., None]
    return out, shape, {"kind": kind, "diameter_px": round(2 * radius)}


DEFECTS: dict[str, Defect] = {
    d.name: d
    for d in [
        Defect(
            "scratch", scratch, "A {tone} scratch about {length_px} px long runs across the {position} of the {noun}."
        ),
        Defect("stain", stain, "A stain of {kind} about {diameter_px} px wide marks the {position} of the {noun}."),
        Defect(
            "crack",
            crack,
            "A crack about {length_px} px long splits the {position} of the {noun}.",
        ),
        Defect(
            "hole",
            hole,
            "A hole about {diameter_px} px across leaves material missing at the {position} of the {noun}.",
        ),
        Defect(
            "contamination",
            contamination,
            "Foreign {foreign} material contaminates a {extent_px} px area at the {position} of the {noun}.",
        ),
        Defect(
            "cutpaste",
            cutpaste,
            "A misplaced {variant} of {size_px} px with a different shade sits at the {position} of the {noun}.",
        ),
        Defect(
            "structure",
            structure,
            "The pattern is scrambled in a {side_px} px square at the {position} of the {noun}.",
        ),
        Defect(
            "smear",
            smear,
            "A faint {tone} smear about {diameter_px} px wide dulls the {position} of the {noun}.",
            min_contrast=0.01,
        ),
        Defect("fibre", fibre, "A {tone} {what} about {length_px} px long lies on the {position} of the {noun}."),
        Defect(
            "dent",
            dent,
            "A shallow dent about {diameter_px} px across shades the {position} of the {noun}.",
            min_contrast=0.01,
        ),
        Defect(
            "sheen",
            sheen,
            "A {kind} patch about {diameter_px} px wide changes the sheen at the {position} of the {noun}.",
            min_contrast=0.01,
        ),
        Defect(
            "discolour",
            discolour,
            "The {noun} is {kind} over about {diameter_px} px at the {position}.",
            min_contrast=0.01,
        ),
    ]
}
# KensaSynth's defects before the real-surface kinds (smear, fibre, dent, sheen, discolour) were added: its default
CLASSIC_DEFECTS = ("scratch", "stain", "crack", "hole", "contamination", "cutpaste", "structure")


def mask_boxes(mask: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Drop specks, then one tight box `[x0, y0, x1, y1]` (x1, y1 exclusive) per connected defect."""
    from scipy import ndimage  # the `data` extra; imported here so `kensa-vl` starts without it

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    mask = mask & np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_COMPONENT_PX))
    groups, _ = ndimage.label(ndimage.binary_dilation(mask, iterations=GROUP_PX), structure=np.ones((3, 3)))
    boxes = []
    for found in ndimage.find_objects(groups * mask):
        if found is not None:
            ys, xs = found
            boxes.append([xs.start, ys.start, xs.stop, ys.stop])
    return mask, sorted(boxes, key=lambda b: (b[1], b[0]))


def apply_defect(name: str, rgb: np.ndarray, fg: np.ndarray, size: str, rng: np.random.Generator, foreign=None):
    """Put defect `name` of size class `size` on the product. Returns (rgb, mask, boxes, meta); retries placement
    until the cleaned defect is on the product and visible."""
    from scipy import ndimage

    res = rgb.shape[0]
    low, high = SIZES[size]
    candidates = np.flatnonzero(ndimage.binary_erosion(fg, iterations=max(1, res // 128)) if not fg.all() else fg)
    for _ in range(TRIES):
        area = float(np.exp(rng.uniform(np.log(low), np.log(high)))) * res * res
        flat = candidates[int(rng.integers(len(candidates)))]
        center = np.array([flat % res, flat // res], np.float64)
        out, alpha, meta = DEFECTS[name].make(rgb, fg, area, center, rng, res, foreign=foreign)
        out = np.where(fg[..., None], out, rgb)  # defects live on the product, never on the backdrop
        mask, boxes = mask_boxes((alpha > 0.25) & fg)
        contrast = float(np.abs(out - rgb)[mask].mean()) if mask.any() else 0.0
        if boxes and contrast > DEFECTS[name].min_contrast:
            meta.update(area=round(float(mask.mean()), 5), contrast=round(contrast, 3), size=size)
            return out.astype(np.float32), mask, boxes, meta
    raise RuntimeError(f"could not place a visible {size} {name} defect in {TRIES} tries")


def describe(name: str, meta: dict, position: str, noun: str) -> str:
    return DEFECTS[name].template.format(**{**meta, "position": position, "noun": noun})
