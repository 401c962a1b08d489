"""The grading evaluation: its sets, the training-free baseline, the metrics and `kensa-vl eval --task grading`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kensa_vl.eval.grading import PooledNearest, confusion, grading_metrics, grading_sets, named_records
from kensa_vl.train.data import grade_of, is_query, load_grading
from kensa_vl.train.data.names import GRADE_WORDS, GRADES


def test_sets_show_each_grade_its_limit_sample_and_unseen_names(synth_dir):
    items = load_grading(synth_dir)[0]["validation"]
    levels, limits = items["level"], items["limit"]
    sets = grading_sets(items, seeds=2, num_grades=3, shots=3)
    assert {(s["category"], s["attribute"]) for s in sets} == set(zip(items["category"], items["attribute"],
                                                                      strict=True))  # fmt: skip
    training = {n for names in GRADES["training"] for n in names} | set(GRADE_WORDS["training"])
    for chosen in sets:
        assert [chosen["grades"].count(g) for g in range(3)] == [3, 3, 3]
        assert chosen["grades"] == [grade_of(levels[i], 3) for i in chosen["support"]]
        shown = {g for i, g in zip(chosen["support"], chosen["grades"], strict=True) if limits[i]}
        assert shown == {0, 1}  # every grade but the last shows its limit sample
        assert chosen["queries"] and all(i not in chosen["support"] and is_query(levels[i], 3) and not limits[i]
                                         for i, _ in chosen["queries"])  # fmt: skip
        assert len(set(chosen["names"])) == 3 and not set(chosen["names"]) & training


def _grey(level: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(200 * (1 - 0.6 * level) + rng.normal(0, 6, (64, 64, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def test_the_baseline_grades_by_its_examples_and_follows_a_permutation(tiny):
    model, processor = tiny
    baseline = PooledNearest(model, processor)
    support = [_grey(level, i) for i, level in enumerate((0.0, 0.1, 0.45, 0.55, 0.9, 1.0))]
    queries = [(_grey(0.05, 10), 0), (_grey(0.5, 11), 1), (_grey(0.95, 12), 2)]
    baseline.set_support(support, [0, 0, 1, 1, 2, 2])
    assert [baseline.predict(q)[0] for q, _ in queries] == [g for _, g in queries]
    probs = baseline.predict(queries[0][0])[1]
    assert len(probs) == 3 and probs[0] == max(probs) and sum(probs) == pytest.approx(1)
    baseline.set_support(support, [2, 2, 0, 0, 1, 1])  # the grades move with their examples
    assert [baseline.predict(q)[0] for q, _ in queries] == [2, 0, 1]


def test_metrics_count_grades_their_distance_and_the_follow_rate():
    rows = [(0, "x", 0, 0, 0), (0, "x", 1, 2, 0), (1, "y", 0, 1, 1), (1, "y", 1, 1, None)]
    records = [{"method": "m", "run": "named", "seed": s, "attribute": a, "category": "c", "query": q, "grade": g,
                "predicted": p} for s, a, q, g, p in rows]  # fmt: skip
    rotated = [0, 1, 0, 2]  # the rotated run: same, differs, differs, second query unnamed in the first run
    records += [{**r, "run": "rotated", "predicted": p} for r, p in zip(records, rotated, strict=True)]
    m = grading_metrics(records, num_grades=3)["m"]
    assert m["queries"] == 4 and m["accuracy"] == 0.5 and m["ordinal_error"] == pytest.approx((0 + 2 + 0 + 2) / 4)
    assert m["attributes"]["x"]["accuracy"] == 0.5 and m["accuracy_seed_std"] == 0
    assert m["named_in_both_runs"] == 3 and m["follow_rate"] == pytest.approx(1 / 3)
    assert confusion(records[:4], 3).tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]]


def test_eval_task_grading_writes_its_report(tiny_dir, synth_dir, tmp_path):
    from kensa_vl.train.cli import main

    main(["eval", "--task", "grading", "--model", str(tiny_dir), "--data", str(synth_dir), "--split", "validation",
          "--seeds", "1", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "grading.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "grading_records.jsonl").read_text().splitlines()]
    assert result["metrics"]["pooled"]["queries"] == len(records) > 0
    assert result["config"]["split"] == "validation" and "coarseness" in result["metrics"]["pooled"]["attributes"]
    assert (tmp_path / "grading.md").read_text().startswith("| method |")
    assert Image.open(tmp_path / "grading_confusion.png").size[0] > 200


def test_the_model_is_evaluated_beside_the_baseline_with_its_follow_rate(synth_dir):
    from kensa_vl.eval.grading import evaluate_grading, joined
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    items = load_grading(synth_dir)[0]["test"]
    items = items.select([i for i, a in enumerate(items["attribute"]) if a in ("shade", "gloss")])
    result = evaluate_grading(model.eval(), processor, items, seeds=1, progress=False)
    kensa, pooled = result["metrics"]["kensa"], result["metrics"]["pooled"]
    assert kensa["queries"] == pooled["queries"] > 0 and set(kensa["attributes"]) == {"shade", "gloss"}
    runs = {r["run"] for r in result["records"] if r["method"] == "kensa"}
    assert runs == {"named", "rotated"} and kensa["named_in_both_runs"] > 0
    # the untrained model's answer names a grade of the prompt, read from its examples: the names rotate with it
    assert kensa["follow_rate"] > 0.9 and all(r["predicted"] is not None for r in result["records"])
    assert confusion(named_records(result["records"], "kensa"), 3).sum() == kensa["queries"]  # what the plot shows
    # the main job's shares of the sets, side by side, put together: the whole run
    shares = [evaluate_grading(model, processor, items, seeds=1, progress=False, part=(i, 3)) for i in range(3)]
    assert all(share["records"] for share in shares) and joined(shares) == result
    with pytest.raises(ValueError, match=r"0 <= i < n.*\(3, 3\)"):
        evaluate_grading(model, processor, items, seeds=1, part=(3, 3))
