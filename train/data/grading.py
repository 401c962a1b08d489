"""KensaSynth grading tasks (官能検査): whole surfaces graded against labelled limit samples (限度見本).

A grading photo is a view of a category's product, taken in a light booth (the lighting strays a quarter as far as
in the inspection photos), changed over its whole surface by one `Attribute` at a `level` in [0, 1]. An episode
cuts [0, 1] into 2-4 equal grades, the first the least changed; a grade's limit sample is the photo at its upper
boundary, the most a photo of that grade may show. Every (category, attribute) has `regular` photos at stratified
levels and one at each boundary a grading of 2, 3 or 4 grades has (`BOUNDARIES`).

Held out like the defect types: validation has the training attributes plus `VALIDATION_ATTRIBUTES`, test the
training attributes plus `TEST_ATTRIBUTES`, each on its own categories (`synth.SynthConfig.categories`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .noise import blur, fractal

BOOTH_LIGHTING = 0.25  # a light booth: gain, gamma, gradient, vignetting and colour cast at a quarter of their range
QUERY_MARGIN = 0.15  # a query lies at least this share of its grade's width inside it: a grade a person could tell
BOUNDARIES = sorted({Fraction(g, n) for n in (2, 3, 4) for g in range(1, n)})  # 1/4 1/3 1/2 2/3 3/4


@dataclass(frozen=True)
class Attribute:
    name: str
    noun: str  # what the grading is by ("colour shade")
    more: str  # a photo further along than another ("darker")
    less: str
    zoom: float = 0.0  # magnification at level 1 (the view's zoom is 1 + zoom * level)

    def apply(self, rgb: np.ndarray, fg: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        """The photo `rgb` (float32 (H, W, 3) in [0, 1]) changed inside its foreground `fg` at `level`."""
        h, w = fg.shape
        if self.name == "shade":
            out = rgb * (1 - 0.45 * level)
        elif self.name == "fading":
            out = rgb * (1 - 0.6 * level) + 0.6 * level * 0.92
        elif self.name == "blotch":
            field = fractal(rng, h, w, base=3, octaves=2)
            field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
            out = rgb * (1 + 0.6 * level * (2 * field - 1))[..., None]
        elif self.name == "roughness":
            grain = blur(rng.normal(0, 1, (h, w)).astype(np.float32), 2)
            out = rgb + (0.14 * level * grain / max(float(grain.std()), 1e-6))[..., None]
        elif self.name == "gloss":
            y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
            cy, cx = rng.uniform(0.25, 0.75, 2)
            lobe = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.3**2))
            out = rgb * (1 - 0.3 * level) + (0.6 * level * lobe)[..., None]
        else:  # coarseness: the view's zoom did it
            out = rgb
        return np.clip(np.where(fg[..., None], out, rgb), 0, 1).astype(np.float32)


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in [
        Attribute("shade", "colour shade", "darker", "lighter"),
        Attribute("fading", "print density", "more faded", "denser"),
        Attribute("blotch", "tone uniformity", "blotchier", "more even"),
        Attribute("roughness", "surface roughness", "rougher", "smoother"),
        Attribute("coarseness", "grain size", "coarser", "finer", zoom=0.8),
        Attribute("gloss", "gloss", "glossier", "more matte"),
    ]
}
VALIDATION_ATTRIBUTES = ("coarseness",)  # appear only in validation
TEST_ATTRIBUTES = ("gloss",)  # appear only in test


def split_attributes(split: str) -> list[str]:
    """The training attributes, plus the split's own held-out ones for validation and test."""
    own = {"validation": VALIDATION_ATTRIBUTES, "test": TEST_ATTRIBUTES}.get(split, ())
    return [a for a in ATTRIBUTES if a in own or a not in {*VALIDATION_ATTRIBUTES, *TEST_ATTRIBUTES}]


def grade_of(level: float, num_grades: int) -> int:
    """The grade (0 = least changed) of a photo at `level` when [0, 1] is cut into `num_grades` equal grades; a
    limit sample, at a boundary, belongs to the grade below it."""
    if num_grades < 1 or not 0 <= level <= 1:
        raise ValueError(f"need num_grades >= 1 and a level in [0, 1]; got {num_grades} grades, level {level}")
    return max(0, math.ceil(level * num_grades - 1e-6) - 1)


def is_query(level: float, num_grades: int) -> bool:
    """Whether a photo at `level` lies QUERY_MARGIN of its grade's width away from the grade's boundaries."""
    inside = level * num_grades - grade_of(level, num_grades)
    return QUERY_MARGIN <= inside <= 1 - QUERY_MARGIN


def specs(categories: list[str], split: str, split_index: int, seed: int, regular: int) -> list[dict]:
    """What each grading photo of a split shows: per category and attribute, `regular` photos at stratified levels
    and a limit sample at each of `BOUNDARIES`."""
    rng = np.random.default_rng([seed, split_index, 3])
    specs = []
    for category in categories:
        for attribute in split_attributes(split):
            levels = [((i + rng.random()) / regular, False) for i in range(regular)]
            levels += [(float(b), True) for b in BOUNDARIES]
            for level, limit in levels:
                seed_i = [seed, split_index, 4, len(specs)]
                specs.append({"category": category, "attribute": attribute, "level": level, "limit": limit,
                              "seed": seed_i})  # fmt: skip
    return specs


def render(spec: dict, resolution: int, seed: int, master) -> dict:
    """Photograph one grading item; `master(name, seed, resolution)` gives the category's product."""
    from .materials import finish, material, view
    from .synth import encode

    rng = np.random.default_rng(spec["seed"])
    attribute = ATTRIBUTES[spec["attribute"]]
    product, fg = master(spec["category"], seed, resolution)
    zoom = 1 + attribute.zoom * spec["level"]
    rgb, fg_view, params = view(spec["category"], product, fg, resolution, rng, lighting=BOOTH_LIGHTING, zoom=zoom)
    rgb = attribute.apply(rgb, fg_view, spec["level"], rng)
    return {
        "image": {"bytes": encode(finish(rgb, params, rng), "JPEG", quality=95), "path": None},
        "category": spec["category"],
        "noun": material(spec["category"]).noun,
        "attribute": spec["attribute"],
        "level": float(spec["level"]),
        "limit": bool(spec["limit"]),
    }


def item_features():
    from datasets import Features, Image, Value

    return Features({"image": Image(), "category": Value("string"), "noun": Value("string"),
                     "attribute": Value("string"), "level": Value("float32"), "limit": Value("bool")})  # fmt: skip


def grading_pools(rows: dict) -> dict:
    """(category, attribute) -> `{"regular": [(row, level)], "limit": {boundary: row}}` over a grading split's
    columns (`category`, `attribute`, `level`, `limit`)."""
    pools = {}
    for row, (cat, attr, level, limit) in enumerate(
        zip(rows["category"], rows["attribute"], rows["level"], rows["limit"], strict=True)
    ):
        pool = pools.setdefault((cat, attr), {"regular": [], "limit": {}})
        if limit:
            pool["limit"][Fraction(float(level)).limit_denominator(12)] = row
        else:
            pool["regular"].append((row, float(level)))
    return pools


def draw_grading(pool: dict, num_grades: int, shots: list[int], rng: np.random.Generator,
                 limit_odds: float = 0.75) -> dict | None:  # fmt: skip
    """Examples and a query for one grading: `shots[g]` examples of grade g, where each grade below the last shows
    its limit sample with `limit_odds`, and a query of a random grade (`is_query`), never an example. None when
    the pool has too few photos."""
    support, grades = [], []
    by_grade = [[r for r, lv in pool["regular"] if grade_of(lv, num_grades) == g] for g in range(num_grades)]
    for g, n in enumerate(shots):
        chosen = []
        boundary = Fraction(g + 1, num_grades)
        if g < num_grades - 1 and boundary in pool["limit"] and rng.random() < limit_odds:
            chosen.append(pool["limit"][boundary])
        regular = by_grade[g]
        if len(regular) < n - len(chosen):
            return None
        chosen += [int(r) for r in rng.choice(regular, n - len(chosen), replace=False)]
        support += chosen
        grades += [g] * len(chosen)
    levels = dict(pool["regular"])
    queries = [r for r, lv in pool["regular"] if r not in support and is_query(lv, num_grades)]
    if not queries:
        return None
    query = int(queries[int(rng.integers(len(queries)))])
    order = rng.permutation(len(support))
    return {"support": [int(support[i]) for i in order], "grades": [grades[i] for i in order], "query": query,
            "query_grade": grade_of(levels[query], num_grades), "num_grades": num_grades}  # fmt: skip


def sample_episodes(rows: dict, count: int, seed: int, split_index: int) -> dict:
    """`count` training-style grading episodes over a split: a (category, attribute), 2-4 grades, 1-4 examples per
    grade (`draw_grading`)."""
    rng = np.random.default_rng([seed, split_index, 5])
    pools = grading_pools(rows)
    keys = sorted(pools)
    columns = {k: [] for k in ("category", "attribute", "num_grades", "support", "grades", "query", "query_grade")}
    for _ in range(50 * count):  # a (category, attribute) too thin for a draw is drawn again
        if len(columns["query"]) == count or not keys:
            break
        category, attribute = keys[int(rng.integers(len(keys)))]
        num_grades = int(rng.integers(2, 5))
        drawn = draw_grading(pools[(category, attribute)], num_grades,
                             [int(n) for n in rng.integers(1, 5, num_grades)], rng)  # fmt: skip
        if drawn is None:
            continue
        for key, value in {"category": category, "attribute": attribute, **drawn}.items():
            columns[key].append(value)
    return columns


def episode_features():
    from datasets import Features, List, Value

    return Features({"category": Value("string"), "attribute": Value("string"), "num_grades": Value("int32"),
                     "support": List(Value("int64")), "grades": List(Value("int32")), "query": Value("int64"),
                     "query_grade": Value("int32")})  # fmt: skip
