"""Inspection API (support caching, inputs) and the evaluator's metrics and episodes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kensa_vl.eval.evaluate import aggregate, evaluate, support_for
from kensa_vl.eval.inspector import Inspector, Judgement, support_item
from kensa_vl.eval.metrics import ap50, metrics
from kensa_vl.modeling.demos_kensa_vl import prompt_labels
from tests.conftest import random_image


@pytest.fixture(scope="module")
def synth(synth_dir):
    from kensa_vl.train.data.synth import load_synth

    return load_synth(synth_dir)[0]


def _support(test):
    good = [i for i, label in enumerate(test["label"]) if label == "good"][:2]
    bad = [i for i, label in enumerate(test["label"]) if label == "defective"][:1]
    return [test[i] for i in good + bad]


def test_cached_support_gives_the_same_results_as_recomputing(tiny, synth):
    model, processor = tiny
    test = synth["test"]
    queries = [test[i]["image"] for i in (5, 6, 7)]
    results = {}
    for cache in (True, False):
        inspector = Inspector(model, processor, noun="nut", cache=cache, threshold=0.0, max_new_tokens=6)
        inspector.set_support(_support(test))
        results[cache] = inspector.judge(queries)
    cached, fresh = results[True], results[False]
    assert [r.p_defective for r in cached] == pytest.approx([r.p_defective for r in fresh], abs=1e-5)
    assert [r.text for r in cached] == [r.text for r in fresh]
    assert all(r.verdict == "defective" and r.text.startswith("defective") for r in cached)  # threshold 0
    # judging (scores, generation, a batch) leaves the shared cache as it was: same length, same keys and values
    inspector = Inspector(model, processor, noun="nut", threshold=0.0, max_new_tokens=0)
    inspector.set_support(_support(test))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in inspector._cache.layers]
    first, second = inspector.judge([queries[0], queries[0]])
    inspector.judge(queries, batch_size=2)
    inspector.max_new_tokens = 6
    assert inspector.judge(queries[0])[0].text == cached[0].text
    assert first.p_defective == pytest.approx(second.p_defective, abs=1e-6)
    assert first.p_defective == pytest.approx(cached[0].p_defective, abs=1e-5)
    for (keys, values), layer in zip(before, inspector._cache.layers, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_support_tiles_are_a_separate_budget(tiny, synth):
    model, processor = tiny
    inspector = Inspector(model, processor, support_max_tiles=1, max_new_tokens=0)
    inspector.set_support(_support(synth["test"]))
    assert inspector._prefix["image_grid"][:, 2].tolist() == [1, 1, 1]  # one tile per support image
    assert 0.0 <= inspector.judge(synth["test"][9]["image"])[0].p_defective <= 1.0


def test_bad_inspection_input_is_named(tiny):
    model, processor = tiny
    inspector = Inspector(model, processor)
    with pytest.raises(ValueError, match="set_support"):
        inspector.judge(random_image(64, 64))
    with pytest.raises(ValueError, match=r"box \[0, 0, 90, 10\] .* 64x48"):
        support_item(random_image(64, 48), defective=True, boxes=[[0, 0, 90, 10]])
    with pytest.raises(ValueError, match="good support image takes no description"):
        support_item(random_image(64, 48), description="scratch")
    with pytest.raises(ValueError, match="Expected a PIL image, numpy array, tensor or path, got int"):
        inspector.set_support([])
        inspector.judge([42])
    item = support_item(random_image(90, 90), defective=True, boxes=[[60, 0, 90, 20]], description="a dent")
    assert item["position"] == "top right" and item["defect_type"] == "a dent"  # the user's words name it


def _record(label, p, seed=0, boxes=(), true_boxes=(), defect=None, size=None, category="a"):
    return dict(
        seed=seed,
        category=category,
        label=label,
        defect_type=defect,
        size=size,
        p_defective=p,
        boxes=[list(b) for b in boxes],
        true_boxes=[list(b) for b in true_boxes],
    )


def test_verdict_metrics_by_hand():
    records = [
        _record("good", 0.1),
        _record("good", 0.6),
        _record("good", 0.2),
        _record("good", 0.3),
        _record("defective", 0.9),
        _record("defective", 0.4),
        _record("defective", 0.7),
        _record("defective", 0.8),
    ]
    m = metrics(records)
    assert m["overkill"] == 0.25 and m["miss"] == 0.25 and m["balanced_accuracy"] == 0.75
    assert m["yes_ratio_good"] == 0.25 and m["yes_ratio_defective"] == 0.75
    # AUROC: of 16 (defective, good) pairs the defective one scores higher in 15 (0.4 < 0.6 is the exception)
    assert m["auroc"] == pytest.approx(15 / 16)
    perfect = metrics([_record("good", 0.0), _record("defective", 1.0)])
    assert perfect["ece"] == pytest.approx(0.0) and perfect["balanced_accuracy"] == 1.0


def test_box_metrics_by_hand():
    hit = _record("defective", 0.9, boxes=[[0, 0, 10, 10]], true_boxes=[[0, 0, 10, 12]])  # IoU 100/120
    wrong = _record("defective", 0.8, boxes=[[50, 50, 60, 60]], true_boxes=[[0, 0, 10, 10]])
    missed = _record("defective", 0.3, boxes=[], true_boxes=[[5, 5, 9, 9]])
    assert metrics([hit, wrong, missed])["box_hit_rate"] == pytest.approx(1 / 3)
    # on the defects that cover at least 1% of the image only: the hit and the wrong box
    sized = [dict(hit, area=0.02), dict(wrong, area=0.01), dict(missed, area=0.005)]
    assert metrics(sized)["box_hit_rate_1pct"] == pytest.approx(1 / 2)
    assert "box_hit_rate_1pct" not in metrics([hit, wrong, missed])  # no areas known: not reported
    # ranked: hit (p=.9) then a false positive: precision 1 at recall 1/3, so AP50 = 1/3
    assert ap50([hit, wrong, missed]) == pytest.approx(1 / 3)
    assert ap50([wrong, hit]) == pytest.approx(0.5)  # ranked by score, not by order: hit (.9) first
    assert ap50([dict(hit, p_defective=0.1), wrong]) == pytest.approx(0.5 * 0.5)  # a false positive first


def test_aggregate_is_mean_and_std_over_seeds_and_groups_defects():
    records = [
        _record("good", 0.1, seed=0),
        _record("defective", 0.9, seed=0, defect="crack", size="large"),
        _record("good", 0.9, seed=1),
        _record("defective", 0.9, seed=1, defect="crack", size="large"),
        _record("defective", 0.1, seed=1, defect="stain", size="tiny"),
    ]
    out = aggregate(records)
    assert out["overall"]["balanced_accuracy"]["mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["overall"]["balanced_accuracy"]["std"] == pytest.approx(0.375)
    assert out["per_defect"]["stain"]["n"] == 2  # its one query plus the good query of its seed
    assert set(out["per_size"]) == {"large", "tiny"}


def test_support_sets_are_fixed_per_seed_and_never_queried(synth):
    test = synth["test"]
    rows = {}
    for i, (category, label) in enumerate(zip(test["category"], test["label"], strict=True)):
        rows.setdefault(category, {"good": [], "defective": []})[label].append(i)
    category = sorted(rows)[0]
    assert support_for(rows, category, 2, 1, seed=0) == support_for(rows, category, 2, 1, seed=0)
    assert support_for(rows, category, 2, 0, seed=0) != support_for(rows, category, 2, 0, seed=1)
    good, _ = support_for(rows, category, 2, 0, seed=0, control="other_category")
    assert all(test[i]["category"] != category for i in good)
    with pytest.raises(ValueError, match=r"has \d+ good photos and \d+ defective photos; a support of 999 good"):
        support_for(rows, category, 999, 0, seed=0)


def test_each_seed_queries_its_own_photos_the_same_for_every_k():
    """`queries_per_category` photos per seed, half good and half defective, never from the support: each seed draws
    its own (more distinct photos across seeds than the first ones of each label), every k the same bar the support."""
    from kensa_vl.eval.evaluate import queries_for

    rows = {"good": list(range(40)), "defective": list(range(40, 80))}
    draws = [queries_for(rows, "nut", {0, 1, 40}, 8, seed) for seed in range(5)]
    assert all(len(q) == 8 and sum(j >= 40 for j in q) == 4 and not {0, 1, 40} & set(q) for q in draws)
    assert len({j for q in draws for j in q if j >= 40}) > 8  # the first-photos rule queried 41-44 only
    assert queries_for(rows, "nut", {0, 1, 40}, 8, 0) == draws[0]
    wider = queries_for(rows, "nut", {0, 1, 2, 3, 40}, 8, 0)  # a larger support (k = 4) on the same seed
    assert len(set(wider) & set(draws[0])) >= 6
    assert queries_for(rows, "nut", {0, 40}, None, 3) == [*range(1, 40), *range(41, 80)]
    with pytest.raises(ValueError, match="at least 2, got 1"):
        queries_for(rows, "nut", set(), 1, 0)  # half of one photo is none: nothing would be queried


def test_evaluate_reports_shots_and_controls(tiny, synth):
    model, processor = tiny
    out = evaluate(
        model,
        processor,
        synth["test"],
        shots=(0, 1),
        seeds=2,
        queries_per_category=2,
        controls=("noise", "shuffled_labels"),
        control_shots=1,
        generate=False,
        progress=False,
    )
    assert set(out["shots"]) == {0, 1} and set(out["controls"]) == {"noise", "shuffled_labels"}
    categories = sorted(set(synth["test"]["category"]))
    assert set(out["shots"][1]["per_category"]) == set(categories)
    assert out["shots"][0]["overall"]["n"] == 2 * 2 * len(categories)  # seeds x queries x categories
    support = {(r["seed"], r["category"]) for r in out["records"] if r["shots"] == 1}
    assert len(support) == 2 * len(categories)


def test_the_other_category_control_counts_the_queries_called_unlike_the_examples(tiny_comparison, synth):
    """Under the other-category control each query is checked against the (other product's) examples, as a user's
    Inspector checks it; the share called unlike is reported. The other runs are not checked."""
    from kensa_vl.eval.report import unlike_line

    model, processor = tiny_comparison
    out = evaluate(model, processor, synth["test"], shots=(4,), seeds=1, queries_per_category=4,
                   controls=("other_category",), control_shots=4, generate=False, progress=False)  # fmt: skip
    checked = [r for r in out["records"] if r["control"] == "other_category"]
    assert checked and all("unlike" in r for r in checked)
    assert not any("unlike" in r for r in out["records"] if r["control"] is None)
    share = out["controls"]["other_category"]["overall"]["unlike_share"]["mean"]
    assert share == np.mean([r["unlike"] is not None for r in checked]) > 0.5, share
    assert "unlike_share" not in out["shots"][4]["overall"]
    assert unlike_line({"kensa": out}).startswith(f"Other-category control: {share:.2f} of the queries were called")


def test_a_cached_support_sets_lists_serve_every_query(tiny_comparison, synth, monkeypatch):
    from kensa_vl.modeling import search_kensa_vl

    model, processor = tiny_comparison
    test = synth["test"]
    queries = [test[i]["image"] for i in (5, 6, 7)]
    exact = Inspector(model, processor, max_new_tokens=0)
    exact.set_support(_support(test))
    expected = [j.heatmap for j in exact.judge(queries)]
    builds, build = [], search_kensa_vl.InvertedLists.build
    monkeypatch.setattr(search_kensa_vl.InvertedLists, "build", lambda bank: builds.append(1) or build(bank))
    monkeypatch.setattr(model.config, "exact_search_cells", 1000)  # every bank is large: search approximately
    approximate = Inspector(model, processor, max_new_tokens=0)
    approximate.set_support(_support(test))
    builds.clear()  # (the supports' own comparisons, each against a new bank, build theirs)
    got = [j.heatmap for j in approximate.judge(queries)]
    assert builds == [1]  # the cached set's lists, built for the first query, serve the next two
    for a, b in zip(got, expected, strict=True):
        assert (a >= b - 1e-4).all()  # a missed neighbour only makes a cell look farther


@pytest.fixture(scope="module")
def tiny_comparison():
    import torch

    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.model.reference_comparison.embed[-1].weight, std=0.5)  # as if trained
    return model, processor


def test_support_bank_equals_the_prompts_own_and_serves_a_smaller_support_budget(tiny_comparison, synth):
    model, processor = tiny_comparison
    test = synth["test"]
    full = Inspector(model, processor, max_new_tokens=0)
    full.set_support(_support(test))
    prefix = full._prefix
    config, tiles = model.config, prefix["image_grid"][:, 2].tolist()
    labels = prompt_labels(prefix["input_ids"][0].tolist(), tiles, config.tokens_per_tile, config)
    assert [role for role, *_ in labels] == ["good", "good", "defective"]
    defective = _support(test)[2]
    written = processor.boxes_to_text(defective["boxes"][:1], *defective["image"].size)
    np.testing.assert_allclose(labels[2][2], processor.text_to_boxes(written, 1, 1)[0])  # its first box, read back
    bank = model.model.support_bank(prefix["pixel_values"], prefix["image_grid"], labels)
    torch.testing.assert_close(bank.cells["dct"], full._bank.cells["dct"])  # every good tile, every view, in order
    torch.testing.assert_close(bank.scores, full._bank.scores)  # each good support against those before it
    assert [d.name for d in bank.demos] == [d.name for d in full._bank.demos] and len(bank.demos) == 1
    torch.testing.assert_close(bank.demos[0].defect, full._bank.demos[0].defect)  # the defective one's defect
    # the language model reads each support at one tile; the comparison still sees every tile of them
    small = Inspector(model, processor, max_new_tokens=0, support_max_tiles=1)
    small.set_support(_support(test))
    assert small._prefix["pixel_values"].shape[0] == len(_support(test)) < prefix["pixel_values"].shape[0]
    torch.testing.assert_close(small._bank.cells["dct"], full._bank.cells["dct"])
    query = test[5]["image"]
    a, b = full.judge(query)[0], small.judge(query)[0]
    np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-5)  # the same comparison ...
    assert small._prefix["input_ids"].shape[1] < full._prefix["input_ids"].shape[1]  # ... for fewer tokens
    assert a.boxes == b.boxes


def test_a_cached_query_is_tokenised_once_per_tile_grid(tiny_comparison, synth, monkeypatch):
    model, processor = tiny_comparison
    test = synth["test"]
    inspector = Inspector(model, processor, max_new_tokens=0)
    inspector.set_support(_support(test))
    queries = [test[i]["image"] for i in (5, 6, 7)] + [test[5]["image"].resize((300, 120))]
    calls, encode = [], inspector._encode
    monkeypatch.setattr(inspector, "_encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    got = [j.p_defective for j in inspector.judge(queries)]
    assert len(calls) == 2  # one grid for the three square photos, another for the wide one
    recomputed = Inspector(model, processor, max_new_tokens=0, cache=False)
    recomputed.set_support(_support(test))
    np.testing.assert_allclose(got, [j.p_defective for j in recomputed.judge(queries)], atol=1e-5)


def test_a_large_support_bank_builds_its_lists_once_for_its_own_scores_and_every_query(
    tiny_comparison, synth, monkeypatch
):
    """Above the exact search's size, `support_bank` builds the lists over the whole set once, scores each support
    against its predecessors in them (`InvertedLists.head`), and the queries search the same lists."""
    from kensa_vl.modeling import search_kensa_vl

    model, processor = tiny_comparison
    test = synth["test"]
    exact = Inspector(model, processor, max_new_tokens=0, support_max_tiles=1)
    exact.set_support(_support(test))
    queries = [test[i]["image"] for i in (5, 6)]
    expected = [j.heatmap for j in exact.judge(queries)]
    builds, build = [], search_kensa_vl.InvertedLists.build
    monkeypatch.setattr(search_kensa_vl.InvertedLists, "build", lambda bank: builds.append(len(bank)) or build(bank))
    monkeypatch.setattr(model.config, "exact_search_cells", 1000)  # every bank is large: search approximately
    approximate = Inspector(model, processor, max_new_tokens=0, support_max_tiles=1)
    approximate.set_support(_support(test))
    got = [j.heatmap for j in approximate.judge(queries)]
    assert builds == [len(approximate._bank.cells["dct"])]  # once, over every support: nothing built per search
    assert approximate._bank.scores.shape == exact._bank.scores.shape
    assert (approximate._bank.scores >= exact._bank.scores - 1e-4).all()  # a missed neighbour: farther, never nearer
    for a, b in zip(got, expected, strict=True):
        assert (a >= b - 1e-4).all()
    assert np.mean([np.abs(a - b).mean() for a, b in zip(got, expected, strict=True)]) < 0.05  # mostly found


def _cached_and_recomputed(model, processor, test, queries):
    """P(defective) of `queries` against `_support(test)`, cached (True) and recomputed (False), checked equal; and
    the recomputing inspector."""
    scores = {}
    for cache in (True, False):
        inspector = Inspector(model, processor, cache=cache, max_new_tokens=0)
        inspector.set_support(_support(test))
        scores[cache] = [r.p_defective for r in inspector.judge(queries)]
    assert scores[True] == pytest.approx(scores[False], abs=1e-5)
    return scores, inspector


def test_a_coreset_bank_keeps_a_share_of_each_support_cached_and_recomputed_alike(tiny_comparison, synth, monkeypatch):
    import math

    model, processor = tiny_comparison
    monkeypatch.setattr(model.config, "reference_views", ["hflip", "rot90"])
    test = synth["test"]
    queries = [test[i]["image"] for i in (5, 6)]
    exact = Inspector(model, processor, max_new_tokens=0)
    exact.set_support(_support(test))
    monkeypatch.setattr(model.config, "reference_coreset", 0.25)
    scores, inspector = _cached_and_recomputed(model, processor, test, queries)
    tiles = inspector._prefix["image_grid"][:2, 2].tolist()  # the two good supports; the defective one is no reference
    per_image = [3 * n * 16 * 16 for n in tiles]  # each tile's 7 px DCT cells, in itself and two views
    bank = inspector._bank.cells["dct"]
    assert len(bank) == sum(math.ceil(0.25 * n) for n in per_image) < len(exact._bank.cells["dct"])
    full = exact._bank.cells["dct"]
    assert torch.equal(full[(bank @ full.T).argmax(-1)], bank)  # cells of the full bank, not new ones
    exact_scores = [r.p_defective for r in exact.judge(queries)]
    assert scores[True] != pytest.approx(exact_scores, abs=1e-6)  # the setting is read


@pytest.mark.parametrize("views", [[], ["hflip", "rot90"]])
def test_reference_comparison_is_cached_with_the_support(tiny_comparison, synth, monkeypatch, views):
    model, processor = tiny_comparison
    monkeypatch.setattr(model.config, "reference_views", views)
    test = synth["test"]
    queries = [test[i]["image"] for i in (5, 6)]
    scores, inspector = _cached_and_recomputed(model, processor, test, queries)
    good_tiles = int(inspector._prefix["image_grid"][:2, 2].sum())  # the defective third is not a reference
    cells = good_tiles * 16 * 16  # 7 px DCT cells of 112 px tiles
    assert inspector._bank.cells["dct"].shape[0] == (1 + len(views)) * cells  # the views are cached too
    # the supports are encoded once: their bank comes from the forward pass, equal to encoding them again
    calls, encode = [], model.model.reference_cells
    spy = lambda *args, **kwargs: calls.append(len(args) + len(kwargs)) or encode(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(model.model, "reference_cells", spy)
    # the examples' check (`support_check`) encodes them on its own; the comparison's path is what is tested here
    inspector = Inspector(model, processor, max_new_tokens=0, check_examples=False)
    inspector.set_support(_support(test))
    assert calls and all(n == 2 for n in calls)  # always handed the features already encoded
    again = encode(inspector._prefix["pixel_values"])
    # the same cells; the forward pass keeps them image by image (each image in every view), which the nearest-cell
    # search does not see
    again = again["dct"].view(1 + len(views), -1, 16 * 16, 42)  # (views, tiles, cells, channels)
    images = again.split(inspector._prefix["image_grid"][:, 2].tolist(), dim=1)[:2]  # the two good supports
    torch.testing.assert_close(inspector._bank.cells["dct"], torch.cat([image.reshape(-1, 42) for image in images]))
    if views:
        return
    # the good supports' own scores (the second against the first) are cached too, and the query's summary reads them
    assert len(inspector._bank.scores) == 1
    inspector._bank.scores += 10.0
    assert inspector.judge(queries[0])[0].p_defective != pytest.approx(scores[True][0], abs=1e-6)
    # and it matters: the same query against other references scores differently
    inspector.set_support(_support(test)[:1])
    assert inspector.judge(queries[0])[0].p_defective != pytest.approx(scores[False][0], abs=1e-4)


def test_batched_judging_equals_one_by_one(tiny_comparison, synth, tmp_path):
    """Queries of one prompt length share a forward pass; other sizes and unreadable files keep their places."""
    from tests.conftest import random_image

    model, processor = tiny_comparison
    test = synth["test"]
    queries = [test[i]["image"] for i in range(5, 10)]
    queries[2:2] = [random_image(300, 150), str(tmp_path / "missing.png")]  # another tile grid, an unreadable file
    inspector = Inspector(model, processor, max_new_tokens=0)
    inspector.set_support(_support(test))
    one = inspector.judge(queries)
    sizes, judge_batch = [], inspector._judge_batch
    inspector._judge_batch = lambda inputs, *rest: sizes.append(len(inputs)) or judge_batch(inputs, *rest)
    batched = inspector.judge(queries, batch_size=3)
    assert sorted(sizes) == [1, 2, 3]  # five photos of one size in batches of 3 and 2, the odd one alone
    assert [r.verdict for r in batched] == [r.verdict for r in one]
    assert batched[3].verdict == "error" and "missing.png" in batched[3].text
    good = [i for i, r in enumerate(one) if r.verdict != "error"]
    assert [batched[i].p_defective for i in good] == pytest.approx([one[i].p_defective for i in good], abs=1e-5)
    assert [batched[i].boxes for i in good] == [one[i].boxes for i in good]
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        inspector.judge(queries, batch_size=0)


def test_reference_comparison_only_touches_images_with_references(tiny_comparison, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from kensa_vl.train.build import save_kensa

    model, processor = tiny_comparison
    images = [random_image(224, 224, s) for s in (1, 2)]
    one = processor(text="<image> a", images=images[:1], return_tensors="pt")
    two = processor(text="<image> <image> a", images=images, return_tensors="pt")
    with torch.no_grad():
        base = model.model.get_image_features(two["pixel_values"]).pooler_output
        compared = model.model.reference_comparison.compare_prompt(
            base,
            model.model.image_grids(two["pixel_values"]),
            two["input_ids"],
            two["image_grid"],
            two["pixel_values"],
            model.model.reference_cells,
        )
        out, anomaly = base + compared.token_embeddings, compared.anomaly_map
        scores, nearest = compared.image_scores, compared.distances
        n = int(one["image_grid"][0, 2])
        assert torch.equal(out[:n], base[:n]) and not torch.allclose(out[n:], base[n:])  # only the second image
        assert anomaly[:n].isnan().all() and not anomaly[n:].isnan().any()
        # and the second image's summary goes onto its closing tag, the token right after its last visual token
        (summary,) = compared.summaries
        closing = processor.tokenizer.convert_ids_to_tokens(int(two["input_ids"][0, summary.start]))
        assert summary.row == 0 and closing == "</img>"
        assert summary.embedding.abs().sum() > 0
        assert scores[0].isnan().all() and (scores[1] > -10).all()  # the second image's kNN scores (log-distances)
        # its distances to the first image's cells, one map per compared encoder, handed back only when asked
        tiles = int(two["image_grid"][1, 2])
        assert nearest[0] is None and len(nearest[1]) == len(model.config.reference_encoder_names())
        assert all(d.shape[0] == tiles and d.min() >= 0 for d in nearest[1])
        assert model(**two).reference_distances is None
        returned = model(**two, return_reference_distances=True).reference_distances
        assert returned[0] is None and all(torch.equal(a, b) for a, b in zip(returned[1], nearest[1], strict=True))
        # the bank a later query compares with: both images' cells in every reference view, as `reference_cells`
        # gives them, with the images' scores, handed back only when asked (the inspector's support set, encoded once)
        assert compared.banks is None and model(**two).reference_bank is None
        (bank,) = model(**two, return_reference_bank=True).reference_bank
        expected = model.model.reference_cells(two["pixel_values"])
        views = 1 + len(model.config.reference_views)
        assert set(bank.cells) == set(expected) and torch.equal(bank.scores, scores[1:])
        for name, cells in expected.items():
            per_tile = model.model.image_grids(two["pixel_values"][:1], [name])[name].shape[1:3].numel()  # own grid
            assert len(cells) == views * len(two["pixel_values"]) * per_tile
            torch.testing.assert_close(bank.cells[name], cells)
        assert model(**one).anomaly_map.isnan().all()  # no references: no map
        logits = model(**one).logits
    save_kensa(model, processor, tmp_path)
    loaded, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path, trust_remote_code=True, output_loading_info=True
    )
    assert loaded.config.reference_comparison and not any(info.values())
    with torch.no_grad():
        assert torch.allclose(loaded(**one).logits, logits, atol=1e-5)


def test_inspect_and_eval_commands(tiny_dir, synth_dir, tmp_path, capsys):
    import json

    from kensa_vl.train.cli import main

    test = __import__("kensa_vl.train.data.synth", fromlist=["load_synth"]).load_synth(synth_dir)[0]["test"]
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        test[i]["image"].save(paths[-1])
    main(["inspect", "--model", str(tiny_dir), "--good", str(paths[0]), str(paths[1]),
          "--defective", f"{paths[2]}=a dark scratch", "--query", str(paths[3]), str(paths[0]),
          "--threshold", "0", "--out", str(tmp_path / "r.json"), "--viz", str(tmp_path / "viz")])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[str(paths[3]), "defective"], [str(paths[0]), "defective"]]
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["file"] for r in results] == [str(paths[3]), str(paths[0])] and 0 <= results[0]["p_defective"] <= 1
    assert (tmp_path / "viz" / "3.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--model", str(tiny_dir), "--query", str(tmp_path / "missing.png"), str(paths[0]),
              "--out", str(tmp_path / "partial.json")])  # fmt: skip
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "1 of 2 queries could not be read" in captured.err
    missing, judged = captured.out.strip().splitlines()
    assert missing.startswith(f"{tmp_path / 'missing.png'}\terror\tCould not read image")
    assert judged.split("\t")[0] == str(paths[0]) and judged.split("\t")[1] in ("good", "defective")
    partial = json.loads((tmp_path / "partial.json").read_text())
    assert partial[0]["verdict"] == "error" and partial[0]["p_defective"] is None and partial[1]["verdict"] != "error"
    with pytest.raises(SystemExit) as exit_info:  # only defective examples
        main(["inspect", "--model", str(tiny_dir), "--defective", str(paths[2]), "--query", str(paths[0])])
    assert exit_info.value.code == 2 and "no good one" in capsys.readouterr().err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--model", str(tmp_path / "llama"), "--good", str(paths[0]), "--query", str(paths[0])])
    assert exit_info.value.code == 2 and "not a KensaVL" in capsys.readouterr().err

    main(["eval", "--model", str(tiny_dir), "--data", str(synth_dir), "--shots", "0,2", "--seeds", "1",
          "--queries-per-category", "2", "--out", str(tmp_path / "eval")])  # fmt: skip
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| KensaVL | 0 |" in table and "| kNN patch memory (PatchCore-style) | 2 |" in table
    assert (tmp_path / "eval" / "accuracy_vs_shots.png").exists()
    per = json.loads((tmp_path / "eval" / "metrics.json").read_text())["kensa"]["shots"]["2"]["per_defect"]
    kind, found = sorted(per)[0], per[sorted(per)[0]]  # recall by kind: 1 - miss, then the AUROC
    assert f"| KensaVL | {1 - found['miss']['mean']:.2f} ({found['auroc']['mean']:.2f}) |" in table
    assert f"at k = 2:\n\n| method | {kind} |" in table


def test_boxes_of_any_width_are_drawn(tmp_path):
    """A predicted box one location bin wide (x0 == x1) is a line, not a crash at the end of a run."""
    from kensa_vl.eval.plots import draw_judgement, example_grid

    image = random_image(64, 48)
    drawn = draw_judgement(image, [[10, 10, 10, 20], [5, 5, 30, 30]], "defective")
    assert drawn.size == (64, 48) and drawn.getpixel((5, 5)) == (255, 40, 40) and drawn.getpixel((10, 15))[0] == 255
    items = [{"image": image}]
    records = [
        {"index": 0, "label": "defective", "p_defective": 0.9, "boxes": [[3, 3, 3, 9]], "true_boxes": [[1, 1, 8, 8]]},
        {"index": 0, "label": "good", "p_defective": 0.1, "boxes": [], "true_boxes": []},
    ]
    path = example_grid(items, records, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_truncated_query_is_an_error_record_and_the_others_are_judged(tiny, tmp_path):
    """A PNG cut short opens (its header is whole) and fails only when decoded: that is still the query's error."""
    model, processor = tiny
    whole, cut = tmp_path / "whole.png", tmp_path / "cut.png"
    random_image(120, 90, 4).save(whole)
    cut.write_bytes(whole.read_bytes()[:2000])
    inspector = Inspector(model, processor, max_new_tokens=0)
    inspector.set_support([support_item(random_image(120, 90, 5))])
    judged = inspector.judge([str(whole), str(cut)])
    assert judged[0].verdict in ("good", "defective")
    assert judged[1].verdict == "error" and "truncated" in judged[1].text and "cut.png" in judged[1].text


@pytest.mark.parametrize("tiles", [0, -2, 1.5])
def test_a_tile_budget_below_one_is_refused(tiny, tiles):
    model, processor = tiny
    expected = f"support_max_tiles must be a whole number of tiles >= 1 or None, got {tiles}$"
    with pytest.raises(ValueError, match=expected):
        Inspector(model, processor, support_max_tiles=tiles)
    with pytest.raises(ValueError, match="query_max_tiles must be"):
        Inspector(model, processor, query_max_tiles=tiles)


def test_a_scoring_evaluation_batches_its_queries_and_keeps_their_order(tiny_comparison, synth, monkeypatch):
    from kensa_vl.eval import evaluate as evaluate_module

    model, processor = tiny_comparison
    run = dict(shots=(2,), seeds=1, queries_per_category=4, controls=(), generate=False, progress=False, resamples=0)
    monkeypatch.setattr(evaluate_module, "SCORING_BATCH", 1)
    alone = evaluate(model, processor, synth["test"], **run)["records"]
    batches, batch = [], Inspector._judge_batch
    monkeypatch.setattr(Inspector, "_judge_batch", lambda self, inputs, *rest: batches.append(len(inputs))
                        or batch(self, inputs, *rest))  # fmt: skip
    monkeypatch.setattr(evaluate_module, "SCORING_BATCH", 8)
    together = evaluate(model, processor, synth["test"], **run)["records"]
    assert max(batches) > 1 and sum(batches) == len(together) == len(alone)  # every query scored in a batch
    for a, b in zip(alone, together, strict=True):
        assert (a["index"], a["query"], a["verdict"], a["boxes"]) == (b["index"], b["query"], b["verdict"], b["boxes"])
        assert abs(a["p_defective"] - b["p_defective"]) < 1e-4


def test_the_baseline_reads_the_models_searches_of_the_same_queries_and_supports(tiny_comparison, synth):
    """`shared_searches`: the model judges first, then the kNN baseline on the same support sets and queries finds
    their exact searches kept (its own leave-one-out searches are new) and gives the same records as searching."""
    from kensa_vl.eval.model_folder import shared_searches

    model, processor = tiny_comparison
    run = dict(shots=(2,), seeds=1, queries_per_category=4, controls=(), generate=False, progress=False, resamples=0)
    alone = evaluate(model, processor, synth["test"], method="patchcore", **run)["records"]
    with shared_searches(model) as memo:
        evaluate(model, processor, synth["test"], **run)
        searched = memo.misses
        assert searched > 0 and memo.hits == 0
        kept = evaluate(model, processor, synth["test"], method="patchcore", **run)["records"]
    assert memo.hits >= len(kept) * len(model.config.reference_encoder_names())  # every query's every encoder
    for a, b in zip(alone, kept, strict=True):
        assert (a["index"], a["p_defective"], a["boxes"]) == (b["index"], b["p_defective"], b["boxes"])


@pytest.mark.parametrize("task", ["naming", "grading"])
def test_the_runs_of_one_set_read_each_others_searches(task, tiny_comparison, synth, synth_dir, monkeypatch):
    """The runs of one naming or grading set show the same photos under other names (swapped, rotated, boxed, good
    examples alone): the later runs find the first's exact searches kept (`shared_searches`, one memo per set) and
    give the same records as searching again."""
    import contextlib

    from kensa_vl.eval import grading, model_folder, naming
    from kensa_vl.train.data import load_grading

    model, processor = tiny_comparison
    if task == "naming":
        run, items, module = naming.evaluate_naming, synth["test"], naming
    else:
        items = load_grading(synth_dir)[0]["test"]
        items = items.select([i for i, a in enumerate(items["attribute"]) if a == "shade"])
        run, module = grading.evaluate_grading, model_folder  # grading imports it when it runs
    memos, shared = [], model_folder.shared_searches

    @contextlib.contextmanager
    def counted(model):
        with shared(model) as memo:
            yield memo
        memos.append(memo)

    monkeypatch.setattr(module, "shared_searches", counted)
    kept = run(model, processor, items, seeds=1, progress=False)["records"]
    monkeypatch.setattr(module, "shared_searches", lambda model: contextlib.nullcontext())
    searched = run(model, processor, items, seeds=1, progress=False)["records"]
    assert memos and all(memo.hits >= memo.misses > 0 for memo in memos)  # each later run finds every search
    keys = ("run", "index", "p_defective", "text", "predicted", "probs")
    assert [[r.get(k) for k in keys] for r in kept] == [[r.get(k) for k in keys] for r in searched]


def test_naming_asks_about_a_type_no_example_shows_and_counts_its_borrowed_names(synth):
    """Each naming set also holds queries of a third defect type of its category, which no example shows; among
    those judged defective, `unshown_named` is the share answered with one of the examples' names."""
    from kensa_vl.eval.naming import naming_metrics, naming_sets

    items = synth["test"]
    sets = naming_sets(items, seeds=2, shots=4, per_type=4)
    assert any(s["unshown"] for s in sets)
    for s in sets:
        assert all(items[i]["defect_type"] == kind not in s["types"] for i, kind in s["unshown"])
        assert not {i for i, _ in s["unshown"]} & {*s["good"], *s["demos"], *(i for i, _ in s["queries"])}
    names = ["a dark scratch", "打痕"]
    base = {"category": "nut", "seed": 0, "label": "defective", "p_defective": 0.9, "names": names}
    records = [{**base, "run": "named", "query": 0, "verdict": "defective", "name": "打痕", "expected": "打痕"},
               {**base, "run": "swapped", "query": 0, "verdict": "defective", "name": "a dark scratch",
                "expected": "a dark scratch"},
               {**base, "run": "unshown", "verdict": "defective", "name": "打痕"},
               {**base, "run": "unshown", "verdict": "defective", "name": "defect"},
               {**base, "run": "unshown", "verdict": "good", "name": None}]  # fmt: skip
    good = {**base, "label": "good", "verdict": "good", "p_defective": 0.1}
    records += [{**good, "run": "named"}, {**base, "run": "good_only", "verdict": "defective"},
                {**good, "run": "good_only"}]  # fmt: skip
    metrics = naming_metrics(records)
    assert metrics["unshown_queries"] == 3 and metrics["unshown_named"] == 0.5  # the good verdict names nothing
    assert metrics["naming"] == 1.0 and metrics["queries"] == 1  # the unshown queries are not named queries


def test_naming_intervals_resample_photos_so_a_photo_met_under_more_seeds_adds_no_certainty():
    """`naming_intervals` draws query photos, each with all its records: the same 20 photos met under three seeds
    give the interval one seed gives, which a draw of records would narrow by about the square root of 3."""
    from kensa_vl.eval.naming import naming_intervals, naming_metrics, naming_table

    def runs(seeds: int) -> list[dict]:
        out = []
        for seed, index in [(s, i) for s in range(seeds) for i in range(20)]:
            base = {"category": "nut", "seed": seed, "query": index, "index": index, "label": "defective"}
            right = index % 2 == 0  # half the photos named right, every time they are met
            out += [{**base, "run": "named", "verdict": "defective", "p_defective": 0.9,
                     "name": "打痕" if right else "キズ", "expected": "打痕"},
                    {**base, "run": "swapped", "verdict": "defective", "p_defective": 0.9,
                     "name": "キズ" if right else "打痕", "expected": "キズ"},
                    {**base, "run": "named", "label": "good", "index": 100 + index, "verdict": "good",
                     "p_defective": 0.2 if index < 15 else 0.7}]  # fmt: skip
            out += [{**r, "run": "good_only"} for r in out[-3::2]]
        return out

    one, three = naming_intervals(runs(1)), naming_intervals(runs(3))
    assert one["naming"] == three["naming"]
    low, high = one["naming"]
    assert low < 0.5 < high and 0.25 < high - low < 0.6  # 20 photos: a standard error of about 0.11
    assert one["follow_rate"] == [1.0, 1.0]  # every named query followed the swap
    metrics = naming_metrics(runs(1))
    low, high = metrics["intervals"]["balanced_accuracy_with_defective"]
    assert low < metrics["balanced_accuracy_with_defective"] == 0.875 < high
    assert "| naming by example | 0.500 | [" in naming_table({"metrics": metrics})
    assert naming_intervals([]) == {}  # no photos, no intervals (and no error)


def test_a_second_tile_budget_judges_each_query_again_and_averages_the_two(tiny_comparison, synth, tmp_path):
    """`fine_tiles`: every query judged at the default budget and at the finer one, P(defective) their mean, the
    text and boxes of the budget whose verdict agrees with it; an unreadable file stays an error."""
    model, processor = tiny_comparison
    test = synth["test"]
    support = _support(test)
    queries = [test[i]["image"] for i in range(5, 10)] + [str(tmp_path / "missing.png")]
    both = Inspector(model, processor, noun="nut", max_new_tokens=8, cache=False, fine_tiles=9)
    alone = Inspector(model, processor, noun="nut", max_new_tokens=8, cache=False)
    fine = Inspector(model, processor, noun="nut", max_new_tokens=8, cache=False, support_max_tiles=9,
                     query_max_tiles=9, check_examples=False)  # fmt: skip
    for inspector in (both, alone, fine):
        inspector.set_support(support)
    judged, a, f = both.judge(queries), alone.judge(queries), fine.judge(queries)
    assert judged[-1].verdict == "error" and both.fine.noun == "nut"
    for j, x, y in zip(judged[:-1], a[:-1], f[:-1], strict=True):
        assert j.p_defective == pytest.approx((x.p_defective + y.p_defective) / 2, abs=1e-5)
        assert j.verdict == ("defective" if j.p_defective >= 0.5 else "good")
        assert (j.text, j.boxes) == ((x.text, x.boxes) if x.verdict == j.verdict else (y.text, y.boxes))
    # the rule itself, both ways: the default budget's evidence when it agrees, else the fine one's
    good = Judgement("good", 0.25, "good")
    bad = Judgement("defective", 0.75, "defective: defect", boxes=[[1, 2, 3, 4]])
    assert both._both_budgets(good, bad) == replace(bad, p_defective=0.5)
    assert both._both_budgets(bad, Judgement("good", 0.0, "good")) == Judgement("good", 0.375, "good")
    with pytest.raises(ValueError, match="fine_tiles must be a whole number of tiles >= 1, 'auto' or None, got 0"):
        Inspector(model, processor, fine_tiles=0)


def test_auto_judges_again_only_photos_far_larger_than_compared(tiny_comparison, synth, caplog):
    """`fine_tiles="auto"`: photos at least FINE_AUTO_SCALE times larger per side than the query's budget compares
    are judged again at FINE_AUTO_SCALE**2 times its tiles, as `fine_tiles=16` would; smaller ones as without."""
    from kensa_vl.eval.inspector import FINE_AUTO_MAX_TILES, FINE_AUTO_SCALE

    model, processor = tiny_comparison  # four 112 px tiles: 224 px compared
    test = synth["test"]
    support, queries = _support(test), [test[i]["image"] for i in range(5, 8)]
    assert FINE_AUTO_SCALE == 2 and max(q.width for q in queries) < 2 * 224
    for size, same in ((None, None), (448, 16)):  # the photos as they are, then enlarged to 448 px: 2x per side
        shown = [{**s, "image": s["image"].resize((size, size))} if size else s for s in support]
        asked = [q.resize((size, size)) if size else q for q in queries]
        auto = Inspector(model, processor, max_new_tokens=0, fine_tiles="auto")
        alone = Inspector(model, processor, max_new_tokens=0, fine_tiles=same)
        for inspector in (auto, alone):
            inspector.set_support(shown)
        assert auto.fine_active == (same is not None) and alone.fine_active == (same is not None)
        for a, b in zip(auto.judge(asked), alone.judge(asked), strict=True):
            assert a.p_defective == pytest.approx(b.p_defective, abs=1e-5)
    # at most FINE_AUTO_MAX_TILES, and none where that is no more than the budget (photos 4x the budget's 224 px)
    assert Inspector(model, processor, fine_tiles="auto", query_max_tiles=12).fine.query_max_tiles == 16
    capped = Inspector(model, processor, max_new_tokens=0, fine_tiles="auto", query_max_tiles=16)
    capped.set_support([{**s, "image": s["image"].resize((896, 896))} for s in support])
    assert FINE_AUTO_MAX_TILES == 16 and not capped.fine_active
    told = Inspector(model, processor, max_new_tokens=0, fine_tiles="auto")
    with caplog.at_level("INFO", logger="kensa_vl.eval.inspector"):
        told.set_support(shown)  # the 448 px set, and a second one: the user is told once
        told.set_support(shown[:2])
    assert sum("each query is judged again at 16 tiles" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="fine_tiles must be a whole number of tiles >= 1, 'auto' or None, got 'x'"):
        Inspector(model, processor, fine_tiles="x")


def test_a_second_phase_judges_every_photo_moved_and_averages_the_two(tiny_comparison, synth, tmp_path):
    """`phases=2`: every query judged as it is and with it and its supports moved PHASE_SHIFT compared pixels up and
    left (a support's boxes with it), P(defective) the mean of the two, and the text, boxes and heatmap the unmoved
    look's for the mean's verdict; batches judge as one by one; an unreadable file stays an error; where a second
    tile budget judges the query, it is the second look."""
    from kensa_vl.eval.inspector import PHASE_SHIFT, MovedLook

    model, processor = tiny_comparison  # four 112 px tiles: a 256 px photo is compared at 224 px
    test = synth["test"]
    support = _support(test)
    queries = [test[i]["image"] for i in range(5, 11)]
    assert PHASE_SHIFT == 4 and {q.size for q in queries} == {(256, 256)}
    image = queries[0]
    arrays = np.asarray(image).astype(int)
    moved, dx, dy = MovedLook(model, processor)._moved(image, 4)
    assert (dx, dy) == (5, 5)  # 4 compared pixels at 256 / 224
    assert (np.asarray(moved)[:-5, :-5] == arrays[5:, 5:]).all()
    assert (np.asarray(moved)[-5:, :-5] == arrays[-2:-7:-1, 5:]).all()  # the edge reflected
    grey, *_ = MovedLook(model, processor)._moved(image.convert("L"), 4)  # a support given in any mode
    assert grey.mode == "RGB" and grey.size == image.size
    by_hand = []
    for s in support:
        x = np.pad(np.asarray(s["image"]), ((0, 5), (0, 5), (0, 0)), mode="reflect")[5:, 5:]
        boxes = [[max(x0 - 5, 0), max(y0 - 5, 0), max(x1 - 5, 1), max(y1 - 5, 1)] for x0, y0, x1, y1 in s["boxes"]]
        by_hand.append({**s, "image": Image.fromarray(x), "boxes": boxes})
    assert [b["boxes"] for b in by_hand] == [m["boxes"] for m in (MovedLook(model, processor)._moved_item(s, 4)
                                                                  for s in support)]  # fmt: skip
    assert by_hand[-1]["boxes"] and by_hand[-1]["boxes"] != [list(b) for b in support[-1]["boxes"]]

    both = Inspector(model, processor, noun="nut", max_new_tokens=8, phases=2)
    alone = Inspector(model, processor, noun="nut", max_new_tokens=8)
    shifted = Inspector(model, processor, noun="nut", max_new_tokens=0, check_examples=False)
    both.set_support(support), alone.set_support(support), shifted.set_support(by_hand)
    missing = str(tmp_path / "missing.png")
    judged, a = both.judge([*queries, missing]), alone.judge(queries)
    m = shifted.judge([Image.fromarray(np.pad(np.asarray(q), ((0, 5), (0, 5), (0, 0)), mode="reflect")[5:, 5:])
                       for q in queries])  # fmt: skip
    assert judged[-1].verdict == "error" and both.phase.noun == "nut"
    for j, x, y in zip(judged, a, m, strict=False):
        assert j.p_defective == pytest.approx((x.p_defective + y.p_defective) / 2, abs=1e-5)
        assert j.verdict == ("defective" if j.p_defective >= 0.5 else "good") == j.text.split(":")[0]
        np.testing.assert_allclose(j.heatmap, x.heatmap, atol=1e-5)
        if j.verdict == x.verdict:
            assert (j.text, j.boxes) == (x.text, x.boxes)
    assert {x.verdict for x in a} == {"good", "defective"}
    both.max_new_tokens = 0
    one, batched = both.judge(queries), both.judge(queries, batch_size=4)
    for x, y in zip(one, batched, strict=True):
        assert x.p_defective == pytest.approx(y.p_defective, abs=1e-5)
    fine, fine_alone = (Inspector(model, processor, max_new_tokens=0, fine_tiles=9, phases=p) for p in (2, 1))
    fine.set_support(support), fine_alone.set_support(support)
    for x, y in zip(fine.judge(queries[:2]), fine_alone.judge(queries[:2]), strict=True):  # the fine budget's look
        assert x.p_defective == pytest.approx(y.p_defective, abs=1e-6)  # is the second: no moved one beside it
    with pytest.raises(ValueError, match="phases must be 1 .* or 2 .*, got 3"):
        Inspector(model, processor, phases=3)
