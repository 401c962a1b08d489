"""Does the answer read what the examples say? Naming by example, label permutation and masking on KensaSynth.

Per category of a split and per seed: `shots` good examples and two defective examples of two different defect
types, named by two names drawn from the evaluation pool (`train/data/names.py`: never in training). Queries: the
category's other defective photos of those two types (`per_type` each) and as many of its other good photos.

- **naming**: the share of those defective queries whose answer names the example of the query's type (a query
  judged good names nothing and counts as wrong); `naming_when_flagged`: among the queries judged defective.
- **naming, the examples boxed**: the same with each defective example's boxes given (`naming_boxed`,
  `naming_boxed_when_flagged`): the user marks where the example's defect is.
- **follow rate**: with the two examples' names swapped (same images), the share of the queries named in both runs
  whose name swapped with them: the name is read from the example, not recalled.
- **a type no example shows** (`unshown_named`): queries of a third defect type of the category (where it has one),
  `per_type` of them, with the named examples; among those judged defective, the share answered with one of the
  examples' names (lower is better: the defect is not of either kind; "defect" says so).
- **masking**: balanced accuracy of the verdict with the two defective examples in the support (one of the query's
  own type) against the good examples alone, on the same queries: `balanced_accuracy_with_defective` and
  `balanced_accuracy_good_only`.

Choose on validation (`--split validation`); the test split only reports.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .inspector import Inspector, support_item
from .metrics import image_metrics
from .model_folder import shared_searches


class NoNamingSets(ValueError):
    """A split with no category that a naming set can be drawn from."""


def naming_sets(items, seeds: int, shots: int, per_type: int) -> list[dict]:
    """The support sets and queries: per category and seed, `shots` good photos, one photo of each of two defect
    types that have at least two photos, and the queries (seeded by (seed, category)); `unshown`: photos of a third
    type where the category has one (drawn last, so the other draws are those of a set without them)."""
    from kensa_vl.train.data import draw_names, naming_pools

    pools, sets = naming_pools(items), []
    for category in sorted({c for c, _ in pools}):
        kinds = [k for c, k in pools if c == category and k not in ("good", "defective")]
        types = sorted(k for k in kinds if len(pools[(category, k)]) > 1)
        goods = pools.get((category, "good"), [])
        if len(types) < 2 or len(goods) <= shots:
            continue
        for seed in range(seeds):
            rng = np.random.default_rng([seed, sum(map(ord, category)), 7])
            shown = [str(t) for t in rng.choice(types, 2, replace=False)]
            photos = {t: [int(i) for i in rng.permutation(pools[(category, t)])] for t in shown}
            good = [int(i) for i in rng.permutation(goods)]
            queries = [(i, t) for t in shown for i in photos[t][1 : 1 + per_type]]
            chosen = {
                "category": category, "seed": seed, "good": good[:shots], "demos": [photos[t][0] for t in shown],
                "types": shown, "names": draw_names(rng, 2, "evaluation"), "queries": queries,
                "good_queries": good[shots : shots + len(queries)],
            }  # fmt: skip
            others = sorted(set(kinds) - set(shown))
            third = str(rng.choice(others)) if others else None
            rows = [int(i) for i in rng.permutation(pools[(category, third)])[:per_type]] if third else []
            sets.append({**chosen, "unshown": [(i, third) for i in rows]})
    if not sets:
        raise NoNamingSets(f"no category has more than {shots} good photos and two defect types with two photos each")
    return sets


def evaluate_naming(model, processor, items, seeds: int = 3, shots: int = 4, per_type: int = 4,
                    threshold: float = 0.5, progress: bool = True, phases: int = 1) -> dict:  # fmt: skip
    """Run `naming_sets` through an `Inspector` (cached support, greedy answers): the metrics and one record per
    query and run. Runs: `named`, `swapped` (the names swapped; its defective queries), `boxed` (the examples with
    their defects' boxes, as a user who marks where the defect is gives them; its defective queries) and
    `good_only` (the good examples alone, scores only); `phases`: the Inspector's (2: each photo judged moved half
    a cell too, as `kensa-vl inspect` does by default)."""
    sets = naming_sets(items, seeds, shots, per_type)
    inspector = Inspector(model, processor, threshold=threshold, max_new_tokens=24, check_examples=False,
                          phases=phases)  # fmt: skip
    records = []
    for chosen in tqdm(sets, desc="naming by example", disable=not progress):
        with shared_searches(model):  # the runs of a set meet the same photos: searched once
            records += _naming_runs(inspector, items, chosen)
    return {"metrics": naming_metrics(records, threshold), "records": records,
            "config": {"seeds": seeds, "shots": shots, "per_type": per_type, "threshold": threshold,
                       "phases": phases}}  # fmt: skip


def _naming_runs(inspector, items, chosen: dict) -> list[dict]:
    """One naming set's records: its runs `named`, `swapped` and `boxed` (greedy answers), then `good_only`."""
    from kensa_vl.train.data import noun

    records = []
    inspector.noun = noun(chosen["category"])
    good = [support_item(items[i]["image"]) for i in chosen["good"]]
    context = {"category": chosen["category"], "seed": chosen["seed"]}
    names = chosen["names"]
    for run, shown in (("named", names), ("swapped", names[::-1]), ("boxed", names)):
        demos = [support_item(items[i]["image"], defective=True, defect_type=n,
                              boxes=items[i]["boxes"] if run == "boxed" else None)
                 for i, n in zip(chosen["demos"], shown, strict=True)]  # fmt: skip
        inspector.set_support(good + demos)
        want = dict(zip(chosen["types"], shown, strict=True))
        for order, (i, kind) in enumerate(chosen["queries"]):
            result = inspector.judge(items[i]["image"])[0]
            record = _record(context, run, order, i, "defective", result)
            records.append({**record, "defect_type": kind, "expected": want[kind], "name": result.defect_type})
        for order, i in enumerate(chosen["good_queries"] if run == "named" else []):
            result = inspector.judge(items[i]["image"])[0]
            records.append(_record(context, run, order, i, "good", result))
        for order, (i, kind) in enumerate(chosen.get("unshown", []) if run == "named" else []):
            result = inspector.judge(items[i]["image"])[0]
            record = _record(context, "unshown", order, i, "defective", result)
            records.append({**record, "defect_type": kind, "expected": None, "name": result.defect_type,
                            "names": list(names)})  # fmt: skip
    inspector.max_new_tokens = 0
    inspector.set_support(good)
    for order, i in enumerate([i for i, _ in chosen["queries"]] + chosen["good_queries"]):
        result = inspector.judge(items[i]["image"])[0]
        label = "defective" if order < len(chosen["queries"]) else "good"
        records.append(_record(context, "good_only", order, i, label, result))
    inspector.max_new_tokens = 24
    return records


def _record(context: dict, run: str, order: int, index: int, label: str, result) -> dict:
    return {**context, "run": run, "query": order, "index": index, "label": label, "verdict": result.verdict,
            "p_defective": result.p_defective, "text": result.text}  # fmt: skip


def _followed(a: dict, b: dict) -> bool:
    """The two runs name the same example, which carries the other name in the second."""
    return a["name"] != b["name"] and {a["name"], b["name"]} == {a["expected"], b["expected"]}


def _balanced_accuracy(records: list[dict], threshold: float) -> float:
    y = np.array([r["label"] == "defective" for r in records])
    return image_metrics(y, np.array([r["p_defective"] for r in records], dtype=float), threshold)["balanced_accuracy"]


def _queries(records: list[dict], run: str, flagged: bool = False) -> list[dict]:
    """`run`'s defective queries; with `flagged`, those judged defective."""
    return [r for r in records if r["run"] == run and r["label"] == "defective"
            and (not flagged or r["verdict"] == "defective")]  # fmt: skip


def _named_in_both(records: list[dict]) -> list[tuple[dict, dict]]:
    """Each defective query of the `named` run with the same query of the `swapped` run, where both answers name
    an example."""
    swapped = {(r["category"], r["seed"], r["query"]): r for r in _queries(records, "swapped")}
    pairs = [(r, swapped[(r["category"], r["seed"], r["query"])]) for r in _queries(records, "named")]
    return [(a, b) for a, b in pairs if a["name"] is not None and b["name"] is not None]


def _naming_rates(records: list[dict], run: str) -> tuple[float, float | None]:
    """The share of `run`'s defective queries named after the example of their type, and among those judged
    defective (None when none is)."""
    named, flagged = _queries(records, run), _queries(records, run, flagged=True)
    rate = float(np.mean([r["name"] == r["expected"] for r in named]))
    return rate, float(np.mean([r["name"] == r["expected"] for r in flagged])) if flagged else None


def naming_metrics(records: list[dict], threshold: float = 0.5) -> dict:
    """The naming rate, its rate among flagged queries (also with the examples boxed, where that run was made), the
    follow rate and the two balanced accuracies."""
    both = _named_in_both(records)
    rate, when_flagged = _naming_rates(records, "named")
    out = {"queries": len(_queries(records, "named")), "naming": rate, "naming_when_flagged": when_flagged}
    if any(r["run"] == "boxed" for r in records):
        out["naming_boxed"], out["naming_boxed_when_flagged"] = _naming_rates(records, "boxed")
    unshown = [r for r in records if r["run"] == "unshown" and r["verdict"] == "defective"]
    out["unshown_queries"] = sum(r["run"] == "unshown" for r in records)
    out["unshown_named"] = float(np.mean([r["name"] in r["names"] for r in unshown])) if unshown else None
    return {
        **out,
        "follow_rate": float(np.mean([_followed(a, b) for a, b in both])) if both else None,
        "named_in_both_runs": len(both),
        "balanced_accuracy_with_defective": _balanced_accuracy([r for r in records if r["run"] == "named"], threshold),
        "balanced_accuracy_good_only": _balanced_accuracy([r for r in records if r["run"] == "good_only"], threshold),
        "intervals": naming_intervals(records, threshold),
    }


def naming_intervals(records: list[dict], threshold: float = 0.5, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, list[float]]:  # fmt: skip
    """A `level` percentile interval of each rate of `naming_metrics`, from resampling the query photos with
    replacement: a photo is drawn with all its records (runs and seeds), so a photo met under three seeds counts
    once, not three times. The intervals say how far the rates would move on other photos of the same categories,
    not on other categories."""

    def photo(r: dict) -> tuple:
        return r["category"], r.get("index", -1)

    photos = sorted({photo(r) for r in records})
    if not photos:
        return {}
    at = {p: i for i, p in enumerate(photos)}
    counts = np.random.default_rng(seed).multinomial(len(photos), np.full(len(photos), 1 / len(photos)), resamples)

    def rate(pairs) -> np.ndarray:  # (record, right) pairs -> the rate in each resample, (resamples,)
        right, seen = np.zeros(len(photos)), np.zeros(len(photos))
        for r, ok in pairs:
            seen[at[photo(r)]] += 1
            right[at[photo(r)]] += ok
        with np.errstate(invalid="ignore", divide="ignore"):
            return counts @ right / (counts @ seen)

    def naming(run: str, flagged: bool) -> np.ndarray:
        return rate((r, r["name"] == r["expected"]) for r in _queries(records, run, flagged))

    def balanced(run: str) -> np.ndarray:
        rows = [r for r in records if r["run"] == run]
        right = [(r, (r["p_defective"] >= threshold) == (r["label"] == "defective")) for r in rows]
        defective = rate(h for h in right if h[0]["label"] == "defective")
        return (defective + rate(h for h in right if h[0]["label"] != "defective")) / 2

    draws = {
        "naming": naming("named", False), "naming_when_flagged": naming("named", True),
        "follow_rate": rate((a, _followed(a, b)) for a, b in _named_in_both(records)),
        "balanced_accuracy_with_defective": balanced("named"), "balanced_accuracy_good_only": balanced("good_only"),
    }  # fmt: skip
    if any(r["run"] == "boxed" for r in records):
        draws["naming_boxed"], draws["naming_boxed_when_flagged"] = naming("boxed", False), naming("boxed", True)
    tail = (1 - level) / 2 * 100
    return {k: [float(x) for x in np.nanpercentile(v, [tail, 100 - tail])] for k, v in draws.items()
            if np.isfinite(v).any()}  # fmt: skip


def naming_table(result: dict) -> str:
    """The metrics as a markdown table, with their intervals where `naming_intervals` gave them."""
    m = result["metrics"]
    rows = {
        "naming by example": "naming",
        "naming (queries judged defective)": "naming_when_flagged",
        "naming, the examples boxed": "naming_boxed",
        "naming, the examples boxed (queries judged defective)": "naming_boxed_when_flagged",
        "label-permutation follow rate": "follow_rate",
        "a type no example shows, named after an example (judged defective; lower is better)": "unshown_named",
        "balanced accuracy, good examples only": "balanced_accuracy_good_only",
        "balanced accuracy, with the 2 defective examples": "balanced_accuracy_with_defective",
    }
    intervals = m.get("intervals", {})
    lines = ["| measure | value | 95% interval |", "|---|---|---|"]
    for label, key in rows.items():
        value, interval = m.get(key), intervals.get(key)
        shown = "" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
        lines.append(f"| {label} | {'n/a' if value is None else f'{value:.3f}'} | {shown} |")
    unshown = f", {m['unshown_queries']} of a type no example shows" if m.get("unshown_queries") else ""
    counts = f"{m['queries']} defective queries{unshown}, {m['named_in_both_runs']} named in both runs"
    note = (" Intervals: the query photos resampled with replacement, each with all its runs and seeds"
            " (`naming_intervals`); they do not cover other categories.") if intervals else ""  # fmt: skip
    return "\n".join(lines) + f"\n\n{counts}.{note}\n"


def write_naming(result: dict, out) -> None:
    """`naming.json` (metrics and config), `naming_records.jsonl` and `naming.md` in folder `out`."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "naming.json").write_text(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in result["records"]]
    (out / "naming_records.jsonl").write_text("".join(lines))
    (out / "naming.md").write_text(naming_table(result))
