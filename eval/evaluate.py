"""Few-shot inspection evaluation on KensaSynth or a dataset on disk (`layouts`: MVTec AD, LOCO, VisA, a folder).

Per category and seed one fixed support set of k good photos (plus `defective_shots` described defective ones),
drawn from the category's support pool (`train/good`), or for KensaSynth from its good photos (then not queried).
Queries: the category's other photos (every one, or `queries_per_category`, half good, half defective, drawn per
seed: `queries_for`). Metrics (`metrics`): image AUROC, AUPR, F1-max, balanced accuracy, overkill, miss,
calibration, pixel AUROC and AUPRO from the heatmaps, box hit rate and AP50; overall, per category, per defect type
and per size, as the mean over seeds, and overall with a 95% bootstrap interval over seeds and queries.

Controls (at `control_shots`): support from another category, noise images as support, and labels swapped in the
demos. A model that uses its examples does worse under each. Under the other-category control the Inspector also
checks each query against the examples, as a user's does (`support_check`): `unlike_share`, the share of queries
it calls unlike them (another product), is what a user would be warned of.

Under `accelerate launch` the support sets are split across the processes and the records gathered (the same
records as one process, in the same order).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .inspector import Inspector
from .metrics import BOX_RATES, PixelTable, bootstrap, box_hits, metrics, pixel_stats, ranking_metrics

CONTROLS = ("other_category", "noise", "shuffled_labels")
SHEET_SIDE = 96
SCORING_BATCH = 8  # queries per forward pass when an evaluation only scores (`Inspector.judge`'s `batch_size`)
INTERVAL_METRICS = ("balanced_accuracy", "auroc", "aupr", "f1_max", "pixel_auroc", "aupro", *BOX_RATES)


def _columns(items) -> list[str]:
    return list(getattr(items, "column_names", None) or [])


def pools(items) -> dict[str, dict[str, list[int]]]:
    """Per category the row indices of its good and defective queries and, when the data has one (a `pool` column
    with "support" rows: `train/good`), its support pool."""
    rows = {}
    pool = items["pool"] if "pool" in _columns(items) else [None] * len(items)
    for i, (category, label, where) in enumerate(zip(items["category"], items["label"], pool, strict=True)):
        entry = rows.setdefault(category, {"good": [], "defective": []})
        entry.setdefault("support", []).append(i) if where == "support" else entry[label].append(i)
    return rows


def support_for(rows: dict, category: str, k: int, defective_k: int, seed: int, control: str | None = None):
    """Indices of the support set (k good, defective_k defective) for one category, seed and control: drawn by a
    generator seeded by (seed, category, k) only, so every method and process gets the same set."""
    rng = np.random.default_rng([seed, sum(map(ord, category)), k])
    source = category
    if control == "other_category":
        others = sorted(c for c in rows if c != category)
        if not others:
            raise ValueError("the other_category control needs at least two categories in the split")
        source = others[rng.integers(len(others))]
    good, bad = rows[source].get("support", rows[source]["good"]), rows[source]["defective"]
    spare = 0 if "support" in rows[source] else 1  # a shared pool must leave a good photo to query
    if k > len(good) - spare or defective_k > len(bad) - 1:
        where = "support pool (train/good)" if "support" in rows[source] else "good photos"
        raise ValueError(
            f"category {source!r} has {len(good)} {where} and {len(bad)} defective photos; a support of {k} good "
            f"and {defective_k} defective needs at least {k + spare} and {defective_k + 1 if defective_k else 0}"
        )
    return [int(i) for i in rng.choice(good, k, replace=False)], [
        int(i) for i in rng.choice(bad, defective_k, replace=False)
    ]


def queries_for(rows: dict, category: str, used: set, per_category: int | None, seed: int) -> list[int]:
    """A category's queries (`rows`: its photos by label): its photos outside the support, good first, or
    `per_category` of them (half good, half defective, in their order): the first outside the support in an order
    drawn by a generator seeded by (seed, category) only, so every k, method and process of a seed queries the same
    photos (bar the support's), and each seed its own (the first photos of each label, every seed, queried 7-14
    distinct defective photos per kind in the real-surface test report)."""
    if per_category is not None and per_category < 2:
        raise ValueError(
            f"queries_per_category takes half good, half defective photos: at least 2, got {per_category}"
        )
    rng = np.random.default_rng([seed, sum(map(ord, category)), 0, 1])
    half = None if per_category is None else per_category // 2
    queries = []
    for label in ("good", "defective"):
        pool = [int(j) for j in rows[label]]
        order = pool if half is None else [pool[i] for i in rng.permutation(len(pool))]
        chosen = set([j for j in order if j not in used][:half])
        queries += [j for j in pool if j in chosen]
    return queries


def control_support(items, good: list[int], bad: list[int], control: str | None, seed: int) -> list[dict]:
    support = [items[i] for i in good + bad]
    if control == "noise":
        rng = np.random.default_rng(seed)
        noise = [Image.fromarray(rng.integers(0, 256, (*s["image"].size[::-1], 3), dtype=np.uint8)) for s in support]
        support = [{**s, "image": n} for s, n in zip(support, noise, strict=True)]
    if control == "shuffled_labels" and support:  # each demo gets another demo's answer and description
        keys = ("defect_type", "position", "boxes", "description")
        rolled = support[1:] + support[:1]
        support = [{**s, **{k: r[k] for k in keys}, "image": s["image"]} for s, r in zip(support, rolled, strict=True)]
    return support


def _summary(per_seed: list[dict]) -> dict:
    keys = list(dict.fromkeys(k for s in per_seed for k in s if k != "n"))
    out = {"n": int(sum(s["n"] for s in per_seed))}
    for key in keys:
        values = np.array([s.get(key, np.nan) for s in per_seed], dtype=float)
        finite = values[~np.isnan(values)]
        out[key] = {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
        }
    return out


class _Headline:
    """The interval metrics of bootstrap resamples of `records` (the image metrics, with heatmaps the pixel ones, with
    boxes the hit rates), read from arrays made once (`PixelTable`, `box_hits`): `(S, n)` drawn positions in
    `records` -> name -> `(S,)`; NaN where a resample draws nothing a metric counts."""

    def __init__(self, records: list[dict], threshold: float):
        self.y = np.array([r["label"] == "defective" for r in records])
        self.p = np.array([r["p_defective"] for r in records], dtype=float)
        self.pixels, self.threshold = PixelTable(records), threshold
        self.boxes = {}  # name -> (the counted records' hits, the counted records)
        for name, key in BOX_RATES.items():
            hits, counted = box_hits(records, key)
            self.boxes[name] = hits & counted, counted

    def __call__(self, rows: np.ndarray) -> dict:
        y, p = self.y[rows], self.p[rows]
        pred = p >= self.threshold
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample of one class: NaN
            accuracy = ((pred & y).sum(1) / y.sum(1) + (~pred & ~y).sum(1) / (~y).sum(1)) / 2
            boxes = {name: hits[rows].sum(1) / counted[rows].sum(1) for name, (hits, counted) in self.boxes.items()}
        flat = (np.arange(len(rows))[:, None] * len(self.y) + rows).ravel()  # how often each record is drawn, per row
        counts = np.bincount(flat, minlength=len(rows) * len(self.y)).reshape(len(rows), -1)
        out = {"balanced_accuracy": accuracy, **ranking_metrics(y, p), **self.pixels.metrics(counts), **boxes}
        return {k: out[k] for k in INTERVAL_METRICS}


def aggregate(records: list[dict], threshold: float = 0.5, resamples: int = 1000) -> dict:
    """The mean over seeds (and its spread): overall, per category, per defect type and per defect size, and overall
    a 95% bootstrap interval (`ci95`) over seeds and queries (`resamples` draws; 0: none). The defective queries of
    one type or size are scored against all good queries of the same seed (seeds without such a query are left out
    of that group). Unreadable queries (verdict "error") are counted as `errors` and scored by nothing."""
    errors = sum(r.get("verdict") == "error" for r in records)
    records = [r for r in records if r.get("verdict") != "error"]
    seeds = sorted({r["seed"] for r in records})

    def over_seeds(select, key=None, value=None) -> dict | None:
        per_seed = []
        for seed in seeds:
            chosen = [r for r in records if r["seed"] == seed and select(r)]
            if chosen and (key is None or any(r[key] == value for r in chosen)):
                per_seed.append(metrics(chosen, threshold))
        return _summary(per_seed) if per_seed else None

    out = {"overall": over_seeds(lambda r: True), "errors": errors}
    if out["overall"] and resamples:
        for key, interval in bootstrap(records, _Headline(records, threshold), resamples).items():
            if key in out["overall"] and not np.isnan(interval[0]):
                out["overall"][key]["ci95"] = list(interval)
    out["per_category"] = {
        c: over_seeds(lambda r, c=c: r["category"] == c) for c in sorted({r["category"] for r in records})
    }
    for group, key in (("per_defect", "defect_type"), ("per_size", "size")):
        values = sorted({r[key] for r in records if r[key] is not None})
        out[group] = {v: over_seeds(lambda r, v=v, key=key: r[key] in (v, None), key, v) for v in values}
    return out


def make_inspector(model, processor, method: str, generate: bool, threshold: float, **kwargs):
    if method == "patchcore":  # training-free baseline: needs good supports, judges no label-swapped demos
        from .baseline import PatchCore

        return PatchCore(model, processor, **kwargs)
    if method == "kensa":
        return Inspector(model, processor, threshold=threshold, max_new_tokens=48 if generate else 0,
                         check_examples=False, **kwargs)  # fmt: skip
    raise ValueError(f"method must be 'kensa' or 'patchcore', got {method!r}")


def evaluate(
    model,
    processor,
    items,
    shots=(0, 1, 2, 4, 8),
    seeds: int = 5,
    queries_per_category: int | None = None,
    defective_shots: int = 0,
    controls=CONTROLS,
    control_shots: int = 4,
    generate: bool = True,
    threshold: float = 0.5,
    progress: bool = True,
    method: str = "kensa",
    resamples: int = 1000,
    **inspector_kwargs,
) -> dict:
    """Evaluate few-shot inspection on a split (a KensaSynth `Dataset` or a `layouts.Collection`).

    `method="patchcore"` scores the training-free kNN baseline instead (k >= 1, no shuffled-label control; its
    `scales` and `views`, see `baseline.PatchCore`, go in `inspector_kwargs`). Returns {"shots": {k: aggregate},
    "controls": {name: aggregate}, "records": [...], "config": {...}}; each record is one query (seed, shots,
    control, category, label, defect type, size, P(defective), boxes, and `pixels` for the pixel metrics)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from kensa_vl.train.data import noun

    rows = pools(items)
    runs = [(k, None) for k in shots] + [(control_shots, c) for c in controls]
    if method == "patchcore":
        runs = [(k, c) for k, c in runs if k > 0 and c != "shuffled_labels"]
    inspector = make_inspector(model, processor, method, generate, threshold, **inspector_kwargs)
    jobs = [(k, control, seed, category) for k, control in runs for seed in range(seeds) for category in sorted(rows)]
    state = PartialState()
    records = []
    with state.split_between_processes(list(enumerate(jobs))) as mine:
        bar = tqdm(total=len(jobs), desc=f"evaluating {method}", disable=not progress or not state.is_main_process)
        for job, (k, control, seed, category) in mine:
            d = defective_shots if control != "shuffled_labels" else max(defective_shots, 1)
            good, bad = support_for(rows, category, k, d, seed, control)
            inspector.noun = noun(category)
            if hasattr(inspector, "scale"):
                inspector.scale = (inspector_kwargs.get("scales") or {}).get(k, 1.0)
            if hasattr(inspector, "check_examples"):  # the other product's examples: is each query called unlike?
                inspector.check_examples = control == "other_category"
            inspector.set_support(control_support(items, good, bad, control, seed))
            context = dict(job=job, seed=seed, shots=k, control=control, category=category)
            keep = seed == 0 and control is None and k == max(shots)  # the heatmaps of the example sheets
            records += _judge(inspector, items, rows[category], set(good + bad), queries_per_category, context, keep)
            bar.update(state.num_processes)
        bar.close()
    if state.num_processes > 1:  # every process gets every record, in the one-process order
        records = sorted(gather_object(records), key=lambda r: (r["job"], r["query"]))
    out = {"shots": {}, "controls": {}, "records": records}
    for k, control in runs:
        chosen = [r for r in records if r["shots"] == k and r["control"] == control]
        resampled = resamples if control is None else 0  # intervals on the headline table only
        (out["controls"] if control else out["shots"])[control or k] = aggregate(chosen, threshold, resampled)
    out["config"] = dict(
        shots=list(shots),
        seeds=seeds,
        queries_per_category=queries_per_category,
        defective_shots=defective_shots,
        controls=list(controls),
        control_shots=control_shots,
        threshold=threshold,
        method=method,
        **{k: v for k, v in inspector_kwargs.items() if k in ("scales", "views")},
    )
    return out


def _judge(inspector, items, rows: dict, used: set, per_category: int | None, context: dict, keep: bool) -> list:
    """One record per query of a category (`per_category`: half good, half defective); an unreadable photo is an
    error record (verdict "error", its reason) and the others are judged. With `keep`, each record holds its
    heatmap at `SHEET_SIDE`² (`heatmap`) for the example sheets."""
    queries = queries_for(rows, context["category"], used, per_category, context["seed"])
    # scoring only: a support set's queries share forward passes (`Inspector.judge`'s batches), read a batch at a time
    size = SCORING_BATCH if getattr(inspector, "max_new_tokens", None) == 0 else 1
    out = []
    for first in range(0, len(queries), size):
        loaded = {}
        for order in range(first, min(first + size, len(queries))):
            try:
                loaded[order] = items[queries[order]]
            except ValueError as err:  # a corrupt photo or mask (layouts read them when asked)
                index = queries[order]
                out.append({**context, "query": order, "index": index, "label": items["label"][index],
                            "verdict": "error", "error": str(err), "p_defective": None})  # fmt: skip
        images = [item["image"] for item in loaded.values()]
        results = inspector.judge(images, batch_size=size) if size > 1 else inspector.judge(images)
        for (order, item), result in zip(loaded.items(), results, strict=True):
            out.append(_record(inspector, item, result, {**context, "query": order, "index": queries[order]}, keep))
    return sorted(out, key=lambda r: r["query"])


def _record(inspector, item: dict, result, record: dict, keep: bool) -> dict:
    """A judged query's record: `record` (its context) with the item's truth and the judgement."""
    mask = item.get("mask")
    mask = None if mask is None else np.asarray(mask) > 0
    record.update(
        label=item["label"],
        defect_type=item["defect_type"],
        size=item.get("size"),
        area=item.get("area"),
        verdict=result.verdict,
        p_defective=result.p_defective,
        boxes=result.boxes,
        true_boxes=[list(b) for b in item["boxes"]],
        text=result.text,
        generated_boxes=_written_boxes(inspector, result.text, item["image"]),
        pixels=None if result.heatmap is None else pixel_stats(result.heatmap, mask),
        heatmap=_small(result.heatmap) if keep else None,
        **({"file": item["file"]} if "file" in item else {}),
        **({"unlike": result.unlike} if getattr(inspector, "check_examples", False) else {}),  # `support_check`
    )
    return record


def _written_boxes(inspector, text: str, image) -> list | None:
    """The boxes a generated answer wrote, in the query's pixels (none for "good"); None where no answer was
    generated."""
    processor = getattr(inspector, "processor", None)
    if processor is None or not text:
        return None
    return [[round(v) for v in box] for box in processor.text_to_boxes(text, *image.size)]


def _small(heatmap: np.ndarray | None) -> np.ndarray | None:
    if heatmap is None:
        return None
    return np.asarray(Image.fromarray(heatmap).resize((SHEET_SIDE, SHEET_SIDE), Image.Resampling.BILINEAR))
