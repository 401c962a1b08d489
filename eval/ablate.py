"""The fine-detail ablation: a ladder of tiny models, each rung adding one technique, all trained by the main job's
recipes with the same budget and evaluated the same way on KensaSynth's validation split (categories and defects
that training never sees; test is read only to report).

    kensa-vl ablate --out outputs/ablate [--data outputs/kensa-synth-224] [--max-steps N] [--rungs 0,1,7]

Per rung: 4-shot balanced accuracy overall, on tiny defects (<= 0.2% of the image) and on large ones, box hit rate,
visual tokens per query, encoder time and total time of one 4-shot episode's forward, its peak memory. Every rung
has the reference comparison on all of its encoders; the main job compares on the DCT encoder alone (its row), and
the side comparisons (interleaved encoders, no pixel shuffle) change one thing of the main job.
Writes `ablation.json`, `table.md` and `ablation.png` into `--out`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

LADDER = [
    ("one ViT, one view of the photo", {"encoders": ["siglip"], "max_tiles": 1, "taps": [-1]}),
    ("+ tiles (2x2 + thumbnail)", {"max_tiles": 4}),
    ("+ second encoder (DINOv2-like, channels concatenated)", {"encoders": ["siglip", "dinov2"]}),
    ("+ multi-layer taps (every hidden state)", {"taps": [0, 1, 2]}),
    ("+ S2 (each tile also at 2x)", {"s2": True}),
    ("+ CNN encoder (ResNet stage 2)", {"encoders": ["siglip", "dinov2", "resnet"]}),
    ("+ direct patches", {"encoders": ["siglip", "dinov2", "resnet", "patch"]}),
    ("+ DCT encoder", {"dct": True}),
]
SIDE = [  # each changes one thing of the main job's model (`train/pipeline.py`: `TINY`), the ladder's best
    ("main job, encoders interleaved instead of concatenated", {"fusion": "interleave"}),
    ("main job, no pixel shuffle", {"pixel_shuffle": 1}),
    ("main job (comparison on the DCT encoder alone)", {}),
]


def rungs() -> list[tuple[str, dict]]:
    """(label, `tiny` settings) of every rung: the ladder's cumulative settings, then the side comparisons (changes
    of the main job's settings)."""
    out, settings = [], {"reference_comparison": True, "reference_encoders": None, "dct": False}
    for label, change in LADDER:
        settings = {**settings, **change}
        out.append((label, dict(settings)))
    return out + [(label, dict(change)) for label, change in SIDE]


@torch.no_grad()
def episode_cost(model, processor, items) -> dict:
    """Visual tokens of one query, encoder and total time of one 4-shot episode's forward, its peak memory."""
    from .measure import PeakMemory, component_times

    images = [items[i]["image"] for i in range(5)]
    batch = processor(text="".join(["<image>"] * 5), images=images, return_tensors="pt")
    query = processor(text="<image>", images=images[-1:], return_tensors="pt")
    model.eval()
    model(**batch)  # warm-up
    times = component_times(model, batch)
    with PeakMemory() as memory:
        model(**batch)
    image_id = model.config.image_token_id
    return {
        "visual_tokens": int((query["input_ids"] == image_id).sum()),
        "encoder_s": sum(v for k, v in times.items() if k.startswith("tower ")),
        "episode_s": times["total"],
        "peak_mib": memory.peak / 2**20,
    }


def run(
    out: str | Path,
    data: str | Path,
    max_steps: int = 0,
    chosen=None,
    seeds: int = 3,
    queries: int = 20,
    trained: dict[int, str] | None = None,
    train=None,
):
    """Train, evaluate and time the `chosen` rungs (all by default); `train` is the main job's trainer
    (`kensa_vl.train.pipeline.train`, which the CLI passes in: evaluation does not import training code), needed for
    every rung not in `trained`; `max_steps` > 0 caps both stages' steps
    (0: the main job's own budget). `trained` maps a rung to a model already trained with its settings and the
    same budget (e.g. the main job's `outputs/main/model` for its row): evaluated and timed, not retrained.
    Results accumulate in `out/ablation.json`."""
    from kensa_vl.train.data import load_synth

    from .evaluate import evaluate
    from .inspector import load_pretrained

    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)  # a trained rung alone trains nothing that would make it
    photos = load_synth(data)[0]["validation"]
    results = json.loads((out / "ablation.json").read_text()) if (out / "ablation.json").exists() else {}
    todo = [(i, label, tiny) for i, (label, tiny) in enumerate(rungs()) if chosen is None or i in chosen]
    untrained = [i for i, *_ in todo if i not in (trained or {})]
    if untrained and train is None:
        raise ValueError(f"rungs {untrained} need training: pass train= (kensa_vl.train.pipeline.train)")
    for index, label, tiny in tqdm(todo, desc="rungs"):
        folder = out / f"rung{index}"
        budget = ["--max_steps", str(max_steps)] if max_steps > 0 else []
        if index in (trained or {}):
            model_dir, seconds = Path(trained[index]), None
        else:
            model_dir, _, seconds = train(folder, data, tiny, [*budget, "--report_to", "none"])
        model, processor = load_pretrained(model_dir)
        result = evaluate(model, processor, photos, shots=(4,), seeds=seeds, queries_per_category=queries,
                          controls=(), generate=False, progress=False)["shots"][4]  # fmt: skip
        mean = lambda group, key: (group or {}).get(key, {}).get("mean")  # noqa: E731
        results[str(index)] = {
            "rung": label,
            "tiny": tiny,
            "balanced_accuracy": mean(result["overall"], "balanced_accuracy"),
            "balanced_accuracy_tiny": mean(result["per_size"].get("tiny"), "balanced_accuracy"),
            "balanced_accuracy_large": mean(result["per_size"].get("large"), "balanced_accuracy"),
            "box_hit_rate": mean(result["overall"], "box_hit_rate"),
            "box_hit_rate_1pct": mean(result["overall"], "box_hit_rate_1pct"),
            "train_s": None if seconds is None else round(seconds, 1),
            **episode_cost(model, processor, photos),
        }
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results[str(index)]), flush=True)
    (out / "table.md").write_text(table(results))
    plot(results, out / "ablation.png")
    return results


def table(results: dict) -> str:
    lines = [
        "| # | rung | 4-shot BA | BA, tiny defects | BA, large | box hit rate (≥ 1%) | visual tokens per query "
        "| encoders ms / episode ms | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for key in sorted(results, key=int):
        r = results[key]
        lines.append(
            f"| {key} | {r['rung']} | {fmt(r['balanced_accuracy'])} | {fmt(r['balanced_accuracy_tiny'])} "
            f"| {fmt(r['balanced_accuracy_large'])} | {fmt(r['box_hit_rate_1pct'])} | {r['visual_tokens']} "
            f"| {r['encoder_s'] * 1e3:.1f} / {r['episode_s'] * 1e3:.1f} | {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(results, key=int)
    labels = [results[k]["rung"] for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(keys) + 2.0), sharey=True)
    y = range(len(keys))
    for name, key, marker in (("overall", "balanced_accuracy", "o"), ("tiny defects", "balanced_accuracy_tiny", "v"),
                              ("large defects", "balanced_accuracy_large", "^")):  # fmt: skip
        left.plot([results[k][key] or float("nan") for k in keys], y, marker, label=name)
    left.axvline(0.5, color="grey", lw=0.5)
    left.set_xlabel("4-shot balanced accuracy")
    left.set_xlim(0.45, 1.0)
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    right.barh(y, [results[k]["episode_s"] for k in keys], color="lightgrey", label="episode")
    right.barh(y, [results[k]["encoder_s"] for k in keys], color="tab:blue", label="encoders")
    right.set_xlabel("4-shot episode forward (s)")
    right.legend(loc="lower right")
    left.set_yticks(list(y), labels)
    left.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parsers(subparsers, train) -> None:
    """The `ablate` sub-command; `train` trains a rung (`kensa_vl.train.pipeline.train`)."""
    p = subparsers.add_parser("ablate")  # its --help line: cli.COMMANDS
    p.add_argument("--out", default="outputs/ablate")
    p.add_argument("--data", default="outputs/kensa-synth-224", help="KensaSynth folder (generated when missing)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on each stage's steps (0: the main job's budget)")
    p.add_argument("--rungs", default=None, help="comma-separated rung numbers (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the rungs and exit")
    p.add_argument(
        "--trained", action="append", default=[], metavar="RUNG=DIR",
        help="a model already trained with that rung's settings and budget, e.g. 10=outputs/main/model",
    )  # fmt: skip

    def start(a) -> None:
        if a.list:
            for index, (label, tiny) in enumerate(rungs()):
                print(f"{index}: {label} {json.dumps(tiny)}")
            return
        chosen = None if a.rungs is None else {int(x) for x in a.rungs.split(",")}
        trained = {int(rung): path for rung, _, path in (item.partition("=") for item in a.trained)}
        run(a.out, a.data, a.max_steps, chosen, trained=trained, train=train)

    p.set_defaults(func=start)
