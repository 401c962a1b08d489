"""`kensa-vl publish`: the export folder, the rendered model card, the clean-process check and the push."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def trained(main_run, tmp_path_factory):
    """The main job's model folder, with the leftovers a training run leaves beside the model."""
    out, _ = main_run
    (out / "model" / "training_args.bin").write_bytes(b"pickle")
    (out / "model" / "checkpoint-1").mkdir(exist_ok=True)
    return out


def test_export_holds_the_model_and_a_card_of_measured_results(trained, tmp_path):
    from kensa_vl.train.publish import export

    metrics = trained / "metrics.json"
    folder = export(trained / "model", tmp_path / "export", metrics, repo_id="acme/kensa-tiny", datasets=["acme/set"])
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_kensa_vl.py", "processing_kensa_vl.py",
            "tokenizer.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
            "README.md", "accuracy_vs_shots.png", "loss.png"} <= names  # fmt: skip
    assert not {"training_args.bin", "checkpoint-1", "runs"} & names
    card = (folder / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("license: apache-2.0", "library_name: transformers", "pipeline_tag: image-text-to-text"):
        assert line in header
    assert "datasets:\n- acme/set" in header and "base_model" not in header  # tiny: no pretrained parts
    assert 'from_pretrained("acme/kensa-tiny", trust_remote_code=True)' in card
    assert "AutoModelForVision2Seq" in card and "AutoModelForImageTextToText" in card
    assert "| align | projector, layer_merges | captions=1.0 | 256 | 64 |" in card  # the recipe actually run
    assert "| KensaVL | 1 |" in card and "![accuracy_vs_shots.png](accuracy_vs_shots.png)" in card
    assert "cap, grass, leather" in card and "{{" not in card and "No evaluation results" not in card
    # every figure of the card is the model's own: each three-decimal number outside the table is in its metrics
    import json
    import re

    own = {f"{v:.3f}" for v in re.findall(r"\d\.\d+", (trained / "metrics.json").read_text()) for v in [float(v)]}
    prose = card.split("| method |")[0]
    assert set(re.findall(r"\b\d\.\d{3}\b", prose)) <= own and re.findall(r"\b\d\.\d{3}\b", prose)
    assert "validation categories (not test)" in card and json.loads((trained / "metrics.json").read_text())["run"]
    assert "Grading by example" in card and "The model's answer: accuracy" in card and "grading_confusion.png" in names
    assert "the photo as its own" in card  # the band-pass entry's own window
    real = json.loads((trained / "metrics.json").read_text())["surfaces"]
    assert f"k = 1: image AUROC {real['auroc']['mean']:.3f}" in card.split("Real photographed surfaces")[1]


def test_the_card_gives_naming_on_real_surfaces_and_of_an_unshown_type_where_measured(trained):
    import json

    from kensa_vl.train.publish import model_card

    config = json.loads((trained / "model" / "config.json").read_text())
    results = json.loads((trained / "metrics.json").read_text())
    table = (trained / "table.md").read_text()
    results["naming"].update(unshown_queries=27, unshown_named=0.963)
    results["surfaces"]["naming"] = {"queries": 155, "naming": 0.49, "naming_when_flagged": 0.717}
    card = model_card(config, results, [], [], "acme/kensa", table=table)
    assert "A defect of a\ntype neither example shows (27 queries)" in card and "for 0.963 of those judged" in card
    real = card.split("Real photographed surfaces")[1]
    assert "for 0.490 of\n155 defective queries (0.717 of those\njudged defective)." in real
    results["naming"]["intervals"] = {"naming": [0.25, 0.75]}  # the intervals, where the report has them
    results["surfaces"]["naming"]["intervals"] = {"naming_when_flagged": [0.6, 0.8]}
    card = model_card(config, results, [], [], "acme/kensa", table=table)
    assert "(95% interval\n[0.250, 0.750], the query photos resampled); with the" in card.split("Real photographed")[0]
    assert "judged defective, 95% interval\n[0.600, 0.800])." in card.split("Real photographed surfaces")[1]
    results["naming"]["unshown_named"] = None  # none judged defective
    results["surfaces"]["naming"] = {"skipped": "no category has ..."}
    card = model_card(config, results, [], [], "acme/kensa", table=table)
    assert "neither example shows" not in card and "Naming by example on them" not in card


def test_notes_with_their_plots_join_the_card(trained, tmp_path):
    from kensa_vl.train.publish import export

    (tmp_path / "ablation.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "notes.md").write_text("| run | accuracy |\n|---|---|\n| plain | 0.5 |\n\n![ablation](ablation.png)\n")
    folder = export(trained / "model", tmp_path / "export", trained / "metrics.json", notes=tmp_path / "notes.md")
    card = (folder / "README.md").read_text()
    assert "## Further results\n\n| run | accuracy |" in card and (folder / "ablation.png").exists()
    # the notes the README publishes with: the comparison's table, and its plot beside them
    notes = Path(__file__).resolve().parents[1] / "docs" / "card-notes.md"
    folder = export(trained / "model", tmp_path / "with-docs", trained / "metrics.json", notes=notes)
    card = (folder / "README.md").read_text()
    assert "| plain ICL | 4 |" in card and (folder / "reference-comparison.png").exists()


@pytest.mark.slow
@pytest.mark.tf457
def test_the_export_loads_under_457(trained, tmp_path):
    import os

    from kensa_vl.train.publish import export, verify

    if not os.environ.get("KENSA_TF457_PYTHON"):
        pytest.skip("set KENSA_TF457_PYTHON to a python with transformers 4.57 (.ci/run)")
    folder = export(trained / "model", tmp_path / "export", trained / "metrics.json")
    assert verify(folder, python=os.environ["KENSA_TF457_PYTHON"])["version"].startswith("4.57")


def test_publishing_without_results_needs_the_flag_and_says_so(trained, tmp_path):
    from kensa_vl.train.publish import export

    with pytest.raises(ValueError, match="--allow-missing-results"):
        export(trained / "model", tmp_path / "a")
    folder = export(trained / "model", tmp_path / "b", allow_missing_results=True)
    assert "**No evaluation results**" in (folder / "README.md").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        export(trained / "model", folder, allow_missing_results=True)
    with pytest.raises(ValueError, match=r"--eval .*missing.json: no such file"):
        export(trained / "model", tmp_path / "c", tmp_path / "missing.json")
    assert not (tmp_path / "c").exists()


def test_a_folder_that_is_not_kensa_vl_is_refused(tmp_path):
    from kensa_vl.train.publish import export

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a KensaVL"):
        export(tmp_path, tmp_path / "out", allow_missing_results=True)
    with pytest.raises(ValueError, match="no config.json"):
        export(tmp_path / "missing", tmp_path / "out", allow_missing_results=True)


@pytest.mark.slow
def test_publish_verifies_in_a_clean_process_then_pushes_one_commit(trained, tmp_path, monkeypatch, capsys):
    """The Hub client is replaced where it would reach the network (create_repo, create_commit) by a recorder."""
    from huggingface_hub import HfApi

    from kensa_vl.train.cli import main

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations), kwargs))
        return type("CommitInfo", (), {"oid": "0123abcd"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    out = tmp_path / "export"
    main(["publish", "--model", str(trained / "model"), "--out", str(out), "--eval", str(trained / "metrics.json"),
          "--repo-id", "acme/kensa-tiny", "--push", "--private"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "loads with empty loading info" in printed and "revision 0123abcd" in printed
    assert [c[0] for c in calls] == ["create_repo", "create_commit"]  # one commit
    assert calls[0][1] == "acme/kensa-tiny" and calls[0][2]["private"] is True
    assert calls[1][2] == sorted(p.name for p in out.iterdir()) and "README.md" in calls[1][2]


def test_a_broken_export_is_not_pushed(trained, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from kensa_vl.train.cli import main

    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("pushed a broken export"))
    broken = tmp_path / "broken"
    shutil.copytree(trained / "model", broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--model", str(broken), "--out", str(tmp_path / "out"), "--allow-missing-results",
              "--repo-id", "acme/x", "--push"])  # fmt: skip
    assert exit_info.value.code == 2


def test_the_card_names_the_assembled_parts_as_base_models(tiny_dir):
    import json

    from kensa_vl.train.publish import model_card

    config = json.loads((tiny_dir / "config.json").read_text())
    config["base_models"] = {"vision": ["google/siglip-so400m-patch14-384"], "text": "Qwen/Qwen2.5-1.5B-Instruct"}
    card = model_card(config, None, [], [], "acme/kensa")
    header = card.split("---")[1]
    assert "base_model:\n- google/siglip-so400m-patch14-384\n- Qwen/Qwen2.5-1.5B-Instruct" in header
    assert "not trained with `kensa-vl` recipes" in card and "**No evaluation results**" in card


def test_the_card_says_which_views_the_bank_trained_with(tiny_dir):
    import json

    from kensa_vl.train.publish import model_card

    config = json.loads((tiny_dir / "config.json").read_text())
    stage = {"stage": "multitask", "train": ["projector"], "lora": None, "mixture": {"episodes": 1.0}, "rows": 8,
             "steps": 1, "batch_size": 8, "learning_rate": 0.002, "vision_lr": None}  # fmt: skip
    cards = [model_card(config, None, [{**stage, **extra}], [], "acme/kensa") for extra in
             ({}, {"reference_views": None}, {"reference_views": []}, {"reference_views": ["hflip"]})]  # fmt: skip
    assert not any("views while training" in card for card in cards[:2])  # the model's own (older records: none)
    assert "episodes=1.0; the bank's views while training: none |" in cards[2]
    assert "the bank's views while training: hflip |" in cards[3]
