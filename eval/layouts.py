"""The dataset layouts `kensa-vl eval --data DIR` reads, as one `Collection` of photos with ground truth.

- KensaSynth: `DIR/items` (a DatasetDict; `--split` picks the split).
- MVTec AD: `DIR/<category>/train/good/*.png`, `DIR/<category>/test/<defect or good>/*.png`,
  `DIR/<category>/ground_truth/<defect>/<stem>_mask.png` (DIR may also be one category's folder).
- MVTec LOCO AD: the same, with each defective image's masks in a folder `ground_truth/<defect>/<stem>/*.png`
  (their union is the image's mask); `validation/good` is not used.
- VisA: `DIR/split_csv/1cls.csv` (columns object, split, label, image, mask; paths relative to DIR).
- Folder (anomalib's `Folder`): `DIR/good` (or `normal`), `DIR/defective` (or `abnormal`; images directly or in
  one sub-folder per defect type) and optionally `DIR/masks` (or `mask`, `ground_truth`) with a mask per defective
  image named `<stem>.png` or `<stem>_mask.png`, at any depth. One category, named after DIR.

The few-shot protocol of the published few-shot detectors (WinCLIP, AnomalyDINO): per category and seed the k
supports are drawn from the support pool (`train/good`; in a Folder layout, `good`, whose drawn photos are then not
queried) by a seeded generator that depends only on the seed, the category and k, and every test image is a query.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kensa_vl.processing.image_processing_kensa_vl import open_image, to_rgb
from kensa_vl.processing.processing_kensa_vl import region_position

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
LAYOUTS = ("kensa-synth", "mvtec", "mvtec-loco", "visa", "folder")


@dataclass(frozen=True)
class Photo:
    path: Path
    category: str
    label: str  # "good" or "defective"
    defect_type: str | None
    masks: tuple[Path, ...] = ()  # their union is the defect's mask; none: no mask (or a good photo)
    pool: str = "query"  # "support": drawn as supports only; "query": judged (and drawn from when no support pool)


class Collection:
    """Photos with ground truth, in the columns `evaluate` reads: `collection["category"]` (a column),
    `collection[i]` (a row: the image and mask decoded when asked for, boxes and area from the mask)."""

    def __init__(self, photos: list[Photo], layout: str, root: Path):
        if not photos:
            raise ValueError(f"{root} ({layout} layout) holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.photos, self.layout, self.root = photos, layout, root

    @property
    def column_names(self) -> list[str]:
        return ["file", "category", "label", "defect_type", "pool"]

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [self._column(photo, key) for photo in self.photos]
        photo = self.photos[key]
        mask = self.mask(key)
        return {
            "image": to_rgb(photo.path),
            "mask": mask,
            "file": str(photo.path),
            "boxes": [] if mask is None else _mask_boxes(mask),
            "area": None if mask is None else float(mask.mean()),
            "position": region_position(mask) if mask is not None and mask.any() else None,
            "description": "",
            "size": None,
            **{k: self._column(photo, k) for k in ("category", "label", "defect_type", "pool")},
        }

    @staticmethod
    def _column(photo: Photo, key: str):
        return str(photo.path) if key == "file" else getattr(photo, key)

    def mask(self, index: int) -> np.ndarray | None:
        """The union of a photo's masks as a bool array (its image's size), None when it has none."""
        photo = self.photos[index]
        if not photo.masks:
            return None
        return np.logical_or.reduce([np.asarray(open_image(m).convert("L")) > 0 for m in photo.masks])


def _mask_boxes(mask: np.ndarray) -> list[list[int]]:
    """One box `[x0, y0, x1, y1]` (x1, y1 exclusive) per 8-connected region of a mask."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def detect(root: str | Path) -> str:
    """Which of `LAYOUTS` a folder is; a ValueError that lists what was expected when none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {root}: no such folder")
    if (root / "items").is_dir():
        return "kensa-synth"
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    categories = _mvtec_categories(root)
    if categories:
        loco = any((c / "ground_truth").is_dir() and any(p.is_dir() for p in (c / "ground_truth").glob("*/*"))
                   for c in categories)  # fmt: skip
        return "mvtec-loco" if loco else "mvtec"
    if _first(root, ("good", "normal")) and _first(root, ("defective", "abnormal")):
        return "folder"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    raise ValueError(
        f"{root} matches no known layout; expected one of: KensaSynth (items/), MVTec AD or LOCO "
        "(<category>/train/good and <category>/test/), VisA (split_csv/1cls.csv), or a folder with good/ (or "
        f"normal/) and defective/ (or abnormal/) and optionally masks/; found {found}"
    )


def _mvtec_categories(root: Path) -> list[Path]:
    if (root / "train" / "good").is_dir() and (root / "test").is_dir():
        return [root]
    return sorted(c for c in root.iterdir() if (c / "train" / "good").is_dir() and (c / "test").is_dir())


def load(root: str | Path, split: str = "test"):
    """The photos of `root` in its layout (`detect`): a `Collection`, or for KensaSynth the items of `split`."""
    root = Path(root)
    layout = detect(root)
    if layout == "kensa-synth":
        from kensa_vl.train.data import load_synth

        items, _ = load_synth(root)
        if split not in items:
            raise ValueError(f"--split {split!r} is not in {root}; it has {list(items)}")
        return items[split]
    photos = {"mvtec": _mvtec, "mvtec-loco": _mvtec, "visa": _visa, "folder": _folder}[layout](root)
    _check_masks(photos)
    return Collection(photos, layout, root)


def _mvtec(root: Path) -> list[Photo]:
    photos = []
    for category in _mvtec_categories(root):
        name = category.name
        photos += [Photo(p, name, "good", None, pool="support") for p in _images(category / "train" / "good")]
        for folder in sorted(d for d in (category / "test").iterdir() if d.is_dir()):
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                if folder.name == "good":
                    photos.append(Photo(path, name, "good", None))
                    continue
                truth = category / "ground_truth" / folder.name
                if (truth / path.stem).is_dir():  # LOCO: a folder of masks per image
                    masks = tuple(_images(truth / path.stem))
                else:
                    masks = (truth / f"{path.stem}_mask.png",) if (truth / f"{path.stem}_mask.png").is_file() else ()
                photos.append(Photo(path, name, "defective", folder.name, masks))
    return photos


def _visa(root: Path) -> list[Photo]:
    photos = []
    with open(root / "split_csv" / "1cls.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            missing = {"object", "split", "label", "image"} - set(row)
            if missing:
                raise ValueError(f"{root}/split_csv/1cls.csv lacks the columns {sorted(missing)}; has {list(row)}")
            defective = row["label"] == "anomaly"
            masks = (root / row["mask"],) if defective and row.get("mask") else ()
            photos.append(
                Photo(
                    root / row["image"],
                    row["object"],
                    "defective" if defective else "good",
                    "anomaly" if defective else None,
                    masks,
                    pool="support" if row["split"] == "train" else "query",
                )
            )
    # the few-shot protocol draws supports from the normal training images only
    return [p for p in photos if not (p.pool == "support" and p.label == "defective")]


def _folder(root: Path) -> list[Photo]:
    name = root.resolve().name
    good, bad = _first(root, ("good", "normal")), _first(root, ("defective", "abnormal"))
    mask_root = _first(root, ("masks", "mask", "ground_truth"))
    masks = {}
    for path in _images(mask_root) if mask_root else []:
        masks.setdefault(path.stem.removesuffix("_mask"), []).append(path)
    photos = [Photo(p, name, "good", None) for p in _images(good)]
    for path in _images(bad):
        kind = path.parent.name if path.parent != bad else "defect"
        photos.append(Photo(path, name, "defective", kind, tuple(masks.get(path.stem, ()))))
    return photos


def _check_masks(photos: list[Photo]) -> None:
    """Masks must be all there or all absent, and each the size of its image; names the ones that are not."""
    defective = [p for p in photos if p.label == "defective"]
    missing = [str(p.path) for p in defective if not p.masks]
    if missing and len(missing) < len(defective):
        raise ValueError(
            f"{len(missing)} of {len(defective)} defective images have no mask (the others do): {missing[:5]}"
        )
    wrong = []
    for photo in defective:
        for mask in photo.masks:
            if not mask.is_file():
                wrong.append(f"{mask} (missing)")
                continue
            try:
                with Image.open(photo.path) as image, Image.open(mask) as truth:  # headers only
                    size, mask_size = image.size, truth.size
            except OSError:  # an unreadable image is its query's error record; an unreadable mask is named then
                continue
            if size != mask_size:
                wrong.append(f"{mask} is {mask_size[0]}x{mask_size[1]}, its image {photo.path} {size[0]}x{size[1]}")
    if wrong:
        raise ValueError(f"{len(wrong)} masks do not match their images: {'; '.join(wrong[:5])}")
