"""`kensa-vl publish`: a Hub-ready export of a trained KensaVL folder, verified in a clean process, optionally pushed.

    kensa-vl publish --model outputs/main/model --out outputs/export --eval outputs/main/metrics.json
    kensa-vl publish --model outputs/main/model --out outputs/export --eval outputs/main/metrics.json \
        --repo-id USER/NAME --push [--private]

The export holds the remote code, the safetensors weights, processor, tokenizer, chat template and generation
config of the model folder (training leftovers stay behind), the evaluation's plots, and `README.md` rendered from
the repository's `model_card.md` (Jinja2, every variable required). Before anything is pushed it is loaded by
`verify_export.py` in a fresh process where `kensa_vl` cannot be imported. `--push` uploads the folder in one
commit with `huggingface_hub` (log in first: `hf auth login`, or set `HF_TOKEN`) and prints the revision.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kensa_vl.train.build import TRAINING_RECORD

TEMPLATE = Path(__file__).parent / "model_card.md"  # the repository's model_card.md (a link), shipped in the wheel
VERIFY = Path(__file__).parent / "verify_export.py"
# What a Hub repo of the model needs; everything else in a training folder (runs/, checkpoints, optimizer states,
# training_args.bin) stays behind.
SHIPPED = ("*.py", "*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")
PLOTS = (
    "accuracy_vs_shots.png",
    "roc.png",
    "accuracy_vs_size.png",
    "examples.png",
    "heatmaps.png",
    "loss.png",
    "grading_confusion.png",
)
LEFTOVER = re.compile(r"\{\{|\{%|REPO_ID|TODO|TBD|<fill", re.IGNORECASE)


def export(
    model_dir,
    out,
    metrics=None,
    allow_missing_results: bool = False,
    repo_id: str | None = None,
    datasets: list[str] = (),
    notes=None,
    check=None,
) -> Path:
    """Write the export folder (see the module docstring); `datasets` are Hub dataset ids for the card's header,
    `notes` a markdown file of further measured results (an ablation, say) the card includes, and plots it links
    that lie beside it. `check(model_dir)` refuses a broken model folder first (the CLI passes the loader's,
    `kensa_vl.eval.model_folder.check_model_folder`)."""
    model_dir, out = Path(model_dir), Path(out)
    if check is not None:
        check(model_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} has no config.json: not a saved model folder")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "kensa_vl":
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model, not a KensaVL (kensa_vl)")
    if metrics is None and not allow_missing_results:
        raise ValueError("no evaluation results: pass --eval METRICS_JSON (from kensa-vl eval or kensa-vl train), "
                         "or --allow-missing-results to publish a card that says it has none")  # fmt: skip
    for name, path in (("--eval", metrics), ("--notes", notes)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path}: no such file")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out")
    results = json.loads(Path(metrics).read_text()) if metrics is not None else None
    table = Path(metrics).parent / "table.md" if metrics is not None else None
    if table is not None and not table.is_file():
        raise ValueError(f"--eval {metrics}: no table.md beside it (kensa-vl eval and kensa-vl train write both)")
    plots = [name for name in PLOTS if metrics is not None and (Path(metrics).parent / name).exists()]
    record = model_dir / TRAINING_RECORD
    stages = json.loads(record.read_text()) if record.exists() else []
    extra = Path(notes).read_text() if notes is not None else None
    linked = re.findall(r"\]\(([^)/]+\.png)\)", extra or "")  # plots beside the notes travel with them
    table = table.read_text() if table is not None else None
    card = model_card(config, results, stages, plots, repo_id, datasets, extra, table)  # fails before any write
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # renamed when whole: never half an export
    try:
        for pattern in SHIPPED:
            for path in model_dir.glob(pattern):
                shutil.copy2(path, tmp / path.name)
        for name in plots:
            shutil.copy2(Path(metrics).parent / name, tmp / name)
        for name in linked:
            shutil.copy2(Path(notes).parent / name, tmp / name)
        (tmp / "README.md").write_text(card)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_card(
    config: dict,
    results: dict | None,
    stages: list[dict],
    plots: list[str],
    repo_id: str | None,
    datasets=(),
    notes: str | None = None,
    table: str | None = None,
) -> str:
    """The model card: `model_card.md` rendered with the config, the training record and the evaluation
    (`results`, the evaluation's `metrics.json`, and `table`, the `table.md` written beside it)."""
    import jinja2

    base = config.get("base_models") or {}
    evaluation = None
    if results is not None:
        if table is None:
            raise ValueError("the evaluation's results come with their table.md")
        methods = {k: v for k, v in results.items() if k not in ("run", "naming", "grading", "surfaces")}
        config_of = methods["kensa"].get("config", {})
        calibrated = methods.get("patchcore", {}).get("config", {}).get("calibration") == "validation categories"
        calibration = "the validation categories (not test)" if calibrated else "nothing (its rule's threshold)"
        evaluation = {
            "table": table,
            "run": results.get("run", {}),
            "shots": shot_summary(methods),
            "seeds": config_of.get("seeds", "the"),
            "calibration": calibration,
            "naming": results.get("naming"),
            "grading": results.get("grading"),
            "surfaces": results.get("surfaces"),
        }
    text = config["text_config"]
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    card = environment.from_string(TEMPLATE.read_text()).render(
        repo_id=repo_id or "path/to/export",
        datasets=list(datasets),
        notes=notes,
        base_models=[*base.get("vision", []), *([base["text"]] if base.get("text") else [])],
        encoders=[
            {"name": e["name"], "type": e["config"]["model_type"], "layers": e["feature_layers"]}
            for e in config["vision_encoders"]
        ],
        text_type=text.get("model_type", "llama"),
        text_size=f"{text['num_hidden_layers']} layers, width {text['hidden_size']}",
        config=config,
        tokens_per_tile=tokens_per_tile(config),
        stages=stages,
        evaluation=evaluation,
        plots=plots,
    )
    leftover = sorted({m.group(0) for m in LEFTOVER.finditer(card)})
    if leftover:
        raise ValueError(f"the rendered model card still holds template text {leftover}")
    return card


def tokens_per_tile(config: dict) -> int:
    from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig

    return KensaVLConfig(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")}).tokens_per_tile


def shot_summary(methods: dict) -> list[dict]:
    """Per k: the model's and the baseline's balanced accuracy and AUROC (means over seeds), for the card's prose."""
    rows = []
    for k, value in methods["kensa"]["shots"].items():
        baseline = methods.get("patchcore", {}).get("shots", {}).get(k)
        row = {
            "k": k,
            "kensa": value["overall"]["balanced_accuracy"]["mean"],
            "auroc": value["overall"]["auroc"]["mean"],
        }
        row["baseline"] = baseline["overall"]["balanced_accuracy"]["mean"] if baseline else None
        row["baseline_auroc"] = baseline["overall"]["auroc"]["mean"] if baseline else None
        rows.append(row)
    return rows


def verify(folder, python: str = sys.executable) -> dict:
    """Load and generate from `folder` in a fresh process without `kensa_vl` (`verify_export.py`); raise on any
    problem."""
    done = subprocess.run([python, str(VERIFY), str(folder)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise ValueError(f"the export does not load in a clean process:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["problems"]:
        raise ValueError(f"the export loads with problems: {result['problems']}")
    return result


def push(folder, repo_id: str, private: bool = False) -> str:
    """Upload every file of the folder to the Hub in one commit; returns the commit's revision."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files
    ]
    commit = api.create_commit(
        repo_id, operations, commit_message="Upload KensaVL (kensa-vl publish)", repo_type="model"
    )
    return commit.oid


def add_parsers(subparsers, check=None) -> None:
    """The `publish` sub-command; `check(model_dir)` refuses a broken model folder before anything is written."""
    p = subparsers.add_parser("publish")  # its --help line: cli.COMMANDS
    p.add_argument("--model", required=True, help="a trained KensaVL folder")
    p.add_argument("--out", required=True, help="the export folder (must be new or empty)")
    p.add_argument("--eval", default=None, help="metrics.json of kensa-vl eval / kensa-vl train")
    p.add_argument("--allow-missing-results", action="store_true")
    p.add_argument("--repo-id", default=None, help="USER/NAME on the Hub")
    p.add_argument("--dataset", action="append", default=[], help="Hub dataset id trained on (repeatable)")
    p.add_argument("--notes", default=None, help="markdown of further measured results for the card")
    p.add_argument("--push", action="store_true")
    p.add_argument("--private", action="store_true")

    def run(a) -> None:
        if a.push and not a.repo_id:
            raise ValueError("--push needs --repo-id USER/NAME")
        out = export(a.model, a.out, a.eval, a.allow_missing_results, a.repo_id, a.dataset, a.notes, check)
        result = verify(out)
        print(f"exported {out}; loads with empty loading info under transformers {result['version']} and generates")
        if a.push:
            print(f"pushed {a.repo_id} at revision {push(out, a.repo_id, a.private)}")

    p.set_defaults(func=run)
