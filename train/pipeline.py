"""The main job's training: the tiny model (`TINY`) built, then trained by the stage recipes of
`train/configs/main/*.yaml` (align, then multitask), each through `sft.main`. The whole job, with its evaluation,
is `kensa-vl train` (`cli.main_job`).
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

from kensa_vl.modeling.configuration_kensa_vl import REFERENCE_VIEWS

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "configs" / "main"
# 224 px photos: a 2x2 grid + thumbnail, 16 tokens per tile. The reference comparison runs on the weight-free DCT,
# band-pass and contrast encoders (fine texture; brightness and colour; texture washed out): the random tiny ViTs'
# distances rank defects at chance (docs/reference-comparison.md), and the DCT cells alone miss diffuse defects
# (docs/real-surfaces.md).
TINY = {
    "tile_size": 112,
    "max_tiles": 4,
    "dct": True,
    "bandpass": True,
    "contrast": True,
    "reference_comparison": True,
    "reference_encoders": ["dct", "bandpass", "contrast"],
    "reference_views": list(REFERENCE_VIEWS),  # all five, chosen on the validation split
}


def train_stage(recipe: Path, overrides: list[str], absent: tuple[str, ...] = (), unavailable: tuple[str, ...] = ()):
    """Run one stage recipe through `sft.main`, as `accelerate launch train/sft.py --config recipe` would;
    components in `absent` (switched off in the tiny model's config) are left out of the recipe's `train`, and
    mixture sources in `unavailable` (data that cannot be made here) out of its mixture."""
    from trl import SFTConfig, TrlParser

    from kensa_vl.train.sft import KensaArguments, main

    args, training_args = TrlParser((KensaArguments, SFTConfig)).parse_args_and_config(
        ["--config", str(recipe), *overrides]
    )
    args.train = [component for component in args.train if component not in absent]
    args.weights = {source: weight for source, weight in args.weights.items() if source not in unavailable}
    return main(args, training_args)


def tiny_settings(tiny: dict | None) -> dict:
    """`TINY` with `tiny` replacing entries, each a `tiny_config` argument (else a ValueError naming them)."""
    from kensa_vl.train.build import tiny_config

    known = set(inspect.signature(tiny_config).parameters) - {"tokenizer"}
    unknown = sorted(set(tiny or {}) - known)
    if unknown:
        raise ValueError(f"unknown tiny-model settings {unknown}; known: {sorted(known)}")
    return {**TINY, **(tiny or {})}


def train(
    out: Path, data: Path, tiny: dict | None = None, overrides: list[str] = (), unavailable: tuple[str, ...] = ()
) -> tuple[Path, dict, float]:
    """Build the tiny model (`TINY` with `tiny` replacing entries; any `tiny_config` argument is allowed) into
    `out/tiny` and train the two stage recipes on `data` into `out/align` and `out/model`, without the mixture
    sources in `unavailable`. Returns (the model folder, the stages' log histories, seconds)."""
    from kensa_vl.train.build import build_tiny

    start = time.perf_counter()
    settings = tiny_settings(tiny)
    build_tiny(out / "tiny", **settings)
    absent = () if settings["reference_comparison"] else ("reference_comparison",)
    histories, previous = {}, out / "tiny"
    for stage, folder in (("align", "align"), ("multitask", "model")):
        paths = ["--model", str(previous), "--data", str(data), "--output_dir", str(out / folder)]
        trainer = train_stage(RECIPES / f"{stage}.yaml", [*paths, *overrides], absent, unavailable)
        histories[stage], previous = trainer.state.log_history, out / folder
        del trainer
    return previous, histories, time.perf_counter() - start
