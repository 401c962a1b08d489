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


def outline(draw, box, color, width: int) -> None:
    """Draw box `[x0, y0, x1, y1]` (x1, y1 exclusive); a box one bin wide (x0 == x1) is drawn as a line."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=width)


HEATMAP_SPAN = 2.0  # an overlay's colours span at least this much log-distance (a good photo's noise stays cool)


def heatmap_colors(heatmap, size: tuple[int, int]):
    """A heatmap (log-distance, any size) as an RGB PIL image of `size` (inferno): from its 1st percentile to its
    maximum, or over `HEATMAP_SPAN` when that is wider."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    values = np.asarray(heatmap, dtype=np.float32)
    low = float(np.percentile(values, 1))
    high = max(float(values.max()), low + HEATMAP_SPAN)
    rgb = colormaps["inferno"](np.clip((values - low) / (high - low), 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)


def draw_judgement(image, boxes, verdict: str, heatmap=None, alpha: float = 0.45):
    """A copy of the query (PIL) with its heatmap blended over it (when given), its predicted boxes and the
    verdict drawn on it."""
    from PIL import Image, ImageDraw

    image = image.convert("RGB")
    if heatmap is not None:
        image = Image.blend(image, heatmap_colors(heatmap, image.size), alpha)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    for box in boxes:
        outline(draw, box, (255, 40, 40), width)
    draw.text((6, 6), verdict, fill=(255, 40, 40) if verdict == "defective" else (40, 200, 40))
    return image


def _save(fig, plt, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def roc_curves(records: dict[str, list[dict]], k: int, path: str | Path) -> Path:
    """ROC of P(defective) at `k` good examples (all seeds pooled), one curve per method (`records`: name -> the
    evaluator's query records)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, rows in records.items():
        chosen = [r for r in rows if r["shots"] == k and r["control"] is None]
        labels = [r["label"] == "defective" for r in chosen]
        if len(set(labels)) < 2:
            continue
        scores = [r["p_defective"] for r in chosen]
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(xlabel="good parts rejected (false positive rate)", ylabel="defects caught (true positive rate)")
    ax.set_title(f"ROC at k = {k}, held-out categories")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def accuracy_vs_size(results: dict[str, dict], k: int, path: str | Path) -> Path:
    """Balanced accuracy per defect-size bin at `k` (each bin's defects against all good queries), one group of bars
    per method (`results`: name -> `evaluate(...)`)."""
    plt = _pyplot()
    order = ["tiny", "small", "medium", "large"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(results), 1)
    for i, (name, result) in enumerate(results.items()):
        per_size = result["shots"].get(k, result["shots"].get(str(k), {})).get("per_size", {})
        sizes = [s for s in order if per_size.get(s)] + sorted(s for s in per_size if s not in order and per_size[s])
        mean = [per_size[s]["balanced_accuracy"]["mean"] for s in sizes]
        std = [per_size[s]["balanced_accuracy"]["std"] for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], mean, width, yerr=std, capsize=3, label=name)
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(sizes))], sizes)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="defect size (share of the image area)", ylabel="balanced accuracy", ylim=(0, 1.05))
    ax.set_title(f"Accuracy by defect size at k = {k}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def example_grid(items, records: list[dict], path: str | Path, count: int = 8, threshold: float = 0.5) -> Path:
    """Queries with their predicted boxes (red) and true boxes (green), titled with the verdict and P(defective):
    the first `count` defective and good queries of `records` (the model's, one k), `items` the evaluated split."""
    from PIL import ImageDraw

    plt = _pyplot()
    chosen = [r for r in records if r["label"] == "defective"][: count // 2]
    chosen += [r for r in records if r["label"] == "good"][: count - len(chosen)]
    columns = 4
    fig, axes = plt.subplots((len(chosen) + columns - 1) // columns, columns, figsize=(3 * columns, 3.2 * 2))
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, chosen, strict=False):
        image = items[record["index"]]["image"].convert("RGB")
        draw = ImageDraw.Draw(image)
        for box in record["true_boxes"]:
            outline(draw, box, (40, 200, 40), 2)
        for box in record["boxes"]:
            outline(draw, box, (255, 40, 40), 2)
        verdict = "defective" if record["p_defective"] >= threshold else "good"
        ax.imshow(image)
        ax.set_title(f"{record['label']} → {verdict} ({record['p_defective']:.2f})", fontsize=9)
    fig.suptitle("Example queries: true boxes green, predicted red")
    return _save(fig, plt, path)


def example_sheet(items, records: list[dict], path: str | Path, per_category: int = 3) -> Path:
    """Per category a row of queries, each as the photo with its true boxes (green) and predicted ones (red), its
    heatmap and its true mask: up to `per_category` queries (defective first), from `records` that hold a
    `heatmap` (`evaluate` keeps them for seed 0 at the largest k)."""
    import numpy as np
    from PIL import ImageDraw

    plt = _pyplot()
    shown = {}
    for r in sorted((r for r in records if r.get("heatmap") is not None), key=lambda r: r["label"] == "good"):
        row = shown.setdefault(r["category"], [])
        if len(row) < per_category:
            row.append(r)
    if not shown:
        raise ValueError("no record holds a heatmap (a model without the reference comparison draws none)")
    columns = 3 * per_category
    fig, axes = plt.subplots(len(shown), columns, figsize=(2.2 * columns, 2.4 * len(shown)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for axes_row, (category, row) in zip(axes, sorted(shown.items()), strict=True):
        for j, record in enumerate(row):
            item = items[record["index"]]
            image = item["image"].convert("RGB")
            draw = ImageDraw.Draw(image)
            for box, color in [(b, (40, 200, 40)) for b in record["true_boxes"]] + [
                (b, (255, 40, 40)) for b in record["boxes"]
            ]:
                outline(draw, box, color, max(1, round(max(image.size) / 150)))
            mask = item.get("mask")
            mask = np.zeros(image.size[::-1], bool) if mask is None else np.asarray(mask) > 0
            panels = (image, heatmap_colors(record["heatmap"], image.size), mask)
            titles = (f"{category}: {record['label']} ({record['p_defective']:.2f})", "heatmap", "true mask")
            for ax, panel, title in zip(axes_row[3 * j : 3 * j + 3], panels, titles, strict=True):
                ax.imshow(panel, cmap="gray" if panel is mask else None)
                ax.set_title(title, fontsize=8)
    fig.suptitle("Queries (true boxes green, predicted red, P(defective)), heatmaps and true masks")
    return _save(fig, plt, path)
