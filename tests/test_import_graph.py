"""The allowed import graph, read from the source (every import, top level or inside a function):

- `modeling/` and `processing/` (shipped to the Hub) import only their own siblings, with single-dot imports;
- `kensa_vl.train.data` imports only `kensa_vl.processing`;
- `kensa_vl.eval` imports the shipped code and the training side only through `kensa_vl.train.data`'s package API;
- `kensa_vl.train` imports no `kensa_vl.eval`, except its CLI entry (`train/cli.py`);
- nothing imports a private (`_name`) from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = {"modeling": "kensa_vl.modeling", "processing": "kensa_vl.processing", "train": "kensa_vl.train",
            "eval": "kensa_vl.eval"}  # fmt: skip


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    top, *rest = relative.parts
    parts = [PACKAGES.get(top, top), *rest]
    return ".".join(p for p in parts if p != "__init__")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, level) of every import in the file."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names], node.level))
    return found


def project_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def kensa_imports(path: Path) -> set[str]:
    """The `kensa_vl` modules a file imports (`from pkg import module` counted as `pkg.module`)."""
    out = set()
    for module, names, _ in imports(path):
        if module.startswith("kensa_vl"):
            out.add(module)
            out.update(f"{module}.{name}" for name in names if (ROOT / module_path(f"{module}.{name}")).exists())
    return out


def module_path(module: str) -> str:
    top, _, rest = module.removeprefix("kensa_vl.").partition(".")
    folder = Path(top, *rest.split(".")) if rest else Path(top)
    return str(folder) if (ROOT / folder).is_dir() else str(folder) + ".py"


@pytest.mark.parametrize("folder", ["modeling", "processing"])
def test_shipped_code_imports_only_its_siblings(folder):
    for path in project_files(folder):
        for module, _, level in imports(path):
            if module.startswith("kensa_vl") or level:
                assert level == 1 and module.startswith(f"kensa_vl.{folder}"), (path.name, module, level)


def test_training_data_imports_only_the_processor():
    for path in project_files("train/data"):
        for module in kensa_imports(path):
            assert module.startswith(("kensa_vl.processing", "kensa_vl.train.data")), (path.name, module)


def test_evaluation_reaches_training_only_through_the_data_api():
    for path in project_files("eval"):
        for module in kensa_imports(path):
            if module.startswith("kensa_vl.train"):
                assert module == "kensa_vl.train.data", (path.name, module)


def test_training_does_not_import_evaluation_except_the_cli():
    offenders = [
        (path.name, module)
        for path in project_files("train")
        if path.name != "cli.py"
        for module in kensa_imports(path)
        if module.startswith("kensa_vl.eval")
    ]
    assert offenders == []
    assert any(m.startswith("kensa_vl.eval") for m in kensa_imports(ROOT / "train" / "cli.py"))  # the test reads


def test_no_private_name_is_imported_across_modules():
    offenders = [
        (str(path.relative_to(ROOT)), module, name)
        for path in project_files("modeling", "processing", "train", "eval", "demo", "benchmarks")
        for module, names, _ in imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert offenders == []
