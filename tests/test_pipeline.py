"""The offline main job end to end on a tiny budget: every output it promises, loadable by the Auto classes."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_main_job_writes_model_metrics_plots_and_logs(main_run, synth_dir):
    from transformers import AutoModelForImageTextToText

    from kensa_vl.eval.grading import grading_sets
    from kensa_vl.train.cli import main_job
    from kensa_vl.train.data import load_grading

    out, metrics = main_run

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run"]["categories"] == ["cap", "grass", "leather"] and saved["run"]["split"] == "test"
    assert saved["run"]["phases"] == 2  # each query judged moved half a cell too, as `kensa-vl eval` does
    evaluations = {"inspection", "real_surfaces", "grading", "naming", "real_naming"}
    assert set(saved["run"]["evaluation_seconds"]) == evaluations
    assert all(seconds > 0 for seconds in saved["run"]["evaluation_seconds"].values())
    assert set(saved["kensa"]["shots"]) == {"0", "1"} and set(saved["patchcore"]["shots"]) == {"1"}  # no k=0
    assert set(saved["kensa"]["controls"]) == {"other_category", "noise", "shuffled_labels"}
    assert saved["kensa"]["shots"]["1"]["overall"]["n"] == metrics["kensa"]["shots"]["1"]["overall"]["n"] == 2 * 2 * 3
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sum(r["method"] == "kensa" for r in records) == 2 * 2 * 3 * (2 + 3)  # (2 shot counts + 3 controls)
    assert "| KensaVL | 1 |" in (out / "table.md").read_text()
    # the naming evaluation on the test categories: two seeds (as the shots' evaluation), every run per query
    naming = [json.loads(line) for line in (out / "naming_records.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in naming} == {0, 1}
    assert {r["run"] for r in naming} == {"named", "swapped", "boxed", "good_only", "unshown"}
    boxed = [r for r in naming if r["run"] == "boxed"]
    assert saved["naming"]["naming_boxed"] == np.mean([r["name"] == r["expected"] for r in boxed])
    unshown = [r for r in naming if r["run"] == "unshown"]  # a third type of the category, no example of it
    shown = {(r["category"], r["seed"], r["defect_type"]) for r in naming if r["run"] == "named" and r.get("expected")}
    assert saved["naming"]["unshown_queries"] == len(unshown) > 0
    assert not {(r["category"], r["seed"], r["defect_type"]) for r in unshown} & shown
    assert saved["naming"]["queries"] == sum(r["run"] == "named" and r["label"] == "defective" for r in naming) > 0
    # grading, run in shares side by side: every set of the two seeds, once
    sets = grading_sets(load_grading(synth_dir)[0]["test"], seeds=2)
    grading = [json.loads(line) for line in (out / "grading_records.jsonl").read_text().splitlines()]
    kensa = [(r["category"], r["attribute"], r["seed"], r["query"]) for r in grading if r["method"] == "kensa"]
    assert sorted(set(kensa)) == sorted((s["category"], s["attribute"], s["seed"], q) for s in sets
                                        for q in range(len(s["queries"])))  # fmt: skip
    assert saved["grading"]["kensa"]["queries"] == len(kensa) / 2  # the named run and the rotated one
    assert "label-permutation follow rate" in (out / "naming.md").read_text()
    # the real surfaces it trained on the other ones of: their test split, 4 per category (k = 1 here), two seeds
    real = json.loads((out / "surfaces" / "metrics.json").read_text())
    assert saved["surfaces"]["n"] == real["kensa"]["shots"]["1"]["overall"]["n"] == 2 * 2 * 12
    assert "Recall (image AUROC) by defect kind" in (out / "surfaces" / "table.md").read_text()
    # naming on them: this tiny set has too few photos of a defect type per surface, and says so
    assert saved["surfaces"]["naming"] == {"skipped": "no category has more than 4 good photos and two defect types "
                                           "with two photos each"}  # fmt: skip
    for png in ("loss.png", "accuracy_vs_shots.png", "roc.png", "accuracy_vs_size.png", "examples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "model" / "runs").rglob("events.out.tfevents.*"))  # TensorBoard
    model, info = AutoModelForImageTextToText.from_pretrained(
        out / "model", trust_remote_code=True, output_loading_info=True
    )
    assert not any(info.values()) and model.config.tile_size == 112
    stages = json.loads((out / "model" / "kensa_training.json").read_text())  # both stages, for the model card
    assert [s["stage"] for s in stages] == ["align", "multitask"] and [s["steps"] for s in stages] == [64, 64]
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        main_job(out, synth_dir)


def test_tiny_model_settings_are_checked_before_any_work(tmp_path, capsys):
    from kensa_vl.train.cli import main, main_job

    with pytest.raises(ValueError, match=r"unknown tiny-model settings \['comparison'\]"):
        main_job(tmp_path / "run", tmp_path / "data", tiny={"comparison": False})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), "--tiny", "reference_comparison=maybe"])
    assert exit_info.value.code == 2 and "must be JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "data-surfaces").exists()  # nor the real-surface set (nothing is downloaded)


@pytest.mark.slow
def test_main_job_without_the_comparison_for_plain_icl(synth_dir, surfaces_dir, tmp_path):
    """`--tiny reference_comparison=false`: the recipes' `reference_comparison` component is left out, not an error."""
    from kensa_vl.train.cli import main_job

    budget = ["--max_steps", "1", "--num_rows", "4", "--per_device_train_batch_size", "2"]
    budget += ["--surfaces", str(surfaces_dir)]
    metrics = main_job(tmp_path / "plain", synth_dir, shots=(1,), seeds=1, queries_per_category=2, overrides=budget,
                  tiny={"reference_comparison": False})  # fmt: skip
    config = json.loads((tmp_path / "plain" / "model" / "config.json").read_text())
    assert config["reference_comparison"] is False and metrics["kensa"]["shots"]["1"]["overall"]["n"] == 6
    stages = json.loads((tmp_path / "plain" / "model" / "kensa_training.json").read_text())
    assert "reference_comparison" not in stages[1]["train"] and "language_model" in stages[1]["train"]
