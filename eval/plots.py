"""Plots of training and evaluation results (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(stages: dict[str, list[dict]], path: str | Path) -> Path:
    """Training loss per logged step, one line per stage (`stages`: name -> Trainer `state.log_history`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, history in stages.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot([s + offset for s in steps], losses, label=name)
            offset += max(h.get("step", 0) for h in history)
    ax.set(xlabel="optimizer step (stages back to back)", ylabel="training loss", title="KensaVL training loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run shorter than `logging_steps` logs no loss
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def accuracy_vs_shots(curves: dict[str, dict], path: str | Path, metric: str = "balanced_accuracy") -> Path:
    """`metric` (mean +- std over seeds) against the number of good examples shown, one line per method
    (`curves`: name -> `evaluate(...)["shots"]`), with the chance level marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, shots in curves.items():
        ks = sorted(shots, key=int)
        mean = [shots[k]["overall"][metric]["mean"] for k in ks]
        std = [shots[k]["overall"][metric]["std"] for k in ks]
        ax.errorbar([int(k) for k in ks], mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xticks(sorted({int(k) for shots in curves.values() for k in shots}))
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="good examples shown (k)", ylabel=metric.replace("_", " "), ylim=(0.3, 1.02))
    ax.set_title("Few-shot inspection on held-out categories")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def draw_judgement(image, boxes, verdict: str):
    """A copy of the query (PIL) with its predicted boxes and the verdict drawn on it."""
    from PIL import ImageDraw

    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    for box in boxes:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 40, 40), width=width)
    draw.text((6, 6), verdict, fill=(255, 40, 40) if verdict == "defective" else (40, 200, 40))
    return image
