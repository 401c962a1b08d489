"""Adapters from common VLM datasets to TRL conversations: rows of `messages` + `images`.

Every adapter is a pure function of one record. An image placeholder (`{"type": "image"}`) sits exactly where the
image was in the source, and `images` lists the images in placeholder order. Bad records raise `InvalidRecord`
naming the record; `to_conversations(..., skip_invalid=True)` drops them instead and logs how many and why.

    interleaved     MMC4/OBELICS documents: `texts` with None where images go, `images`
    caption         COCO-style captions: `image`, `caption` | `captions` | `sentences`
    vqa             `image`, `question`, `answer` | `answers` (the most common answer wins)
    classification  imagefolder: `image`, `label` (class index or name)
    detection       `image`, `objects: {bbox: [[x, y, w, h]], category: [...]}` (COCO boxes)
    episode         KensaSynth episodes (lazily, via `episode_conversations`)
    naming          KensaSynth episodes whose defects carry names drawn per episode (`naming_conversations`)
    grading         KensaSynth grading episodes, grades named per episode (`grading_conversations`)
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from kensa_vl.processing.image_processing_kensa_vl import to_rgb
from kensa_vl.processing.processing_kensa_vl import (
    NUM_LOC_BINS,
    UNNAMED_DEFECT,
    boxes_to_text,
    grading_answer,
    inspection_answer,
)

logger = logging.getLogger(__name__)

IMAGE = {"type": "image", "text": None}  # one struct type for every content block, so Arrow can store them


class InvalidRecord(ValueError):
    """A source record that cannot become a conversation; the message names the record."""


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def turn(role: str, *blocks) -> dict:
    return {"role": role, "content": [text(b) if isinstance(b, str) else b for b in blocks]}


def load_image(value, record) -> Image.Image:
    """An RGB image from a PIL image, a path or a datasets image dict (`to_rgb`), decoded now, so a truncated file
    fails here and not inside a training step; a corrupt or missing file is named with its record."""
    try:
        return to_rgb(value)
    except ValueError as err:
        raise InvalidRecord(f"record {record}: image could not be read ({err})") from err


def interleaved(record: dict, record_id=None) -> dict:
    """An interleaved web document as one assistant turn (all of its text is learnt; images are placed inline).

    `texts` has None where an image goes. `images` is either parallel to `texts` (OBELICS: None where text goes)
    or lists just the images (MMC4-style, in order); the number of placeholders must equal the number of images.
    """
    texts = record["texts"]
    images = [im for im in record["images"] if im is not None]
    slots = sum(t is None for t in texts)
    parallel = len(record["images"]) == len(texts)
    if slots != len(images) or (
        parallel and any((t is None) != (im is not None) for t, im in zip(texts, record["images"], strict=True))
    ):
        raise InvalidRecord(
            f"record {record_id}: {slots} image placeholders (None in texts) but {len(images)} images, "
            "or they are not at the same positions"
        )
    blocks = [IMAGE if t is None else text(t) for t in texts]
    return {
        "messages": [{"role": "assistant", "content": blocks}],
        "images": [load_image(im, record_id) for im in images],
    }


def caption(record: dict, record_id=None, prompt: str = "Describe the image.") -> dict:
    found = record.get("caption") or record.get("captions") or record.get("sentences")
    if isinstance(found, list):
        found = found[0] if found else None
    if isinstance(found, dict):
        found = found.get("raw") or found.get("text")
    if not found:
        raise InvalidRecord(f"record {record_id}: no caption (expected `caption`, `captions` or `sentences`)")
    image = load_image(record["image"], record_id)
    return {"messages": [turn("user", IMAGE, prompt), turn("assistant", found.strip())], "images": [image]}


def vqa(record: dict, record_id=None) -> dict:
    answer = record.get("answer")
    if answer is None and record.get("answers"):
        answers = [a["answer"] if isinstance(a, dict) else a for a in record["answers"]]
        answer = Counter(answers).most_common(1)[0][0]
    if not answer or not record.get("question"):
        raise InvalidRecord(f"record {record_id}: needs `question` and `answer` or `answers`")
    image = load_image(record["image"], record_id)
    return {"messages": [turn("user", IMAGE, record["question"]), turn("assistant", str(answer))], "images": [image]}


def classification(record: dict, record_id=None, class_names: list[str] = (), prompt: str | None = None) -> dict:
    label = record["label"]
    if isinstance(label, str) and label in class_names:
        name = label
    elif isinstance(label, int | np.integer) and 0 <= label < len(class_names):
        name = class_names[label]
    else:
        raise InvalidRecord(f"record {record_id}: label {label!r} is not one of the {len(class_names)} classes")
    prompt = prompt or f"Which of these is it: {', '.join(class_names)}?"
    image = load_image(record["image"], record_id)
    return {"messages": [turn("user", IMAGE, prompt), turn("assistant", name)], "images": [image]}


def detection(record: dict, record_id=None, class_names: list[str] = (), num_bins: int = NUM_LOC_BINS) -> dict:
    """Objects as `name<box>..</box>` in reading order (top to bottom, then left to right); COCO `[x, y, w, h]`."""
    image = load_image(record["image"], record_id)
    objects = record["objects"]
    parts = []
    for (x, y, w, h), cat in sorted(
        zip(objects["bbox"], objects["category"], strict=True), key=lambda o: (o[0][1], o[0][0])
    ):
        if isinstance(cat, str):
            if cat not in class_names:
                raise InvalidRecord(f"record {record_id}: unknown category {cat!r}; known: {list(class_names)}")
            name = cat
        elif 0 <= cat < len(class_names):
            name = class_names[cat]
        else:
            raise InvalidRecord(f"record {record_id}: category id {cat} is not one of the {len(class_names)} classes")
        try:
            parts.append(name + boxes_to_text([(x, y, x + w, y + h)], image.width, image.height, num_bins))
        except ValueError as err:
            raise InvalidRecord(f"record {record_id}: {err}") from err
    answer = " ".join(parts) if parts else "none"
    return {"messages": [turn("user", IMAGE, "Detect all objects."), turn("assistant", answer)], "images": [image]}


def coco_detection(annotation_file: str, image_dir: str):
    """A COCO detection json as `(dataset, class_names)`: rows of `id`, `image` (path), `objects`; category ids are
    mapped to indices into `class_names`. Images are opened only when converted."""
    from datasets import Dataset

    coco = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    objects = {im["id"]: {"bbox": [], "category": []} for im in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] not in objects:
            raise InvalidRecord(f"annotation {ann.get('id')}: image_id {ann['image_id']} is not in `images`")
        if ann["category_id"] not in index:
            raise InvalidRecord(f"annotation {ann.get('id')}: unknown category_id {ann['category_id']}")
        objects[ann["image_id"]]["bbox"].append([float(v) for v in ann["bbox"]])
        objects[ann["image_id"]]["category"].append(index[ann["category_id"]])
    rows = [
        {"id": im["id"], "image": f"{image_dir}/{im['file_name']}", "objects": objects[im["id"]]}
        for im in coco["images"]
    ]
    return Dataset.from_list(rows), [c["name"] for c in categories]


def episode(support: list[dict], query: dict, noun: str, num_bins: int = NUM_LOC_BINS) -> dict:
    """A KensaSynth episode (item rows) as one user turn with numbered references and the query, and the answer.

    A good reference reads "good"; a defective one gives the answer format and the description, so the demos
    teach the format the query is answered in. The query's defect is named by its type only where the support
    shows a defective example; with good examples alone it is `UNNAMED_DEFECT` ("defect"): a name is read from the
    examples, not recalled (trained on types, a model named every defect of unseen products "scratch").
    """

    def answer(item: dict) -> str:
        width, height = item["image"].size
        return inspection_answer(item["defect_type"], item["position"], item["boxes"], width, height, num_bins)

    if query["defect_type"] is not None and all(item["defect_type"] is None for item in support):
        query = {**query, "defect_type": UNNAMED_DEFECT}

    blocks = [f"Reference photos of a {noun}:\n"] if support else []
    for j, item in enumerate(support, 1):
        note = "" if item["defect_type"] is None else f" {item['description']}"
        blocks += [f"{j}. ", IMAGE, f" {answer(item)}{note}\n"]
    blocks += ["Query: " if support else "", IMAGE]
    blocks.append(f"\nIs this {noun} good or defective? If defective, say which defect, where, and box it.")
    messages = [turn("user", *[b for b in blocks if b != ""]), turn("assistant", answer(query))]
    shown = [*support, query]
    return {"messages": messages, "images": [i["image"] for i in shown], "masks": [i.get("mask") for i in shown]}


def episode_conversations(items, episodes, num_bins: int = NUM_LOC_BINS, decoded: int = 1024):
    """Episodes as `messages` + `images` rows, built on access (no pixels copied): `episodes.with_transform`. The
    last `decoded` items read stay decoded: an image comes back in many episodes (the main job's about 29 times)."""
    from .materials import material

    item = functools.lru_cache(maxsize=decoded)(lambda index: items[index])

    def transform(batch: dict) -> dict:
        out = {"messages": [], "images": [], "masks": []}
        for category, support, query in zip(batch["category"], batch["support"], batch["query"], strict=True):
            row = episode([item(int(i)) for i in support], item(int(query)), material(category).noun, num_bins)
            for key in out:
                out[key].append(row[key])
        return out

    return episodes.with_transform(transform)


def naming_episode(item: Callable[[int], dict], pools: dict, rng: np.random.Generator, pool: str = "training") -> dict:
    """One naming episode: a category, 2-4 good examples, 1-3 defective examples of different defect types, each
    named by a name drawn for this episode (`names.draw_names`) instead of its type, and a query that is good (a
    quarter of the time) or shows one of the examples' types, answered with that example's name. The name can only
    be copied from the prompt. `item(row)` reads a KensaSynth item; `pools`: (category, "good" or defect type) ->
    item rows (`naming_pools`)."""
    from .materials import material
    from .names import draw_names

    categories = sorted({c for c, kind in pools if kind not in ("good", "defective") and len(pools[(c, kind)]) >= 2})
    if not categories:
        raise ValueError("naming episodes need a category with two defective photos of one type; none has")
    category = categories[int(rng.integers(len(categories)))]
    types = sorted(k for c, k in pools if c == category and k not in ("good", "defective"))
    shown = [t for t in rng.permutation(types)[: int(rng.integers(1, min(3, len(types)) + 1))]]
    if not any(len(pools[(category, t)]) >= 2 for t in shown):  # the query needs a second photo of a shown type
        shown[0] = next(t for t in types if len(pools[(category, t)]) >= 2)
    names = dict(zip(shown, draw_names(rng, len(shown), pool), strict=True))
    goods = pools[(category, "good")]
    good = [int(i) for i in rng.choice(goods, min(len(goods), int(rng.integers(2, 5)) + 1), replace=False)]
    demos = {t: [int(i) for i in rng.permutation(pools[(category, t)])] for t in shown}
    support = [{**item(i), "defect_type": None} for i in good[1:]]
    support += [{**item(demos[t][0]), "defect_type": names[t], "description": ""} for t in shown]
    support = [support[i] for i in rng.permutation(len(support))]
    asked = [t for t in shown if len(demos[t]) >= 2]
    if rng.random() < 0.25:
        query = {**item(good[0]), "defect_type": None}
    else:
        kind = asked[int(rng.integers(len(asked)))]
        query = {**item(demos[kind][1]), "defect_type": names[kind]}
    return episode(support, query, material(category).noun)


def naming_pools(items) -> dict:
    """(category, "good" | defect type) -> the rows of `items` (a KensaSynth split) that show it."""
    pools = {}
    for row, (category, label, kind) in enumerate(zip(items["category"], items["label"], items["defect_type"],
                                                      strict=True)):  # fmt: skip
        pools.setdefault((category, "good" if label == "good" else kind), []).append(row)
    return pools


def naming_conversations(items, count: int, seed: int = 0, pool: str = "training", decoded: int = 1024):
    """`count` naming episodes (`naming_episode`) over a KensaSynth split as `messages` + `images` rows, built on
    access; row `i` is drawn with the seed `(seed, i)`, so a row is the same whenever it is read."""
    from datasets import Dataset

    pools = naming_pools(items)
    item = functools.lru_cache(maxsize=decoded)(lambda index: items[index])

    def transform(batch: dict) -> dict:
        out = {"messages": [], "images": [], "masks": []}
        for index in batch["row"]:
            row = naming_episode(item, pools, np.random.default_rng([seed, int(index)]), pool)
            for key in out:
                out[key].append(row[key])
        return out

    return Dataset.from_dict({"row": list(range(count))}).with_transform(transform)


def grading_why(attribute, grade: int, names: list[str]) -> str:
    """Why a photo has `grade`: past the limit sample of the grade below, or within the first grade's."""
    if grade == 0:
        return f"{attribute.less} than the {names[0]} limit sample"
    return f"{attribute.more} than the {names[grade - 1]} limit sample"


def grading_episode(support: list[dict], grades: list[int], query: dict, names: list[str], graded_by: str,
                    answer: str | None = None) -> dict:  # fmt: skip
    """A grading episode as one user turn: the graded examples (rows with `image`, `noun` and `limit`, or the
    Inspector's items with a `note`), each labelled `grade: <name>` (`, limit sample` or `, <note>` after it), then
    the query; `answer` (`grading_answer`'s text), when given, is the assistant's turn."""
    noun = query["noun"]
    blocks = [f"Graded examples of a {noun}, graded by {graded_by}; a limit sample is the most its grade allows:\n"]
    for j, (item, grade) in enumerate(zip(support, grades, strict=True), 1):
        note = "limit sample" if item.get("limit") else item.get("note")
        blocks += [f"{j}. ", IMAGE, " " + grading_answer(names[grade], note) + "\n"]
    blocks += ["Query: ", IMAGE, f"\nWhich grade is this {noun}, and why?"]
    messages = [turn("user", *blocks)] + ([turn("assistant", answer)] if answer is not None else [])
    return {"messages": messages, "images": [i["image"] for i in [*support, query]]}


def grading_conversations(items, episodes, seed: int = 0, pool: str = "training", decoded: int = 1024):
    """Grading episodes (KensaSynth `grading/episodes`) as `messages` + `images` rows, built on access; the grade
    names of row `i` are drawn with the seed `(seed, i)` from a pool of `names.draw_grades`."""
    from .grading import ATTRIBUTES
    from .names import draw_grades

    item = functools.lru_cache(maxsize=decoded)(lambda index: items[index])
    indexed = episodes.add_column("row", list(range(len(episodes))))

    def transform(batch: dict) -> dict:
        out = {"messages": [], "images": []}
        for row, n, support, grades, query, grade, attribute in zip(
            *(batch[k] for k in ("row", "num_grades", "support", "grades", "query", "query_grade", "attribute")),
            strict=True,
        ):
            names = draw_grades(np.random.default_rng([seed, int(row)]), int(n), pool)
            shown = [item(int(i)) for i in support]
            kind = ATTRIBUTES[attribute]
            answer = grading_answer(names[grade], grading_why(kind, grade, names))
            conversation = grading_episode(shown, grades, item(int(query)), names, kind.noun, answer)
            for key in out:
                out[key].append(conversation[key])
        return out

    return indexed.with_transform(transform)


def to_conversations(dataset, adapter: Callable, skip_invalid: bool = False, num_proc: int | None = None, **kwargs):
    """Map a source dataset through an adapter into `messages` + `images` rows.

    Raises `InvalidRecord` on the first bad record; with `skip_invalid=True` bad records are dropped and
    counted, and the count with the reasons is logged and returned: `(dataset, {"skipped": n, "reasons": {...}})`.
    """

    def convert(record: dict, index: int) -> dict:
        try:
            return {**adapter(record, record_id=record.get("id", index), **kwargs), "error": None}
        except InvalidRecord as err:
            if not skip_invalid:
                raise
            return {"messages": [], "images": [], "error": str(err)}

    out = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc)
    errors = [e for e in out["error"] if e is not None]
    summary = {"skipped": len(errors), "reasons": dict(Counter(e.split(": ", 1)[-1] for e in errors))}
    if errors:
        logger.warning("skipped %d of %d records: %s", len(errors), len(dataset), summary["reasons"])
        out = out.filter(lambda e: e is None, input_columns="error")
    return out.remove_columns("error"), summary


def lazy_conversations(dataset, adapter: Callable, masks: bool = False, **kwargs):
    """`to_conversations` built on access (`with_transform`): the adapter runs on each row when it is read, so the
    images keep their stored bytes instead of being decoded and written out again as PNG (the main job's captions,
    classification and detection rows: 44 s per stage). A bad record raises when it is read. With `masks`, each row
    also carries its `mask` column as `masks` (the anomaly map's targets)."""

    def transform(batch: dict) -> dict:
        out = {"messages": [], "images": []} | ({"masks": []} if masks else {})
        for values in zip(*batch.values(), strict=True):
            record = dict(zip(batch, values, strict=True))
            row = adapter(record, record_id=record.get("id"), **kwargs)
            out["messages"].append(row["messages"])
            out["images"].append(row["images"])
            if masks:
                out["masks"].append([record["mask"]])
        return out

    return dataset.with_transform(transform)


def mixture(sources: dict, weights: dict[str, float], num_rows: int, seed: int = 0):
    """A weighted mixture for the multitask stage: `num_rows` rows drawn from `sources` (name -> dataset of
    conversations) in proportion to `weights`, each source cycled in a seeded shuffled order.

    Rows are fetched on access (sources may be lazy, like episodes). Each row also says its `source`.
    """
    from datasets import Dataset

    if set(weights) != set(sources) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be >= 0 for exactly the sources {sorted(sources)}, got {weights}")
    empty = [name for name, ds in sources.items() if weights[name] > 0 and len(ds) == 0]
    if empty:
        raise ValueError(f"sources {empty} are empty but have weight > 0")
    rng = np.random.default_rng(seed)
    names = sorted(sources)
    probs = np.array([weights[n] for n in names], np.float64) / sum(weights.values())
    picks = rng.choice(len(names), size=num_rows, p=probs)
    rows = np.zeros(num_rows, np.int64)
    for s, name in enumerate(names):
        where, n = np.flatnonzero(picks == s), len(sources[name])
        if len(where):
            cycles = [rng.permutation(n) for _ in range(-(-len(where) // n))]
            rows[where] = np.concatenate(cycles)[: len(where)]

    def transform(batch: dict) -> dict:
        fetched = [sources[s][int(r)] for s, r in zip(batch["source"], batch["row"], strict=True)]
        return {
            "source": batch["source"],
            "messages": [f["messages"] for f in fetched],
            "images": [f["images"] for f in fetched],
            "masks": [f.get("masks") for f in fetched],  # defect masks parallel to images, where a source has them
        }

    index = Dataset.from_dict({"source": [names[p] for p in picks], "row": rows.tolist()})
    return index.with_transform(transform)
