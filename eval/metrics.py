"""The metrics of anomaly detection as the field computes them, on query records (see `evaluate`).

Image level (scikit-learn): AUROC, AUPR (average precision), F1-max (the best F1 over thresholds), and at the chosen
threshold balanced accuracy, overkill (good rejected), miss (defect passed), the yes-ratios and the expected
calibration error. Pixel level, from each query's heatmap against its true mask: pixel AUROC and AUPRO (the area
under the per-region overlap curve up to a false-positive rate of 0.3, normalised to 1; Bergmann et al., MVTec AD),
8-connected regions (scipy). Boxes: hit rate (IoU >= 0.5) and AP50.

Pixel metrics are taken on `PIXEL_SIDE` x `PIXEL_SIDE` maps (the heatmap resized bilinearly, a mask cell anomalous
when any of its pixels is) and on heatmap values binned in `BINS` fixed bins of log-distance, so each query keeps
two histograms, not its map, and a bootstrap resample costs a sum: a pixel AUROC agrees with scikit-learn's exact one
to 1e-3 (tested). Intervals: `bootstrap`, over seeds and the queries within each.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

PIXEL_SIDE = 256
# heatmap values: a log cosine distance over the supports' level (`distance_map`), so either sign; the edges keep
# every value a floored distance and a level can give apart (LOG_FLOOR: log 1e-6 = -13.8)
BINS = np.linspace(-16.0, 16.0, 3201)
AUPRO_LIMIT = 0.3
LARGE_AREA = 0.01  # `box_hit_rate_1pct`: the hit rate on defects covering at least this fraction of the image


def box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# the hit rates on defects covering at least LARGE_AREA of the image: name -> the records' key holding the boxes
# (`generated_boxes`: what the generated answer wrote, what `generate` and the pipeline give)
BOX_RATES = {"box_hit_rate_1pct": "boxes", "generated_box_hit_rate_1pct": "generated_boxes"}


def box_hits(records: list[dict], key: str = "boxes") -> tuple[np.ndarray, np.ndarray]:
    """Per record: whether it is defective with true boxes and `key` set and one of its `key` boxes overlaps one of
    them at IoU >= 0.5, and whether it counts toward a `BOX_RATES` hit rate (such a record whose defect covers at
    least `LARGE_AREA` of the image). The metrics and their bootstrap resamples read the same two arrays."""
    boxed = [r["label"] == "defective" and r.get("true_boxes") is not None and r.get(key) is not None for r in records]
    hits = np.array([b and any(box_iou(x, t) >= 0.5 for x in r[key] for t in r["true_boxes"])
                     for b, r in zip(boxed, records, strict=True)], dtype=bool)  # fmt: skip
    counted = np.array(boxed, dtype=bool) & np.array([(r.get("area") or 0) >= LARGE_AREA for r in records], dtype=bool)
    return hits, counted


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


def image_metrics(y: np.ndarray, p: np.ndarray, threshold: float, bins: int = 10) -> dict:
    """Verdict metrics of labels `y` (True: defective) and scores `p` (P(defective)) at `threshold`."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    pred, good, bad = p >= threshold, ~y, y
    out = {
        "n": int(len(y)),
        "overkill": float(pred[good].mean()) if good.any() else float("nan"),
        "miss": float((~pred[bad]).mean()) if bad.any() else float("nan"),
    }
    out["balanced_accuracy"] = 1 - (out["overkill"] + out["miss"]) / 2
    out["yes_ratio_good"], out["yes_ratio_defective"] = out["overkill"], 1 - out["miss"]
    both = bool(good.any() and bad.any())
    out["auroc"] = float(roc_auc_score(y, p)) if both else float("nan")
    out["aupr"] = float(average_precision_score(y, p)) if both else float("nan")
    if both:
        precision, recall, _ = precision_recall_curve(y, p)
        out["f1_max"] = float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12)))
    else:
        out["f1_max"] = float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)  # ECE: |accuracy - confidence| over equal-width bins
    confidence, correct = np.where(pred, p, 1 - p), pred == y
    out["ece"] = float(
        sum(
            abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )
    return out


def ranking_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Image AUROC, AUPR (average precision) and F1-max of each row of labels `y` and scores `p` `(S, n)`, for a
    bootstrap's resamples at once (scikit-learn's input checks alone take ~20 ms a call): from each row's counts of
    defective and good queries at each distinct score. Equal to scikit-learn's `roc_auc_score`,
    `average_precision_score` and the F1-max of `precision_recall_curve`, ties included (tested); NaN for a row of
    one class. Returns name -> `(S,)`."""
    rows, n = p.shape
    values, which = np.unique(p, return_inverse=True)
    at = (np.arange(rows)[:, None] * len(values) + which.reshape(rows, n)).ravel()
    bad = np.bincount(at, y.ravel().astype(float), rows * len(values)).reshape(rows, -1)
    good = np.bincount(at, (~y).ravel().astype(float), rows * len(values)).reshape(rows, -1)
    positives, negatives = bad.sum(1), good.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a defective query outranks the good ones below its score and half of those tied with it
        auroc = (bad * (np.cumsum(good, 1) - good / 2)).sum(1) / (positives * negatives)
        tp, seen = np.cumsum(bad[:, ::-1], 1), np.cumsum((bad + good)[:, ::-1], 1)  # thresholds from the top down
        precision, recall = tp / np.maximum(seen, 1), tp / positives[:, None]
        aupr = (np.diff(recall, axis=1, prepend=0.0) * precision).sum(1)  # a score nobody has adds no recall
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    one_class = (positives == 0) | (negatives == 0)
    out = {"auroc": auroc, "aupr": aupr, "f1_max": f1.max(1)}
    return {name: np.where(one_class, np.nan, value) for name, value in out.items()}


def pixel_stats(heatmap: np.ndarray, mask: np.ndarray | None) -> dict:
    """What the pixel metrics keep of one query: histograms over `BINS` of its normal cells and of each 8-connected
    defect region, on `PIXEL_SIDE`² maps. `heatmap` `(H, W)` float (log-distance), `mask` `(H', W')` bool or None
    (a good query); their sizes may differ (both are resized)."""
    from scipy import ndimage

    side = (PIXEL_SIDE, PIXEL_SIDE)
    values = np.asarray(Image.fromarray(np.asarray(heatmap, np.float32)).resize(side, Image.Resampling.BILINEAR))
    which = np.clip(np.searchsorted(BINS, values.ravel(), side="right") - 1, 0, len(BINS) - 2).reshape(side)
    anomalous = np.zeros(side, bool)
    if mask is not None and np.any(mask):
        area = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(side, Image.Resampling.BOX)
        anomalous = np.asarray(area) > 0
    count = len(BINS) - 1
    regions, n = ndimage.label(anomalous, structure=np.ones((3, 3)))
    return {
        "normal": np.bincount(which[~anomalous], minlength=count).astype(np.int32),
        "regions": [np.bincount(which[regions == r], minlength=count).astype(np.int32) for r in range(1, n + 1)],
    }


def _from_top(histogram: np.ndarray) -> np.ndarray:
    """Fraction at or above each bin's lower edge, over thresholds from the highest bin down (with 0 first)."""
    counts = np.cumsum(histogram[..., ::-1], axis=-1)
    total = counts[..., -1:]
    zero = np.zeros((*histogram.shape[:-1], 1))
    return np.concatenate([zero, counts / np.maximum(total, 1)], axis=-1)


def pixel_auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC of the pixels from two histograms over the same bins (ties within a bin count half)."""
    if normal.sum() == 0 or anomalous.sum() == 0:
        return float("nan")
    fpr, tpr = _from_top(normal), _from_top(anomalous)
    return float(np.trapezoid(tpr, fpr))


def aupro(normal: np.ndarray, regions: np.ndarray, limit: float = AUPRO_LIMIT) -> float:
    """Area under the per-region-overlap curve up to false-positive rate `limit`, over `limit` (1 is perfect).
    `normal`: histogram of the normal pixels; `regions`: `(R, bins)`, one histogram per defect region. At each
    threshold the overlap is the mean over regions of the fraction of the region's pixels at or above it."""
    if normal.sum() == 0 or len(regions) == 0:
        return float("nan")
    return float(_areas_to(_from_top(normal)[None], _from_top(np.asarray(regions)).mean(0)[None], limit)[0])


def pixel_metrics(records: list[dict]) -> dict:
    """Pixel AUROC and AUPRO over the records that carry `pixels` (`pixel_stats`); empty when none does."""
    stats = [r["pixels"] for r in records if r.get("pixels") is not None]
    if not stats:
        return {}
    normal = np.sum([s["normal"] for s in stats], 0, dtype=np.int64)
    regions = [h for s in stats for h in s["regions"]]
    anomalous = np.sum(regions, 0, dtype=np.int64) if regions else np.zeros_like(normal)
    return {"pixel_auroc": pixel_auroc(normal, anomalous), "aupro": aupro(normal, regions)}


class PixelTable:
    """The `pixel_stats` of a list of records as arrays, so that the pixel metrics of any multiset of them (a
    bootstrap resample: how often each record is drawn) cost two matrix products instead of summing and ranking
    their histograms anew; `pixel_metrics` of the drawn records, to float rounding (tested)."""

    def __init__(self, records: list[dict]):
        stats = [r.get("pixels") for r in records]
        none, empty = np.zeros(len(BINS) - 1), np.zeros((0, len(BINS) - 1))  # a record without a heatmap; no region
        self.normal = np.stack([none if s is None else s["normal"] for s in stats]).astype(float)
        owned = [(i, h) for i, s in enumerate(stats) if s is not None for h in s["regions"]]
        self.owner = np.array([i for i, _ in owned], dtype=np.int64)
        self.regions = (np.stack([h for _, h in owned]) if owned else empty).astype(float)  # float: BLAS products
        self.overlap = _from_top(self.regions)  # each region's overlap at every threshold

    def metrics(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """`pixel_metrics` of each row of `counts` `(S, N)`, the records drawn that many times each (NaN where a
        row draws no heatmap or no defect region): name -> `(S,)`."""
        drawn = np.flatnonzero(counts.any(0))  # a resample draws from one seed's records: multiply those rows only
        counts = counts[:, drawn].astype(float)
        normal = counts @ self.normal[drawn]
        regions = np.flatnonzero(np.isin(self.owner, drawn))
        weights = counts[:, np.searchsorted(drawn, self.owner[regions])]
        anomalous, total = weights @ self.regions[regions], weights.sum(1)
        fpr, tpr = _from_top(normal), _from_top(anomalous)
        with np.errstate(divide="ignore", invalid="ignore"):
            pro = weights @ self.overlap[regions] / total[:, None]
        auroc = np.where((normal.sum(1) > 0) & (anomalous.sum(1) > 0), np.trapezoid(tpr, fpr, axis=1), np.nan)
        return {
            "pixel_auroc": auroc,
            "aupro": np.where((normal.sum(1) > 0) & (total > 0), _areas_to(fpr, pro), np.nan),
        }


def _areas_to(fpr: np.ndarray, pro: np.ndarray, limit: float = AUPRO_LIMIT) -> np.ndarray:
    """Per row of `fpr` and `pro` `(S, T)` (the false-positive rate, non-decreasing from 0, and the mean overlap at
    each threshold): the area under `pro` up to `fpr` = `limit` (interpolated there), over `limit`."""
    end = (fpr <= limit).sum(1)  # fpr is non-decreasing along a row and starts at 0
    inside = np.arange(1, fpr.shape[1])[None] < end[:, None]  # trapezoids wholly at or below the limit
    area = np.where(inside, np.diff(fpr, axis=1) * (pro[:, 1:] + pro[:, :-1]) / 2, 0.0).sum(1)
    rows, last = np.arange(len(fpr)), end - 1
    cut = end < fpr.shape[1]
    nxt = np.minimum(end, fpr.shape[1] - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = pro[rows, last] + (limit - fpr[rows, last]) * (pro[rows, nxt] - pro[rows, last]) / (
            fpr[rows, nxt] - fpr[rows, last]
        )
    area += np.where(cut, (limit - fpr[rows, last]) * (pro[rows, last] + y) / 2, 0.0)
    return area / limit


def metrics(records: list[dict], threshold: float = 0.5) -> dict:
    """Image, pixel (when the records carry `pixels`, see `pixel_stats`) and box metrics of a list of records."""
    y = np.array([r["label"] == "defective" for r in records])
    p = np.array([r["p_defective"] for r in records], dtype=float)
    out = {**image_metrics(y, p, threshold), **pixel_metrics(records)}
    if records and "unlike" in records[0]:  # the queries were checked against the examples (`Judgement.unlike`)
        out["unlike_share"] = float(np.mean([r["unlike"] is not None for r in records]))
    defective = [r for r in records if r["label"] == "defective"]
    if defective and "true_boxes" in defective[0]:
        found = {key: box_hits(records, key) for key in BOX_RATES.values()}
        out["box_hit_rate"], out["ap50"] = float(found["boxes"][0][y].mean()), ap50(defective)
        for name, key in BOX_RATES.items():  # the Inspector's boxes; the generated answer's, where it was generated
            hits, counted = found[key]
            if counted.any():
                out[name] = float(hits[counted].mean())
    return out


def bootstrap(records: list[dict], statistic, resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """A `level` percentile interval of a statistic of one seed's records, averaged over seeds: each resample draws
    the seeds with replacement and, within each, its queries with replacement. `statistic(rows)` takes the drawn
    positions in `records` of many such draws at once, `(S, n)` (all of one seed), and returns name -> `(S,)`.
    Returns {name: (low, high)}."""
    with warnings.catch_warnings():  # a resample of one class has no AUROC: NaN, left out of the mean
        warnings.simplefilter("ignore", RuntimeWarning)
        return _bootstrap(records, statistic, resamples, seed, level)


BOOTSTRAP_CHUNK = 256  # drawn seeds per `statistic` call: bounded memory on large splits


def _bootstrap(records, statistic, resamples, seed, level):
    rng = np.random.default_rng(seed)
    by_seed = {}
    for i, r in enumerate(records):
        by_seed.setdefault(r["seed"], []).append(i)
    groups = [np.array(g) for g in by_seed.values()]
    drawn = [([], []) for _ in groups]  # per seed: the (resample, place) slots that drew it, and the rows drawn
    for resample in range(resamples):
        for place, g in enumerate(rng.integers(len(groups), size=len(groups))):
            drawn[g][0].append(resample * len(groups) + place)
            drawn[g][1].append(groups[g][rng.integers(len(groups[g]), size=len(groups[g]))])
    values = {}
    for slots, rows in drawn:
        for start in range(0, len(slots), BOOTSTRAP_CHUNK):
            chunk = slice(start, start + BOOTSTRAP_CHUNK)
            for name, value in statistic(np.stack(rows[chunk])).items():
                values.setdefault(name, np.full(resamples * len(groups), np.nan))[slots[chunk]] = value
    tail = (1 - level) / 2 * 100
    means = {name: np.nanmean(v.reshape(resamples, len(groups)), 1) for name, v in values.items()}
    return {name: tuple(float(x) for x in np.nanpercentile(m, [tail, 100 - tail])) for name, m in means.items()}
