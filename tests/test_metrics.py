"""The field's metrics against references on known inputs: scikit-learn's exact curves, and AUPRO cases worked out
by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kensa_vl.eval.metrics import (
    BINS,
    PIXEL_SIDE,
    PixelTable,
    aupro,
    bootstrap,
    image_metrics,
    pixel_auroc,
    pixel_metrics,
    pixel_stats,
    ranking_metrics,
)


def _hist(values) -> np.ndarray:
    which = np.clip(np.searchsorted(BINS, np.asarray(values).ravel(), side="right") - 1, 0, len(BINS) - 2)
    return np.bincount(which, minlength=len(BINS) - 1)


def test_binned_pixel_auroc_agrees_with_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(-4, 1, 50_000), rng.normal(-3, 1.2, 3_000)  # log-distances, overlapping
    exact = roc_auc_score(np.r_[np.zeros(normal.size), np.ones(anomalous.size)], np.r_[normal, anomalous])
    assert pixel_auroc(_hist(normal), _hist(anomalous)) == pytest.approx(exact, abs=1e-3)
    assert pixel_auroc(_hist(np.linspace(-8, -5, 1000)), _hist(np.full(10, -1.0))) == pytest.approx(1.0)
    assert np.isnan(pixel_auroc(_hist(normal), np.zeros(len(BINS) - 1)))


def test_pixel_auroc_ranks_cells_above_their_level():
    """Heatmaps are log-distances over the supports' level: a defect lies above 0, often well above, and is still
    told apart from good cells that lie above it less far."""
    normal, defect = np.linspace(-3, 1.5, 1000), np.linspace(2, 4, 100)
    assert pixel_auroc(_hist(normal), _hist(defect)) == pytest.approx(1.0)


def test_aupro_by_hand():
    normal = _hist(np.linspace(-8, -2, 10_000))  # uniform: the FPR at threshold t is the share of normals above t
    high, low = np.full(100, -0.5), np.full(100, -8.5)  # above every normal pixel / below every one
    assert aupro(normal, [_hist(high)]) == pytest.approx(1.0)
    # half of the region is found at once, the other half only at FPR 1: overlap 0.5 all the way to 0.3
    assert aupro(normal, [_hist(np.r_[high[:50], low[:50]])]) == pytest.approx(0.5, abs=2e-3)
    # one region found at once, one at the normals' 80th percentile (FPR 0.2): (0.5 * 0.2 + 1 * 0.1) / 0.3
    at_80 = np.full(100, -8 + 0.8 * 6 + 0.01)
    assert aupro(normal, [_hist(high), _hist(at_80)]) == pytest.approx(2 / 3, abs=5e-3)
    assert np.isnan(aupro(normal, []))


def test_image_metrics_by_hand():
    from sklearn.metrics import average_precision_score

    y, p = np.array([False, False, True, True]), np.array([0.1, 0.4, 0.35, 0.8])
    m = image_metrics(y, p, threshold=0.5)
    assert m["f1_max"] == pytest.approx(0.8)  # at 0.35: precision 2/3, recall 1
    assert m["aupr"] == pytest.approx(average_precision_score(y, p)) == pytest.approx((1 + 2 / 3) / 2)
    assert m["auroc"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)


def test_pixel_stats_keep_small_defects_and_count_regions():
    heatmap = np.full((1024, 1024), -6.0, np.float32)
    mask = np.zeros((1024, 1024), bool)
    mask[10, 10] = True  # one pixel: still a region at PIXEL_SIDE (a cell is anomalous when any pixel is)
    mask[500:600, 700:720] = True
    heatmap[500:600, 700:720] = -1.0
    stats = pixel_stats(heatmap, mask)
    assert len(stats["regions"]) == 2
    assert stats["normal"].sum() + sum(r.sum() for r in stats["regions"]) == PIXEL_SIDE**2
    assert pixel_stats(heatmap, None)["regions"] == [] and pixel_stats(heatmap, None)["normal"].sum() == PIXEL_SIDE**2


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(1)

    def interval(records, resamples):
        x = np.array([r["x"] for r in records])
        return bootstrap(records, lambda rows: {"x": x[rows].mean(1)}, resamples)["x"]

    def records(n):
        return [{"seed": s, "x": rng.normal(1.0, 1.0)} for s in range(5) for _ in range(n)]

    few, many = interval(records(10), 300), interval(records(400), 300)
    assert few[0] < 1.0 < few[1] and many[0] < 1.0 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 3
    assert interval([{"seed": s, "x": 2.0} for s in range(3)], 50) == (2.0, 2.0)


def test_the_bootstrap_equals_the_metrics_of_each_resamples_records():
    """The batched resamples (`_Headline` over drawn positions) against the definition: draw the seeds, then each
    seed's queries, take `metrics` (scikit-learn's curves, the records' summed histograms) of each drawn set, average
    over the drawn seeds, and take the percentiles; seeds of unequal size, tied scores, records without heatmaps, box
    hit rates with defects too small to count and answers never generated."""
    from kensa_vl.eval.evaluate import INTERVAL_METRICS, _Headline
    from kensa_vl.eval.metrics import metrics

    rng = np.random.default_rng(3)
    records = []
    for seed, n in enumerate((14, 9, 12)):
        for q in range(n):
            heatmap, mask = rng.normal(-4, 1, (32, 32)), None
            if q % 3 == 1:
                mask = np.zeros((32, 32), bool)
                mask[4 : 9 + q, 3:12] = True
                heatmap[mask] += rng.uniform(0, 3)
            true = [[10, 10, 40, 30]] if q % 2 else []
            near = [[12, 8, 41, 33]] if rng.random() < 0.6 else [[50, 50, 60, 60]]  # a hit or a miss
            records.append({"seed": seed, "label": "defective" if q % 2 else "good",
                            "p_defective": float(np.round(rng.random(), 1)),
                            "pixels": None if q == 4 else pixel_stats(heatmap, mask),
                            # boxes: a defect under 1% of the image and an answer never generated count in no rate
                            "true_boxes": true, "area": 0.005 if q == 5 else 0.02, "boxes": near if q % 2 else [],
                            "generated_boxes": None if q == 3 else (near[::-1] if q % 4 else [])})  # fmt: skip
    resamples, draw = 40, np.random.default_rng(0)  # the bootstrap's own order of draws
    seeds = [[r for r in records if r["seed"] == s] for s in range(3)]
    means = []
    for _ in range(resamples):
        drawn = [seeds[g] for g in draw.integers(3, size=3)]
        values = [metrics([group[i] for i in draw.integers(len(group), size=len(group))]) for group in drawn]
        means.append({k: np.nanmean([v.get(k, np.nan) for v in values]) for k in INTERVAL_METRICS})
    fast = bootstrap(records, _Headline(records, 0.5), resamples)
    for name in INTERVAL_METRICS:
        expected = np.nanpercentile([m[name] for m in means], [2.5, 97.5])
        assert fast[name] == pytest.approx(tuple(expected), abs=1e-9), name


@pytest.mark.parametrize("seed", range(5))
def test_the_bootstraps_ranking_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(40) < 0.4
    p = np.round(rng.random(40), 1)  # many ties
    other = rng.random(40) < 0.5
    fast = ranking_metrics(np.stack([y, other, np.zeros(40, bool)]), np.stack([p, p, p]))  # rows apart
    for row, labels in enumerate((y, other)):
        reference = image_metrics(labels, p, 0.5)
        for name in ("auroc", "aupr", "f1_max"):
            assert fast[name][row] == pytest.approx(reference[name], abs=1e-12), name
    assert all(np.isnan(v[2]) for v in fast.values())  # one class: no ranking


def test_the_defect_kind_table_counts_the_distinct_photos_of_each_kind():
    """A kind's recall over a few photos moves in steps of one photo: the table says how many were queried (the same
    photo in two seeds counts once; controls, good photos and unreadable ones not at all)."""
    from kensa_vl.eval.report import defect_table

    per = {"miss": {"mean": 0.5}, "auroc": {"mean": 0.75}}

    def record(seed, index, kind, **changes):
        base = {"seed": seed, "shots": 4, "control": None, "label": "defective", "defect_type": kind,
                "category": "wood", "index": index, "verdict": "defective"}  # fmt: skip
        return {**base, **changes}

    records = [
        record(0, 1, "smear"), record(1, 1, "smear"), record(0, 2, "dent"), record(1, 3, "dent"),
        record(0, 4, "dent", category="stone"), record(0, 5, "dent", control="noise"), record(0, 6, "dent", shots=2),
        record(0, 7, "dent", verdict="error"), record(0, 8, None, label="good"),
    ]  # fmt: skip
    results = {"kensa": {"shots": {2: {}, 4: {"per_defect": {"dent": per, "smear": per}}}, "records": records}}
    lines = defect_table(results).splitlines()
    assert lines[2] == "| method | dent | smear |" and lines[4] == "| KensaVL | 0.50 (0.75) | 0.50 (0.75) |"
    assert lines[5] == "| distinct photos queried | 3 | 1 |"


def test_a_resamples_pixel_metrics_from_the_table_equal_summing_its_records():
    """`PixelTable.metrics` (what the bootstrap reads) against `pixel_metrics` of the drawn records themselves:
    records drawn twice count twice, records without heatmaps (or with no defect) add nothing of their own."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        heatmap = rng.normal(-4, 1, (64, 64))
        mask = None
        if i % 3:
            mask = np.zeros((64, 64), bool)
            mask[8 * (i % 4) : 8 * (i % 4) + 10, 20 : 30 + i] = True
            mask[50:54, 5:9] = i % 2 == 0  # a second region on some
            heatmap[mask] += rng.uniform(0.5, 3)
        records.append({"pixels": None if i == 5 else pixel_stats(heatmap, mask)})
    table = PixelTable(records)
    for _ in range(4):
        rows = rng.integers(len(records), size=len(records))
        fast = table.metrics(np.bincount(rows, minlength=len(records))[None])
        slow = pixel_metrics([records[i] for i in rows])
        assert fast.keys() == slow.keys() == {"pixel_auroc", "aupro"}
        assert {k: v[0] for k, v in fast.items()} == pytest.approx(slow, rel=1e-9, abs=1e-12)
    alone = table.metrics(np.eye(len(records), dtype=int)[[5, 3]])  # no heatmap; a good photo's heatmap alone
    assert pixel_metrics([records[5]]) == {} and np.isnan([*alone["pixel_auroc"], *alone["aupro"]]).all()
