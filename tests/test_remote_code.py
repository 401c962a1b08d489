"""The saved folder is what ships to the Hub: load it where `kensa_vl` cannot be imported, under 5.x and 4.57."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
VERIFY = ROOT / "train" / "verify_export.py"
TF457 = os.environ.get("KENSA_TF457_PYTHON")
needs_457 = pytest.mark.skipif(not TF457, reason="set KENSA_TF457_PYTHON to a python with transformers 4.57 (.ci/run)")


def _run(python: str, *args: str, env: dict | None = None) -> str:
    done = subprocess.run(
        [python, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def check(python: str, folder) -> dict:
    result = json.loads(_run(python, str(VERIFY), str(folder)).strip().splitlines()[-1])
    assert result["problems"] == [], result["version"]
    assert (result["config"], result["processor"], result["image_processor"]) == (
        "KensaVLConfig",
        "KensaVLProcessor",
        "KensaVLImageProcessor",
    )
    assert result["pipeline_raw"].startswith("Describe <image> please")
    return result


@pytest.fixture(scope="module")
def saved_by_5x(tiny_dir):
    return check(sys.executable, tiny_dir)


@pytest.mark.slow
def test_loads_and_generates_in_a_clean_process_5x(saved_by_5x):
    assert saved_by_5x["version"].startswith("5.")
    assert len(saved_by_5x["generated"]) == 8


@pytest.mark.slow
@needs_457
def test_loads_in_457_and_generates_the_same_tokens(tiny_dir, saved_by_5x):
    result = check(TF457, tiny_dir)
    assert result["version"].startswith("4.57")
    assert "AutoModelForVision2Seq.loading_info" in result
    assert result["generated"] == saved_by_5x["generated"]
    assert result["pipeline_raw"] == saved_by_5x["pipeline_raw"]


@pytest.mark.slow
@needs_457
def test_saved_by_457_loads_in_both(tmp_path):
    # Give the 4.57 interpreter the project without installing it there: a namespace folder of links.
    shim = tmp_path / "shim" / "kensa_vl"
    shim.mkdir(parents=True)
    for name in ("modeling", "processing", "train"):
        (shim / name).symlink_to(ROOT / name, target_is_directory=True)
    out = tmp_path / "saved457"
    _run(
        TF457,
        "-c",
        f"from kensa_vl.train.build import build_tiny; build_tiny({str(out)!r})",
        env={"PYTHONPATH": str(shim.parent)},
    )
    assert check(TF457, out)["generated"] == check(sys.executable, out)["generated"]


def test_saved_folder_holds_every_file_its_remote_code_imports(tiny_dir):
    """Each `auto_map` entry's file and every sibling it imports (transitively) is in the folder, and nothing of
    the project outside modeling/ and processing/ is."""
    from transformers.dynamic_module_utils import get_relative_import_files

    config = json.loads((tiny_dir / "config.json").read_text())
    processor = json.loads((tiny_dir / "processor_config.json").read_text())
    entries = [*config["auto_map"].values(), *processor["auto_map"].values()]
    files = {tiny_dir / (entry.split(".")[0] + ".py") for entry in entries}
    for file in list(files):
        assert file.exists(), file.name
        files.update(Path(f) for f in get_relative_import_files(str(file)))
    shipped = {p.name for p in tiny_dir.glob("*.py")}
    assert {f.name for f in files} == shipped
    assert shipped == {p.name for d in ("modeling", "processing") for p in (ROOT / d).glob("*_kensa_vl.py")}


def test_the_model_file_imports_every_model_sibling_itself():
    """transformers 4.57, loading a local folder, copies into its module cache only the relative imports of the
    file `auto_map` names, then fails on a sibling that only a sibling imports: so the model file imports each."""
    from transformers.dynamic_module_utils import get_relative_imports

    direct = set(get_relative_imports(str(ROOT / "modeling" / "modeling_kensa_vl.py")))
    siblings = {p.stem for p in (ROOT / "modeling").glob("*_kensa_vl.py")} - {"modeling_kensa_vl"}
    assert direct == siblings


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("default", {}),
        ("comparison_dct", {"tile_size": 112, "max_tiles": 4, "reference_comparison": True, "dct": True}),
        ("interleave", {"fusion": "interleave"}),
    ],
)
def test_checkpoint_keys_are_those_of_earlier_releases(name, kwargs):
    """Saved weights keep loading: the state-dict keys are the ones recorded from kensa-vl 0.1 (before the model
    file was split into vision, comparison and model files), plus the comparison's verdict logit, its demo pointer
    and its grade pointer (2026-12-03), which a checkpoint without them starts at their priors
    (`test_a_checkpoint_without_the_verdict_or_the_pointer_starts_at_its_prior`)."""
    from kensa_vl.train.build import build_tiny

    recorded = json.loads((ROOT / "tests" / "data" / "checkpoint_keys.json").read_text())[name]
    model, _ = build_tiny(**kwargs)
    parts = ("verdict", "demo_pointer.pointer", "demo_pointer.gate", "grade_pointer.pointer", "grade_pointer.gate")
    added = {f"model.reference_comparison.{part}.{p}" for part in parts for p in ("weight", "bias")}
    assert sorted(set(model.state_dict()) - (added if kwargs.get("reference_comparison") else set())) == recorded


@pytest.mark.parametrize("part", [".verdict.", ".demo_pointer.", ".grade_pointer."])
def test_a_checkpoint_without_the_verdict_or_the_pointer_starts_at_its_prior(tmp_path, part):
    import torch
    from safetensors.torch import load_file, save_file

    from kensa_vl.modeling.comparison_kensa_vl import VERDICT_MARGIN, VERDICT_SLOPE
    from kensa_vl.modeling.demos_kensa_vl import GATE_START, POINTER_SLOPE
    from kensa_vl.modeling.grading_kensa_vl import GRADE_SLOPE
    from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
    from kensa_vl.train.build import build_tiny

    model, _ = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True)
    comparison = model.model.reference_comparison
    for module in (comparison.verdict, comparison.demo_pointer.pointer, comparison.demo_pointer.gate,
                   comparison.grade_pointer.pointer, comparison.grade_pointer.gate):  # fmt: skip
        module.weight.data.fill_(3.0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if part not in k}, tmp_path / "model.safetensors")
    old = KensaVLForConditionalGeneration.from_pretrained(tmp_path).model.reference_comparison
    if part == ".verdict.":
        prior = torch.tensor([[VERDICT_SLOPE, -VERDICT_SLOPE * VERDICT_MARGIN]])  # largest excess, a level
        torch.testing.assert_close(old.verdict.weight, prior)
        assert old.verdict.bias.item() == 0.0 and old.demo_pointer.gate.weight.flatten().tolist() == [3.0, 3.0]
    elif part == ".grade_pointer.":
        assert old.grade_pointer.pointer.weight.item() == GRADE_SLOPE and old.grade_pointer.gate.bias == GATE_START
        assert old.demo_pointer.pointer.weight.item() == 3.0  # the rest as saved
    else:
        assert old.demo_pointer.pointer.weight.item() == POINTER_SLOPE and old.demo_pointer.pointer.bias.item() == 0
        assert old.demo_pointer.gate.weight.abs().sum() == 0 and old.demo_pointer.gate.bias.item() == GATE_START
        assert old.verdict.weight.flatten().tolist() == [3.0, 3.0]  # the rest as saved


@needs_457
def test_a_named_example_is_copied_in_both_versions(tmp_path):
    """The remote code of a model with the comparison copies a defective example's name and the located box, and a
    graded query's grade, into `generate`'s answer, the same under 4.57 and 5.x (a process without `kensa_vl`)."""
    from kensa_vl.train.build import build_tiny, save_kensa

    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    out = save_kensa(model, processor, tmp_path / "compare")
    new, old = check(sys.executable, out), check(TF457, out)
    assert new["named"].startswith(": scratch at the ") and "<box><loc_" in new["named"], new["named"]
    assert old["named"] == new["named"] and old["cached_equals_uncached"] and new["cached_equals_uncached"]
    assert new["graded"].startswith("grade: deep,") and old["graded"] == new["graded"]  # a grade, copied alike
