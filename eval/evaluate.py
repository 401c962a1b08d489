"""Few-shot inspection evaluation on KensaSynth (or any split with the same columns).

Per category and seed one fixed support set of k good photos (plus `defective_shots` described defective ones);
queries are the category's other photos, half good, half defective. Metrics: balanced accuracy, overkill (good
rejected), miss (defect passed), AUROC from P(defective), expected calibration error, yes-ratio on the good and on
the defective queries, and for defective queries box hit rate (IoU >= 0.5), the same on defects covering at least
1% of the image (`box_hit_rate_1pct`) and AP50; overall, per category, per defect type and per defect size,
mean +- std over seeds.

Controls (at `control_shots`): support from another category, noise images as support, and labels swapped in the
demos. A model that uses its examples does worse under each.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .inspector import Inspector

CONTROLS = ("other_category", "noise", "shuffled_labels")
LARGE_AREA = 0.01  # `box_hit_rate_1pct`: the hit rate on defects covering at least this fraction of the image


def box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ap50(records: list[dict]) -> float:
    """VOC all-point AP at IoU 0.5 over defective queries; every predicted box is scored by P(defective)."""
    truths = sum(len(r["true_boxes"]) for r in records)
    predictions = [(r["p_defective"], i, box) for i, r in enumerate(records) for box in r["boxes"]]
    if truths == 0:
        return float("nan")
    predictions.sort(key=lambda p: -p[0])
    used, hits = set(), []
    for _, i, box in predictions:
        ious = [(box_iou(box, t), j) for j, t in enumerate(records[i]["true_boxes"]) if (i, j) not in used]
        best = max(ious, default=(0.0, None))
        hits.append(best[0] >= 0.5)
        if best[0] >= 0.5:
            used.add((i, best[1]))
    if not hits:
        return 0.0
    tp = np.cumsum(hits)
    precision, recall = tp / np.arange(1, len(hits) + 1), tp / truths
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def metrics(records: list[dict], threshold: float = 0.5, bins: int = 10) -> dict:
    """The verdict and box metrics of a list of query records (see `evaluate`)."""
    from sklearn.metrics import roc_auc_score

    y = np.array([r["label"] == "defective" for r in records])
    p = np.array([r["p_defective"] for r in records])
    pred = p >= threshold
    good, bad = ~y, y
    out = {
        "n": len(records),
        "overkill": float(pred[good].mean()) if good.any() else float("nan"),
        "miss": float((~pred[bad]).mean()) if bad.any() else float("nan"),
        "auroc": float(roc_auc_score(y, p)) if good.any() and bad.any() else float("nan"),
    }
    out["balanced_accuracy"] = 1 - (out["overkill"] + out["miss"]) / 2
    out["yes_ratio_good"], out["yes_ratio_defective"] = out["overkill"], 1 - out["miss"]
    which = np.minimum((p * bins).astype(int), bins - 1)  # ECE: |accuracy - confidence| over equal-width bins
    confidence, correct = np.where(pred, p, 1 - p), pred == y
    out["ece"] = float(
        sum(
            abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )
    defective = [r for r in records if r["label"] == "defective"]
    if defective and "true_boxes" in defective[0]:
        hit = [any(box_iou(b, t) >= 0.5 for b in r["boxes"] for t in r["true_boxes"]) for r in defective]
        out["box_hit_rate"], out["ap50"] = float(np.mean(hit)), ap50(defective)
        visible = [h for h, r in zip(hit, defective, strict=True) if (r.get("area") or 0) >= LARGE_AREA]
        if visible:
            out["box_hit_rate_1pct"] = float(np.mean(visible))
    return out


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


def aggregate(records: list[dict], threshold: float = 0.5) -> dict:
    """Mean +- std over seeds: overall, per category, per defect type and per defect size. The defective queries
    of one type or size are scored against all good queries of the same seed (seeds without such a query are
    left out of that group)."""
    seeds = sorted({r["seed"] for r in records})

    def over_seeds(select, key=None, value=None) -> dict | None:
        per_seed = []
        for seed in seeds:
            chosen = [r for r in records if r["seed"] == seed and select(r)]
            if chosen and (key is None or any(r[key] == value for r in chosen)):
                per_seed.append(metrics(chosen, threshold))
        return _summary(per_seed) if per_seed else None

    out = {"overall": over_seeds(lambda r: True)}
    out["per_category"] = {
        c: over_seeds(lambda r, c=c: r["category"] == c) for c in sorted({r["category"] for r in records})
    }
    for group, key in (("per_defect", "defect_type"), ("per_size", "size")):
        values = sorted({r[key] for r in records if r[key] is not None})
        out[group] = {v: over_seeds(lambda r, v=v, key=key: r[key] in (v, None), key, v) for v in values}
    return out


def support_for(rows: dict, category: str, k: int, defective_k: int, seed: int, control: str | None = None):
    """Indices of the support set (k good, defective_k defective) for one category, seed and control."""
    rng = np.random.default_rng([seed, sum(map(ord, category)), k])
    source = category
    if control == "other_category":
        others = sorted(c for c in rows if c != category)
        if not others:
            raise ValueError("the other_category control needs at least two categories in the split")
        source = others[rng.integers(len(others))]
    good, bad = rows[source]["good"], rows[source]["defective"]
    if k > len(good) - 1 or defective_k > len(bad) - 1:
        raise ValueError(
            f"category {source!r} has {len(good)} good and {len(bad)} defective photos; a support of {k} good and "
            f"{defective_k} defective leaves none to query"
        )
    return [int(i) for i in rng.choice(good, k, replace=False)], [
        int(i) for i in rng.choice(bad, defective_k, replace=False)
    ]


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


def evaluate(
    model,
    processor,
    items,
    shots=(0, 1, 2, 4, 8),
    seeds: int = 3,
    queries_per_category: int | None = None,
    defective_shots: int = 0,
    controls=CONTROLS,
    control_shots: int = 4,
    generate: bool = True,
    threshold: float = 0.5,
    progress: bool = True,
    method: str = "kensa",
    **inspector_kwargs,
) -> dict:
    """Evaluate few-shot inspection on a split (a datasets `Dataset` of KensaSynth items).

    `method="patchcore"` scores the training-free kNN baseline instead (k >= 1, no shuffled-label control).
    Returns {"shots": {k: aggregate}, "controls": {name: aggregate}, "records": [...], "config": {...}}; each
    record is one query (seed, shots, control, category, label, defect type, size, P(defective), boxes).
    """
    from kensa_vl.train.data import MATERIALS

    rows = {}
    for i, (category, label) in enumerate(zip(items["category"], items["label"], strict=True)):
        rows.setdefault(category, {"good": [], "defective": []})[label].append(i)
    runs = [(k, None) for k in shots] + [(control_shots, c) for c in controls]
    if method == "patchcore":  # training-free baseline: needs good supports, judges no label-swapped demos
        from .baseline import PatchCore

        runs = [(k, c) for k, c in runs if k > 0 and c != "shuffled_labels"]
        inspector = PatchCore(model, processor, **inspector_kwargs)
    elif method == "kensa":
        inspector = Inspector(
            model, processor, threshold=threshold, max_new_tokens=48 if generate else 0, **inspector_kwargs
        )
    else:
        raise ValueError(f"method must be 'kensa' or 'patchcore', got {method!r}")
    total = len(runs) * seeds * len(rows)
    records = []
    with tqdm(total=total, desc="evaluating", disable=not progress, unit="support set") as bar:
        for k, control in runs:
            d = defective_shots if control != "shuffled_labels" else max(defective_shots, 1)
            for seed in range(seeds):
                for category in sorted(rows):
                    good, bad = support_for(rows, category, k, d, seed, control)
                    inspector.noun = MATERIALS[category].noun if category in MATERIALS else category
                    inspector.set_support(control_support(items, good, bad, control, seed))
                    records += _judge(
                        inspector,
                        items,
                        rows[category],
                        set(good + bad),
                        queries_per_category,
                        dict(seed=seed, shots=k, control=control, category=category),
                    )
                    bar.update()
    out = {"shots": {}, "controls": {}, "records": records}
    for k, control in runs:
        chosen = [r for r in records if r["shots"] == k and r["control"] == control]
        (out["controls"] if control else out["shots"])[control or k] = aggregate(chosen, threshold)
    out["config"] = dict(
        shots=list(shots),
        seeds=seeds,
        queries_per_category=queries_per_category,
        defective_shots=defective_shots,
        controls=list(controls),
        control_shots=control_shots,
        threshold=threshold,
    )
    return out


def _judge(inspector: Inspector, items, rows: dict, used: set, per_category: int | None, context: dict) -> list:
    half = None if per_category is None else per_category // 2
    queries = [i for label in ("good", "defective") for i in [j for j in rows[label] if j not in used][:half]]
    out = []
    for i in queries:
        item = items[i]
        result = inspector.judge(item["image"])[0]
        out.append(
            {
                **context,
                "index": i,
                "label": item["label"],
                "defect_type": item["defect_type"],
                "size": item["size"],
                "area": item.get("area"),
                "p_defective": result.p_defective,
                "boxes": result.boxes,
                "true_boxes": [list(b) for b in item["boxes"]],
                "text": result.text,
            }
        )
    return out
