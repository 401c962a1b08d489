"""The ablation ladder: cumulative rungs, and one rung end to end (train, evaluate, time) on a tiny budget."""

from __future__ import annotations

import json

from kensa_vl.eval.ablate import LADDER, SIDE, rungs


def test_rungs_accumulate_and_side_comparisons_change_one_thing():
    all_rungs = rungs()
    assert len(all_rungs) == len(LADDER) + len(SIDE)
    first, top = all_rungs[0][1], all_rungs[len(LADDER) - 1][1]
    assert first["encoders"] == ["siglip"] and first["max_tiles"] == 1 and not first["dct"]
    assert top["encoders"] == ["siglip", "dinov2", "resnet", "patch"] and top["dct"] and top["s2"]
    from kensa_vl.train.pipeline import TINY

    for _, settings in all_rungs[len(LADDER) : len(LADDER) + 2]:  # one change of the main job's settings each
        assert len(settings) == 1 and all(TINY.get(k) != v for k, v in settings.items())
    assert all_rungs[-1][1] == {}  # the main job's own settings


def test_one_rung_end_to_end(synth_dir, tmp_path):
    from kensa_vl.eval.ablate import run
    from kensa_vl.train.pipeline import train

    results = run(tmp_path, synth_dir, max_steps=1, chosen={7}, seeds=1, queries=2, train=train)
    row = results["7"]
    assert row["rung"] == "+ DCT encoder" and 0 <= row["balanced_accuracy"] <= 1
    assert row["visual_tokens"] > 0 and 0 < row["encoder_s"] < row["episode_s"]
    assert json.loads((tmp_path / "ablation.json").read_text())["7"]["visual_tokens"] == row["visual_tokens"]
    assert (tmp_path / "table.md").read_text().count("\n") == 3 and (tmp_path / "ablation.png").exists()
    # a rung whose model is already trained (the main job's row) is evaluated and timed, not retrained
    again = run(tmp_path, synth_dir, chosen={10}, seeds=1, queries=2, trained={10: tmp_path / "rung7" / "model"})
    assert again["10"]["train_s"] is None and not (tmp_path / "rung10").exists() and "7" in again
    alone = run(
        tmp_path / "new", synth_dir, chosen={10}, seeds=1, queries=2, trained={10: tmp_path / "rung7" / "model"}
    )
    assert list(alone) == ["10"] and (tmp_path / "new" / "ablation.json").exists()  # into a folder not made yet
