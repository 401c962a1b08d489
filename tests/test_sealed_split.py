"""The sealed protocol: KensaSynth's test split is read only to report. No benchmark, study or ablation names it, so
none can choose a setting on it (they choose on validation, whose categories and defects training never sees)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STUDIES = sorted(ROOT.glob("benchmarks/*.py")) + [ROOT / "eval" / "ablate.py"]


def reads_of_test(source: str) -> list[int]:
    """Lines where the string "test" appears as a value (a split's name), or a command passes `--split test`."""
    lines = [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and n.value == "test"]
    return lines + [i for i, line in enumerate(source.splitlines(), 1) if "--split test" in line]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_study_reads_the_test_split(path):
    assert not reads_of_test(path.read_text()), f"{path.name} reads KensaSynth's test split; choose on validation"


def test_the_check_catches_a_study_that_reads_test():
    assert reads_of_test('items = load_synth(data)[0]["test"]\n') == [1]
    assert reads_of_test('parser.add_argument("--split", default="test")\n') == [1]
    assert reads_of_test('"""python -m benchmarks.x --split test"""\n') == [1]
    assert not reads_of_test('items = load_synth(data)[0]["validation"]  # not the test split\n')


SPLIT_OPTIONS = [
    p
    for p in STUDIES
    if "def main" in p.read_text() and ('"--split"' in p.read_text() or "study_parser(" in p.read_text())
]


@pytest.mark.parametrize("path", SPLIT_OPTIONS, ids=lambda p: p.stem)
def test_a_study_with_a_split_option_refuses_the_test_split(path, monkeypatch, capsys):
    """Beside the check of the source above: asked for the test split on the command line, each exits before it
    loads anything, naming the splits it takes."""
    import importlib

    module = importlib.import_module(f"{path.parent.name}.{path.stem}")
    monkeypatch.setattr("sys.argv", [path.stem, "model", "--data", "d", "--split", "te" + "st"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err
