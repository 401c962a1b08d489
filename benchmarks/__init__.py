"""KensaVL's benchmarks and design studies (`python -m benchmarks` runs the performance suite)."""

from __future__ import annotations

import argparse

# the KensaSynth splits a benchmark may read: the test split only reports final figures and is never read by a study
# or benchmark that picks a setting (docs/evaluation.md): `--split` offers only these
STUDY_SPLITS = ("validation", "train")


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a study over validation splits, before its own options: a model, one or more KensaSynth
    folders, the split (`STUDY_SPLITS`), k good examples and seeds as `kensa-vl eval` draws them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", action="append", required=True, help="a KensaSynth folder (repeatable)")
    parser.add_argument("--split", default="validation", choices=STUDY_SPLITS)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    return parser
