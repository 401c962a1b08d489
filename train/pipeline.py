"""The main job, offline: tiny model -> KensaSynth -> align -> multitask -> few-shot evaluation.

    kensa-vl train --out outputs/main          # the same as `accelerate launch train/sft.py` with no arguments

Writes `OUT/model` (model + processor, loadable by the Auto classes with `trust_remote_code=True`),
`OUT/metrics.json` (the model and the kNN baseline, plus the run: data, categories, training time),
`OUT/table.md`, `OUT/records.jsonl`, `OUT/loss.png`, `OUT/accuracy_vs_shots.png`, TensorBoard logs under
`OUT/<stage>/runs`, and the intermediate `OUT/tiny` and `OUT/align` checkpoints.
The stage recipes are `train/configs/main/*.yaml`.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

from kensa_vl.modeling.configuration_kensa_vl import REFERENCE_VIEWS

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "configs" / "main"
# 224 px photos: a 2x2 grid + thumbnail, 16 tokens per tile. The reference comparison runs on the DCT encoder
# alone: the random tiny ViTs' distances rank defects at chance (docs/reference-comparison.md).
TINY = {
    "tile_size": 112,
    "max_tiles": 4,
    "dct": True,
    "reference_comparison": True,
    "reference_encoders": ["dct"],
    "reference_views": list(REFERENCE_VIEWS),  # all five, chosen on the validation split
}


def train_stage(recipe: Path, overrides: list[str], absent: tuple[str, ...] = ()):
    """Run one stage recipe through `sft.main`, as `accelerate launch train/sft.py --config recipe` would;
    components in `absent` (switched off in the tiny model's config) are left out of the recipe's `train`."""
    from trl import SFTConfig, TrlParser

    from kensa_vl.train.sft import KensaArguments, main

    args, training_args = TrlParser((KensaArguments, SFTConfig)).parse_args_and_config(
        ["--config", str(recipe), *overrides]
    )
    args.train = [component for component in args.train if component not in absent]
    return main(args, training_args)


def train(out: Path, data: Path, tiny: dict | None = None, overrides: list[str] = ()) -> tuple[Path, dict, float]:
    """Build the tiny model (`TINY` with `tiny` replacing entries; any `tiny_config` argument is allowed) into
    `out/tiny` and train the two stage recipes on `data` into `out/align` and `out/model`. Returns (the model
    folder, the stages' log histories, seconds)."""
    from kensa_vl.train.build import build_tiny, tiny_config

    start = time.perf_counter()
    known = set(inspect.signature(tiny_config).parameters) - {"tokenizer"}
    unknown = sorted(set(tiny or {}) - known)
    if unknown:
        raise ValueError(f"unknown tiny-model settings {unknown}; known: {sorted(known)}")
    settings = {**TINY, **(tiny or {})}
    build_tiny(out / "tiny", **settings)
    absent = () if settings["reference_comparison"] else ("reference_comparison",)
    histories, previous = {}, out / "tiny"
    for stage, folder in (("align", "align"), ("multitask", "model")):
        paths = ["--model", str(previous), "--data", str(data), "--output_dir", str(out / folder)]
        trainer = train_stage(RECIPES / f"{stage}.yaml", [*paths, *overrides], absent)
        histories[stage], previous = trainer.state.log_history, out / folder
        del trainer
    return previous, histories, time.perf_counter() - start


def run(
    out: str | Path = "outputs/main",
    data: str | Path | None = None,
    shots=(0, 1, 2, 4),
    seeds: int = 3,
    queries_per_category: int = 20,
    overwrite: bool = False,
    overrides: list[str] = (),
    tiny: dict | None = None,
) -> dict:
    """The whole job; returns the metrics written to `OUT/metrics.json`. `overrides` are recipe arguments added to
    both stages (e.g. `["--max_steps", "2"]`); `tiny` replaces entries of the tiny model's `TINY` settings (e.g.
    `{"reference_comparison": False}` for plain in-context learning)."""
    from kensa_vl.eval.inspector import load_pretrained
    from kensa_vl.eval.plots import loss_curve
    from kensa_vl.eval.report import evaluate_and_report
    from kensa_vl.train.data.synth import load_synth

    out = Path(out)
    if (out / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a finished run; pass --overwrite or another --out")
    start = time.perf_counter()
    data = Path(data) if data else out.parent / "kensa-synth-224"
    previous, histories, train_seconds = train(out, data, tiny, overrides)

    model, processor = load_pretrained(previous)
    items, _ = load_synth(data)
    run_info = {
        "model": str(previous),
        "data": str(data),
        "split": "test",
        "categories": sorted(set(items["test"]["category"])),
        "train_seconds": round(train_seconds, 1),
    }
    results = evaluate_and_report(
        model, processor, items["test"], out, extra=run_info, shots=shots, seeds=seeds,
        queries_per_category=queries_per_category,
    )  # fmt: skip
    loss_curve(histories, out / "loss.png")
    for k, result in results["kensa"]["shots"].items():
        overall = result["overall"]
        print(
            f"k={k}: balanced accuracy {overall['balanced_accuracy']['mean']:.3f} ± "
            f"{overall['balanced_accuracy']['std']:.3f}, AUROC {overall['auroc']['mean']:.3f}"
            + (
                f", box hit rate (≥ 1%) {overall['box_hit_rate_1pct']['mean']:.3f}"
                if k and "box_hit_rate_1pct" in overall
                else ""
            )
        )
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return json.loads((out / "metrics.json").read_text())


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("train", help="the offline main job: build, generate data, train, evaluate")
    p.add_argument("--out", default="outputs/main")
    p.add_argument("--data", default=None, help="KensaSynth folder (generated when missing)")
    p.add_argument("--shots", default="0,1,2,4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--queries-per-category", type=int, default=20)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--tiny", action="append", default=[], metavar="KEY=JSON",
        help=f"change a tiny-model setting, e.g. reference_comparison=false (settings: {', '.join(TINY)})",
    )  # fmt: skip

    def start(a) -> None:
        tiny = {}
        for item in a.tiny:
            key, _, value = item.partition("=")
            try:
                tiny[key] = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f'--tiny {item!r}: the value must be JSON (true, 112, ["dct"]), {err}') from err
        run(
            a.out,
            a.data,
            [int(k) for k in a.shots.split(",")],
            a.seeds,
            a.queries_per_category,
            a.overwrite,
            tiny=tiny,
        )

    p.set_defaults(func=start)
