"""`kensa-vl eval` and `kensa-vl inspect`: evaluation reports and one-off inspection from the command line.

kensa-vl eval --model outputs/main/model --data outputs/kensa-synth-224 --shots 0,1,2,4,8 --seeds 3 --out DIR
kensa-vl inspect --model DIR --good a.png b.png --defective c.png="a dark scratch" --query q1.png q2.png
"""

from __future__ import annotations

import json
from pathlib import Path

METHODS = {"kensa": "KensaVL", "patchcore": "kNN patch memory (PatchCore-style)"}


TABLE_METRICS = ("balanced_accuracy", "auroc", "overkill", "miss", "box_hit_rate", "box_hit_rate_1pct")


def markdown_table(results: dict[str, dict], metrics=TABLE_METRICS) -> str:
    """One row per method and k: mean ± std over seeds; `results`: method -> `evaluate(...)` output."""
    names = [m.replace("_1pct", " (≥ 1% of image)").replace("_", " ") for m in metrics]
    lines = ["| method | k | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---|" * len(metrics))
    for method, result in results.items():
        rows = [(k, v) for k, v in result["shots"].items()] + list(result["controls"].items())
        for k, value in rows:
            cells = []
            for metric in metrics:
                m = value["overall"].get(metric)  # the baseline draws no boxes
                cells.append("n/a" if m is None or m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}")
            lines.append(f"| {METHODS[method]} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_and_report(
    model, processor, items, out: str | Path, baseline: bool = True, extra: dict | None = None, **kwargs
) -> dict:
    """Evaluate the model (and the kNN baseline on the same support sets) and write `metrics.json` (with `extra`
    under "run"), `records.jsonl`, `table.md` and the plots (`accuracy_vs_shots.png`, `roc.png` and
    `accuracy_vs_size.png` at the largest k, `examples.png`) into `out`. Returns {method: results}."""
    from .evaluate import evaluate
    from .plots import accuracy_vs_shots, accuracy_vs_size, example_grid, roc_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"kensa": evaluate(model, processor, items, **kwargs)}
    if baseline:
        results["patchcore"] = evaluate(model, processor, items, method="patchcore", **kwargs)
    summary = {method: {k: v for k, v in r.items() if k != "records"} for method, r in results.items()}
    if extra:
        summary["run"] = extra
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    with open(out / "records.jsonl", "w") as handle:
        for method, r in results.items():
            handle.writelines(json.dumps({"method": method, **record}) + "\n" for record in r["records"])
    (out / "table.md").write_text(markdown_table(results))
    accuracy_vs_shots({METHODS[m]: r["shots"] for m, r in results.items()}, out / "accuracy_vs_shots.png")
    k = max(results["kensa"]["shots"])
    roc_curves({METHODS[m]: r["records"] for m, r in results.items()}, k, out / "roc.png")
    accuracy_vs_size({METHODS[m]: r for m, r in results.items()}, k, out / "accuracy_vs_size.png")
    shown = [r for r in results["kensa"]["records"] if r["shots"] == k and r["control"] is None and r["seed"] == 0]
    example_grid(items, shown, out / "examples.png", threshold=results["kensa"]["config"]["threshold"])
    return results


def _eval(args) -> None:
    from kensa_vl.train.data import load_synth

    from .inspector import load_pretrained

    items, _ = load_synth(args.data)
    if args.split not in items:
        raise ValueError(f"--split {args.split!r} is not in {args.data}; it has {list(items)}")
    model, processor = load_pretrained(args.model)
    shots = [int(k) for k in args.shots.split(",")]
    results = evaluate_and_report(
        model, processor, items[args.split], args.out, baseline=not args.no_baseline, shots=shots,
        seeds=args.seeds, queries_per_category=args.queries_per_category,
    )  # fmt: skip
    print(markdown_table(results), end="")
    print(f"wrote {args.out}")


def _inspect(args) -> None:
    from .inspector import Inspector, load_pretrained, support_item

    support = [support_item(path) for path in args.good]
    for spec in args.defective:
        path, _, description = spec.partition("=")
        support.append(support_item(path, defective=True, description=description or None))
    model, processor = load_pretrained(args.model)
    inspector = Inspector(model, processor, noun=args.noun, threshold=args.threshold)
    inspector.set_support(support)
    results = []
    for path, result in zip(args.query, inspector.judge(list(args.query)), strict=True):
        if result.verdict == "error":
            print(f"{path}\terror\t{result.text}")
        else:
            print(f"{path}\t{result.verdict}\t{result.p_defective:.3f}")
            if args.viz:
                _draw(path, result.boxes, Path(args.viz) / f"{Path(path).stem}.png", result.verdict)
        results.append({"file": path, **result.to_dict()})
        if result.verdict == "error":
            results[-1]["p_defective"] = None  # JSON has no NaN
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    failed = [r["file"] for r in results if r["verdict"] == "error"]
    if failed:
        raise ValueError(f"{len(failed)} of {len(results)} queries could not be read: {', '.join(failed)}")


def _draw(path: str, boxes, out: Path, verdict: str) -> None:
    from PIL import Image

    from .plots import draw_judgement

    out.parent.mkdir(parents=True, exist_ok=True)
    draw_judgement(Image.open(path), boxes, verdict).save(out)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("eval")  # its --help line: cli.COMMANDS
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="KensaSynth folder")
    p.add_argument("--split", default="test")
    p.add_argument("--shots", default="0,1,2,4,8")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--queries-per-category", type=int, default=None, help="default: every remaining photo")
    p.add_argument("--no-baseline", action="store_true", help="skip the kNN patch-memory baseline")
    p.add_argument("--out", default="outputs/eval")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("inspect")  # its --help line: cli.COMMANDS
    p.add_argument("--model", required=True)
    p.add_argument("--good", nargs="+", default=[], metavar="IMAGE")
    p.add_argument("--defective", nargs="*", default=[], metavar="IMAGE[=DESCRIPTION]")
    p.add_argument("--query", nargs="+", required=True, metavar="IMAGE")
    p.add_argument("--noun", default="product", help="what the product is called in the prompt")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--out", help="results as JSON")
    p.add_argument("--viz", help="folder for each query with its boxes drawn")
    p.set_defaults(func=_inspect)
