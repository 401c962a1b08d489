"""transformers' own common test suites, fetched at test time from the source distribution of the installed
version (never copied into this repository) and cached under `~/.cache/kensa-vl/transformers-tests/<version>`.

The source distribution ships `tests/*.py` but not the sub-folders those files import from; `library()` gives
those names stand-ins: `ExportTesterMixin` and `GenerationTesterMixin` as empty mixins (export is not run here and
generation is covered by `tests/test_generation.py`), `config_common_kwargs` as an empty dict (the config tester's
check of the common keyword arguments then has none to check), and `url_to_local_path` (the repository's
`utils/fetch_hub_objects_for_ci.py`, which caches the test media) as a function that answers each image URL with a
local random image of the same name: nothing is downloaded from the Hub.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
STANDINS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}
# beside the package: the mixins put `<tests>/../utils` on sys.path for this module
LOCAL_MEDIA = """
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def url_to_local_path(url, *args, **kwargs):
    if not isinstance(url, str) or not url.lower().endswith(IMAGES):
        return url
    path = Path(__file__).parent / "media" / url.rsplit("/", 1)[-1]
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(url.encode()))
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    return str(path)
"""


def cache_dir() -> Path:
    root = Path(os.environ.get("KENSA_TRANSFORMERS_TESTS", Path.home() / ".cache" / "kensa-vl" / "transformers-tests"))
    return root / transformers.__version__


def fetch(target: Path) -> None:
    """Download the installed version's source distribution with pip and unpack its `tests/*.py` into `target`."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "--dest", tmp],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(f"pip could not download transformers=={version}'s source: {done.stderr[-500:]}")
        staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        package = staging / PACKAGE
        package.mkdir()
        with tarfile.open(archives[0]) as archive:
            prefix = f"transformers-{version}/tests/"
            for member in archive.getmembers():
                name = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and member.isfile() and "/" not in name and name.endswith(".py"):
                    (package / name).write_bytes(archive.extractfile(member).read())
        (package / "__init__.py").touch()
        (staging / "utils").mkdir()
        (staging / "utils" / "fetch_hub_objects_for_ci.py").write_text(LOCAL_MEDIA)
        for name, text in STANDINS.items():
            (package / name).parent.mkdir(exist_ok=True)
            (package / name).parent.joinpath("__init__.py").touch()
            (package / name).write_text(text)
        staging.rename(target)  # complete or absent: a run stopped half-way leaves no half cache


def library(module: str):
    """`transformers_tests.<module>` of the installed version; raises RuntimeError when it cannot be had."""
    target = cache_dir()
    if not (target / "utils" / "fetch_hub_objects_for_ci.py").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fetch(target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return importlib.import_module(f"{PACKAGE}.{module}")
