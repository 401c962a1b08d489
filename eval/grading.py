"""Grading by example (官能検査) on KensaSynth's grading tasks: accuracy, ordinal error, per attribute and category.

Per (category, attribute) of a split and per seed: `num_grades` grades of `shots` examples each, every grade but the
last showing its limit sample among them, named by names drawn from the evaluation pool (`names.draw_grades`: never
in training). Queries: the other photos of that (category, attribute) at least `grading.QUERY_MARGIN` of a grade's
width inside their grade.

- **accuracy**: the share of queries given their grade; **ordinal error**: the mean distance in grades between the
  answer and the truth (a grade named by no example counts as the farthest grade).
- Per attribute (held-out ones included: validation's `coarseness`, test's `gloss`) and per category.
- **kensa**: the model's generated answer through an `Inspector` (the grade it names; a model without the comparison
  or grade marks is not run). **follow rate**: with the names rotated across the grades (same photos), the share of
  the queries named in both runs whose answer names the same photos' grade: the name is read from the examples.
- **pooled** (the training-free baseline): nearest grade by pooled feature statistics on the model's compared
  encoders (`PooledNearest`), on the same supports and queries.

Choose on validation (`--split validation`); the test split only reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kensa_vl.modeling.comparison_kensa_vl import thumbnail_tiles
from kensa_vl.processing.image_processing_kensa_vl import to_rgb

METHODS = {"kensa": "KensaVL (generated answer)", "pooled": "nearest grade, pooled features (training-free)"}
MAX_NEW_TOKENS = 1  # the Inspector writes at least "grade: <its longest name>," (what is measured), not the reason


def grading_sets(items, seeds: int = 3, num_grades: int = 3, shots: int = 3) -> list[dict]:
    """The examples and queries: per (category, attribute) and seed, `shots` photos of each of `num_grades` grades
    (limit samples shown) and every other photo that `is_query`; seeded by (seed, category, attribute)."""
    from kensa_vl.train.data import draw_grades, draw_grading, grade_of, grading_pools, is_query

    columns = items.select_columns(["category", "attribute", "level", "limit"]).to_dict()
    sets = []
    for (category, attribute), pool in sorted(grading_pools(columns).items()):
        for seed in range(seeds):
            rng = np.random.default_rng([seed, sum(map(ord, category)), sum(map(ord, attribute)), 11])
            drawn = draw_grading(pool, num_grades, [shots] * num_grades, rng, limit_odds=1.0)
            if drawn is None:
                continue
            queries = [(r, grade_of(lv, num_grades)) for r, lv in pool["regular"]
                       if r not in drawn["support"] and is_query(lv, num_grades)]  # fmt: skip
            sets.append({"category": category, "attribute": attribute, "seed": seed, "support": drawn["support"],
                         "grades": drawn["grades"], "names": draw_grades(rng, num_grades, "evaluation"),
                         "queries": queries})  # fmt: skip
    if not sets:
        raise ValueError(f"no (category, attribute) has {shots} photos in each of {num_grades} grades and a query")
    return sets


class PooledNearest:
    """The training-free baseline: an image's statistics are the mean and standard deviation over its grid tiles'
    cells of each channel of the model's compared encoders (their raw features, not L2-normalised: a darker photo
    has smaller DCT coefficients); a query takes the grade whose examples' mean statistics are nearest (L2 per
    encoder over the square root of its dimension, averaged over the encoders). Unscaled distances, chosen on
    validation over dividing each channel by its spread over the examples or within the grades (docs/grading.md)."""

    def __init__(self, model, processor, max_tiles: int | None = None):
        self.model, self.processor, self.max_tiles = model.eval(), processor, max_tiles

    @torch.no_grad()
    def statistics(self, image) -> dict[str, torch.Tensor]:
        batch = self.processor.image_processor([to_rgb(image)], max_tiles=self.max_tiles, return_tensors="pt")
        names = self.model.config.reference_encoder_names()
        grids = self.model.model.image_grids(batch["pixel_values"].to(self.model.device), names)
        grid = ~thumbnail_tiles(batch["image_grid"]).to(self.model.device)
        grid = grid if grid.any() else torch.ones_like(grid)
        out = {}
        for name, cells in grids.items():
            flat = cells[grid].float().reshape(-1, cells.shape[-1])
            out[name] = torch.cat([flat.mean(0), flat.std(0)]).cpu()
        return out

    def set_support(self, images: list, grades: list[int]) -> None:
        stats = [self.statistics(im) for im in images]
        self.grades = sorted(set(grades))
        self.prototypes = [
            {
                n: torch.stack([s[n] for s, g in zip(stats, grades, strict=True) if g == grade]).mean(0)
                for n in stats[0]
            }
            for grade in self.grades
        ]

    def predict(self, image) -> tuple[int, list[float]]:
        """(the nearest grade, its softmax over negative distances per grade)."""
        stats = self.statistics(image)
        distance = torch.stack([
            torch.stack([(stats[n] - p[n]).norm() / len(p[n]) ** 0.5 for n in stats]).mean()
            for p in self.prototypes
        ])  # fmt: skip
        return self.grades[int(distance.argmin())], torch.softmax(-distance, 0).tolist()


def evaluate_grading(model, processor, items, seeds: int = 3, num_grades: int = 3, shots: int = 3,
                     progress: bool = True, part: tuple[int, int] = (0, 1)) -> dict:  # fmt: skip
    """Grade every query of `grading_sets` with the baseline and, for a model that grades, with KensaVL through an
    `Inspector` (cached support, greedy answer), twice: with the drawn names and with the names rotated across the
    grades (`run` "rotated"), for the follow rate. The metrics and one record per query, method and run. `part`
    `(i, n)`: only the i-th of n consecutive shares of the sets (run side by side; `joined` puts the shares' results
    together as one run's)."""
    from kensa_vl.train.data import ATTRIBUTES, noun

    from .inspector import Inspector
    from .model_folder import shared_searches

    i, n = part
    if not 0 <= i < n:
        raise ValueError(f"part is (i, n) with 0 <= i < n: the i-th of n shares of the grading sets; got {part}")
    sets = grading_sets(items, seeds, num_grades, shots)
    sets = sets[i * len(sets) // n : (i + 1) * len(sets) // n]
    baseline, records = PooledNearest(model, processor), []
    grades = bool(getattr(model.config, "reference_comparison", False) and model.config.grade_marks)
    inspector = Inspector(model, processor, max_new_tokens=MAX_NEW_TOKENS, check_examples=False) if grades else None
    for chosen in tqdm(sets, desc="grading by example", disable=not progress):
        context = {key: chosen[key] for key in ("category", "attribute", "seed")}
        queries = [(row, grade, items[row]["image"]) for row, grade in chosen["queries"]]
        examples = [items[i] for i in chosen["support"]]
        baseline.set_support([x["image"] for x in examples], chosen["grades"])
        for order, (row, grade, image) in enumerate(queries):
            predicted, probs = baseline.predict(image)
            records.append({"method": "pooled", "run": "named", **context, "query": order, "index": row,
                            "grade": grade, "predicted": predicted, "probs": probs})  # fmt: skip
        if inspector is None:
            continue
        inspector.noun = noun(chosen["category"], "product")
        inspector.graded_by = ATTRIBUTES[chosen["attribute"]].noun if chosen["attribute"] in ATTRIBUTES else "look"
        with shared_searches(model):  # the rotated run meets the same photos: searched once
            records += _kensa_runs(inspector, chosen, examples, queries, context)
    config = {"seeds": seeds, "num_grades": num_grades, "shots": shots}
    return {"metrics": grading_metrics(records, num_grades), "records": records, "config": config}


def joined(parts: list[dict]) -> dict:
    """The results of `evaluate_grading`'s shares `(0, n) ... (n - 1, n)`, in that order: those of one whole run."""
    records = [record for result in parts for record in result["records"]]
    config = parts[0]["config"]
    return {"metrics": grading_metrics(records, config["num_grades"]), "records": records, "config": config}


def named_records(records: list[dict], method: str) -> list[dict]:
    """A method's records of the run with the drawn names (the rotated run only measures the follow rate)."""
    return [r for r in records if r["method"] == method and r.get("run", "named") == "named"]


def _kensa_runs(inspector, chosen: dict, examples: list, queries: list, context: dict) -> list[dict]:
    """One grading set's KensaVL records: every query judged with the drawn names, then with them rotated."""
    from .inspector import support_item

    records = []
    for run, names in (("named", chosen["names"]), ("rotated", chosen["names"][1:] + chosen["names"][:1])):
        inspector.set_support([support_item(x["image"], label=names[g], limit=x["limit"])
                               for x, g in zip(examples, chosen["grades"], strict=True)])  # fmt: skip
        for order, (row, grade, image) in enumerate(queries):
            result = inspector.judge(image)[0]
            predicted = names.index(result.grade) if result.grade in names else None
            probs = [result.grade_probabilities.get(n, 0.0) for n in names]
            records.append({"method": "kensa", "run": run, **context, "query": order, "index": row,
                            "grade": grade, "predicted": predicted, "probs": probs, "text": result.text,
                            "limit_sample": result.limit_sample})  # fmt: skip
    return records


def grading_metrics(records: list[dict], num_grades: int) -> dict:
    """Per method: accuracy, ordinal error and their spread over seeds, overall, per attribute and per category."""

    def summary(chosen: list[dict]) -> dict:
        wrong = [num_grades - 1 if r["predicted"] is None else abs(r["predicted"] - r["grade"]) for r in chosen]
        return {"queries": len(chosen), "accuracy": float(np.mean([w == 0 for w in wrong])),
                "ordinal_error": float(np.mean(wrong))}  # fmt: skip

    out = {}
    for method in sorted({r["method"] for r in records}):
        mine = named_records(records, method)
        per_seed = [
            summary([r for r in mine if r["seed"] == s])["accuracy"] for s in sorted({r["seed"] for r in mine})
        ]
        out[method] = {**summary(mine), "accuracy_seed_std": float(np.std(per_seed))}
        for key, field in (("attributes", "attribute"), ("categories", "category")):
            names = sorted({r[field] for r in mine})
            out[method][key] = {n: summary([r for r in mine if r[field] == n]) for n in names}
        rotated = {(r["category"], r["attribute"], r["seed"], r["query"]): r for r in records
                   if r["method"] == method and r.get("run") == "rotated"}  # fmt: skip
        pairs = [(r, rotated.get((r["category"], r["attribute"], r["seed"], r["query"]))) for r in mine]
        both = [(a, b) for a, b in pairs if b is not None and None not in (a["predicted"], b["predicted"])]
        # the answer follows the names when it points at the same examples' grade under either naming
        follow = [a["predicted"] == b["predicted"] for a, b in both]
        out[method]["follow_rate"] = float(np.mean(follow)) if both else None
        out[method]["named_in_both_runs"] = len(both)
    return out


def confusion(records: list[dict], num_grades: int) -> np.ndarray:
    """`(num_grades, num_grades + 1)` counts: true grade by answered grade, the last column for no grade named."""
    counts = np.zeros((num_grades, num_grades + 1), int)
    for r in records:
        counts[r["grade"], num_grades if r["predicted"] is None else r["predicted"]] += 1
    return counts


def grading_table(result: dict) -> str:
    """Per method the overall figures, then per attribute and per category, as markdown."""
    lines = ["| method | queries | accuracy | seed std | ordinal error | follow rate |", "|---|---|---|---|---|---|"]
    for method, m in result["metrics"].items():
        follow = "n/a" if m["follow_rate"] is None else f"{m['follow_rate']:.3f} ({m['named_in_both_runs']})"
        lines.append(f"| {METHODS.get(method, method)} | {m['queries']} | {m['accuracy']:.3f} | "
                     f"{m['accuracy_seed_std']:.3f} | {m['ordinal_error']:.3f} | {follow} |")  # fmt: skip
    for key in ("attributes", "categories"):
        methods = list(result["metrics"])
        lines += ["", f"| {key} | " + " | ".join(f"{m} accuracy" for m in methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]  # fmt: skip
        for name in result["metrics"][methods[0]][key]:
            cells = " | ".join(f"{result['metrics'][m][key][name]['accuracy']:.3f}" for m in methods)
            lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_confusion(result: dict, path) -> Path:
    """One confusion matrix per method (rows: true grade; columns: answered grade, then none), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, methods = result["config"]["num_grades"], list(result["metrics"])
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        counts = confusion(named_records(result["records"], method), n)
        ax.imshow(counts / counts.sum(1, keepdims=True).clip(1), cmap="Blues", vmin=0, vmax=1)
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, str(c), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(n + 1), [*(str(g + 1) for g in range(n)), "none"])
        ax.set_yticks(range(n), [str(g + 1) for g in range(n)])
        ax.set_xlabel("answered grade")
        ax.set_ylabel("true grade")
        ax.set_title(f"{method}: accuracy {result['metrics'][method]['accuracy']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_grading(result: dict, out) -> None:
    """`grading.json` (metrics and config), `grading_records.jsonl`, `grading.md` and `grading_confusion.png`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grading.json").write_text(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
    (out / "grading_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["records"]))
    (out / "grading.md").write_text(grading_table(result))
    plot_confusion(result, out / "grading_confusion.png")
