"""`kensa-vl eval`: the evaluation report from the command line (`kensa-vl inspect` is in `inspect_command`).

kensa-vl eval --model outputs/main/model --data outputs/kensa-synth-224 --shots 0,1,2,4,8 --seeds 5 --out DIR
kensa-vl eval --model outputs/main/model --data mvtec_ad/ --shots 1,2,4 --calibrate-on none --out DIR
kensa-vl eval --task naming --model outputs/main/model --data outputs/kensa-synth-224 --split validation --out DIR
kensa-vl eval --task grading --model outputs/main/model --data outputs/kensa-synth-224 --split validation --out DIR
accelerate launch --num_processes 2 -m kensa_vl.train.cli eval ...   (support sets split across processes)
"""

from __future__ import annotations

import json
from pathlib import Path

METHODS = {"kensa": "KensaVL", "patchcore": "kNN patch memory (PatchCore-style)"}
TABLE_METRICS = (
    "auroc",
    "f1_max",
    "pixel_auroc",
    "aupro",
    "balanced_accuracy",
    "overkill",
    "miss",
    "box_hit_rate_1pct",
    "generated_box_hit_rate_1pct",
)
NAMES = {"auroc": "image AUROC", "f1_max": "F1-max", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO (FPR ≤ 0.3)",
         "box_hit_rate_1pct": "box hit rate (≥ 1% of image)",
         "generated_box_hit_rate_1pct": "generated box hit rate (≥ 1%)"}  # fmt: skip
# what the records file keeps of a record (the pixel histograms and sheet heatmaps are for the metrics and plots)
UNSAVED = ("pixels", "heatmap")


def _cell(m: dict | None) -> str:
    if m is None or m["mean"] is None:
        return "n/a"
    if "ci95" in m:
        return f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def markdown_table(results: dict[str, dict], metrics=TABLE_METRICS) -> str:
    """One row per method and k (then the controls): the mean over seeds with its 95% bootstrap interval, or ± the
    std over seeds where there is no interval; `results`: method -> `evaluate(...)` output."""
    names = [NAMES.get(m, m.replace("_", " ")) for m in metrics]
    lines = ["| method | k | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(metrics)]
    for method, result in results.items():
        rows = [(k, v) for k, v in result["shots"].items()] + list(result["controls"].items())
        for k, value in rows:
            cells = [_cell(value["overall"].get(metric)) for metric in metrics]  # the baseline draws no boxes
            lines.append(f"| {METHODS[method]} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def unlike_line(results: dict[str, dict]) -> str:
    """The share of the other-category control's queries that the Inspector called unlike the examples (another
    product: what a user is warned of); empty without that control."""
    control = results["kensa"]["controls"].get("other_category")
    share = control and control["overall"] and control["overall"].get("unlike_share")
    if not share:
        return ""
    return (f"Other-category control: {share['mean']:.2f} of the queries were called unlike the examples (another "
            "product or zoom; `Judgement.unlike`, docs/inspection.md).\n\n")  # fmt: skip


def defect_table(results: dict[str, dict]) -> str:
    """Per defect kind at the largest k: recall (1 - miss) and, in brackets, image AUROC, per method; and how many
    distinct defective photos of each kind were queried (over seeds): a kind seen in a few photos moves in steps of
    one photo (docs/real-surfaces.md)."""
    k = max(results["kensa"]["shots"])
    kinds = sorted(results["kensa"]["shots"][k].get("per_defect", {}))
    if not kinds:
        return ""
    lines = [f"Recall (image AUROC) by defect kind at k = {k}:", "", "| method | " + " | ".join(kinds) + " |",
             "|---|" + "---|" * len(kinds)]  # fmt: skip
    for method, result in results.items():
        per = result["shots"][k].get("per_defect", {})
        cells = [f"{1 - per[d]['miss']['mean']:.2f} ({per[d]['auroc']['mean']:.2f})" if d in per else "n/a"
                 for d in kinds]  # fmt: skip
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    photos = {d: set() for d in kinds}
    for r in results["kensa"].get("records", []):
        queried = r["shots"] == k and r["control"] is None and r.get("verdict") != "error"
        if queried and r["label"] == "defective" and r.get("defect_type") in photos:
            photos[r["defect_type"]].add((r["category"], r["index"]))
    lines.append("| distinct photos queried | " + " | ".join(str(len(photos[d])) for d in kinds) + " |")
    return "\n".join(lines) + "\n"


def evaluate_and_report(
    model,
    processor,
    items,
    out: str | Path,
    baseline: bool = True,
    extra: dict | None = None,
    calibration=None,
    views=None,
    **kwargs,
) -> dict:
    """Evaluate the model (and the kNN baseline on the same support sets) and write `metrics.json` (with `extra`
    under "run"), `records.jsonl`, `table.md` and the plots (`accuracy_vs_shots.png`, `roc.png` and
    `accuracy_vs_size.png` at the largest k, `examples.png`, `heatmaps.png`) into `out`. The baseline's threshold
    scale is chosen per k on `calibration` (other categories' items, e.g. KensaSynth's validation split; None: its
    rule's threshold, scale 1); `views`: its bank's views (None: the model's). Under `accelerate launch` the work is
    split across processes and the main process writes. Returns {method: results}."""
    from accelerate import PartialState

    from .baseline import calibrate
    from .evaluate import evaluate
    from .model_folder import shared_searches
    from .plots import accuracy_vs_shots, accuracy_vs_size, example_grid, example_sheet, roc_curves

    out = Path(out)
    scales = {}
    if baseline and calibration is not None:
        chosen = {**kwargs, "controls": (), "generate": False, "resamples": 0}
        scales = calibrate(
            evaluate(model, processor, calibration, method="patchcore", views=views, **chosen)["records"]
        )
    with shared_searches(model):  # the baseline meets the model's queries and supports again: searched once
        results = {"kensa": evaluate(model, processor, items, **kwargs)}
        if baseline:
            results["patchcore"] = evaluate(
                model, processor, items, method="patchcore", scales=scales, views=views, **kwargs
            )
            results["patchcore"]["config"]["calibration"] = "validation categories" if scales else "none (scale 1)"
    if not PartialState().is_main_process:
        return results
    out.mkdir(parents=True, exist_ok=True)
    summary = {method: {k: v for k, v in r.items() if k != "records"} for method, r in results.items()}
    if extra:
        summary["run"] = extra
    _write(out / "metrics.json", json.dumps(summary, indent=2))
    lines = [
        json.dumps({"method": method, **{k: v for k, v in record.items() if k not in UNSAVED}}) + "\n"
        for method, r in results.items()
        for record in r["records"]
    ]
    _write(out / "records.jsonl", "".join(lines))
    _write(out / "table.md", markdown_table(results) + "\n" + unlike_line(results) + defect_table(results))
    accuracy_vs_shots({METHODS[m]: r["shots"] for m, r in results.items()}, out / "accuracy_vs_shots.png")
    k = max(results["kensa"]["shots"])
    judged = {m: [x for x in r["records"] if x.get("verdict") != "error"] for m, r in results.items()}
    roc_curves({METHODS[m]: records for m, records in judged.items()}, k, out / "roc.png")
    accuracy_vs_size({METHODS[m]: r for m, r in results.items()}, k, out / "accuracy_vs_size.png")
    shown = [r for r in judged["kensa"] if r["shots"] == k and r["control"] is None and r["seed"] == 0]
    example_grid(items, shown, out / "examples.png", threshold=results["kensa"]["config"]["threshold"])
    if any(r.get("heatmap") is not None for r in shown):
        example_sheet(items, shown, out / "heatmaps.png")
    return results


def _write(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _eval(args) -> None:
    from .inspector import load_pretrained
    from .layouts import detect, load

    if args.task == "grading":
        return _grading(args)
    layout = detect(args.data)
    items = load(args.data, args.split)
    if args.task == "naming":
        from .naming import evaluate_naming, naming_table, write_naming

        model, processor = load_pretrained(args.model)
        shots = int(args.shots) if args.shots else 4
        result = evaluate_naming(model, processor, items, seeds=args.seeds, shots=shots, phases=args.phases)
        result["config"].update(model=args.model, data=str(args.data), split=args.split)
        write_naming(result, args.out)
        print(naming_table(result), end="")
        print(f"wrote {args.out}")
        return
    calibration, where = None, args.calibrate_on
    if where == "auto":  # KensaSynth's validation categories when reporting on another split; else none
        where = "validation" if layout == "kensa-synth" and args.split != "validation" else "none"
    if where == "validation":
        if layout != "kensa-synth" or args.split == "validation":
            raise ValueError(
                f"--calibrate-on validation needs KensaSynth data evaluated on another split; {args.data} is "
                f"{layout}, split {args.split!r}: name a dataset folder or 'none'"
            )
        calibration = load(args.data, "validation")
    elif where != "none":
        calibration = load(where, "validation")
    model, processor = load_pretrained(args.model)
    shots = [int(k) for k in (args.shots or "0,1,2,4,8").split(",")]
    views = {"model": None, "none": (), "rotations": ("rot90", "rot180", "rot270")}[args.baseline_views]
    controls = () if layout != "kensa-synth" or args.no_controls else None
    results = evaluate_and_report(
        model, processor, items, args.out, baseline=not args.no_baseline, calibration=calibration, views=views,
        extra={"model": args.model, "data": str(args.data), "layout": layout, "split": args.split,
               "fine_tiles": args.fine_tiles, "phases": args.phases},
        shots=shots, seeds=args.seeds, queries_per_category=args.queries_per_category, generate=not args.no_text,
        **({"controls": controls} if controls is not None else {}),
        fine_tiles=args.fine_tiles, phases=args.phases,
    )  # fmt: skip
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(markdown_table(results), end="")
        print(f"wrote {args.out}")


def _grading(args) -> None:
    from kensa_vl.train.data import load_grading

    from .grading import evaluate_grading, grading_table, write_grading
    from .inspector import load_pretrained

    items = load_grading(args.data)[0][args.split]
    model, processor = load_pretrained(args.model)
    result = evaluate_grading(model, processor, items, seeds=args.seeds, shots=int(args.shots or 3))
    result["config"].update(model=args.model, data=str(args.data), split=args.split)
    write_grading(result, args.out)
    print(grading_table(result), end="")
    print(f"wrote {args.out}")


def add_parsers(subparsers) -> None:
    from .inspect_command import add_looks

    p = subparsers.add_parser("eval")  # its --help line: cli.COMMANDS
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="KensaSynth, MVTec AD or LOCO, VisA, or a good/defective folder")
    p.add_argument("--split", default="test", help="KensaSynth's split (report on test; choose on validation)")
    p.add_argument(
        "--task", choices=("inspection", "naming", "grading"), default="inspection",
        help="inspection: verdicts, maps and boxes at each k; naming: 2 named defective examples (names never seen "
        "in training), does the answer name the matching one and follow a swap of their names (eval/naming.py); "
        "grading: 3 grades of 3 examples on KensaSynth's grading tasks (eval/grading.py)",
    )  # fmt: skip
    p.add_argument(
        "--shots",
        default=None,
        help="inspection: the k to run (default 0,1,2,4,8); naming: k (4); grading: examples per grade (3)",
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--queries-per-category", type=int, default=None, help="default: every remaining photo")
    p.add_argument("--no-baseline", action="store_true", help="skip the kNN patch-memory baseline")
    p.add_argument(
        "--calibrate-on", default="auto",
        help="where the baseline's threshold is chosen: 'validation' (KensaSynth's; the default 'auto' uses it when "
        "evaluating KensaSynth's test split), a dataset folder, or 'none' (its rule's threshold)",
    )  # fmt: skip
    p.add_argument("--baseline-views", choices=("model", "none", "rotations"), default="model")
    p.add_argument("--no-controls", action="store_true", help="skip the other-category, noise, shuffled controls")
    p.add_argument("--no-text", action="store_true", help="scores, boxes and heatmaps only: no generated answers")
    add_looks(p, "; the model only")
    p.add_argument("--out", default="outputs/eval")
    p.set_defaults(func=_eval)
