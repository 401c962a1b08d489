"""`kensa-vl`: the listing answers without importing torch; each sub-command still gets its full parser."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from kensa_vl.train.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "trl", "deepspeed") if m in sys.modules))
"""


def _imported(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300)
    return done.stdout.strip().splitlines()[-1]


def test_the_listing_imports_no_heavy_library():
    assert _imported("--help") == "[]"


@pytest.mark.slow
def test_a_sub_command_gets_its_own_parser(capsys):
    from kensa_vl.train.cli import main

    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "--query" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2 and "invalid choice: 'no-such-command'" in capsys.readouterr().err
