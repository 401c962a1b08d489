"""The `kensa-vl` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import logging

from kensa_vl.eval import ablate, report
from kensa_vl.train import build, pipeline, publish
from kensa_vl.train.data import synth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kensa-vl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    build.add_parsers(subparsers)
    synth.add_parsers(subparsers)
    pipeline.add_parsers(subparsers)
    report.add_parsers(subparsers)
    publish.add_parsers(subparsers)
    ablate.add_parsers(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileExistsError, ImportError) as err:  # bad input or a missing extra: say which
        parser.exit(2, f"kensa-vl {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
