"""The performance suite's models keep running: KensaVL and transformers' peers at one size, fed by their own
processors (benchmarks/peers.py). No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from benchmarks.episode import photos
from benchmarks.peers import NAMES, build, tokenizer_with_peer_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_with_peer_tokens()


@pytest.mark.parametrize("name", NAMES)
def test_peer_runs_a_two_photo_prompt_from_its_own_processor(name, tokenizer):
    built = build(name, tokenizer)
    inputs = built.inputs(photos(2, 448))
    with torch.no_grad():
        logits = built.model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    config = built.model.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    tokens = int((inputs["input_ids"] == image_id).sum())
    # 448² photos: one 448 px tile each for KensaVL and InternVL (256 tokens); the peers upscale to their grids
    expected = {"KensaVL": 512, "InternVL": 512, "LLaVA-NeXT": 2 * 2928, "Idefics3": 2 * 17 * 169}
    assert tokens == expected[name]


@pytest.mark.parametrize("name", ["KensaVL", "LLaVA-NeXT"])
def test_peer_takes_the_sizes_it_is_given(name, tokenizer):
    """`benchmarks.gpu --peer` builds LLaVA-NeXT at real size through these arguments: they must reach the model."""
    vision = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 96}
    text = {"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 80}  # fmt: skip
    config = build(name, tokenizer, vision=vision, text=text).model.config
    towers = [e["config"] for e in config.vision_encoders] if name == "KensaVL" else [config.vision_config]
    for tower in towers:
        tower = tower if isinstance(tower, dict) else tower.to_dict()
        assert (tower["hidden_size"], tower["num_hidden_layers"]) == (64, 1)
    assert (config.text_config.model_type, config.text_config.hidden_size) == ("qwen2", 48)


def test_kensa_with_the_comparison_and_fewer_support_tiles(tokenizer):
    built = build("KensaVL", tokenizer, dct=True)
    inputs = built.inputs(photos(2, 896), max_tiles=[1, 12])  # the support one tile, the query 2x2 + thumbnail
    assert inputs["image_grid"].tolist() == [[1, 1, 1], [2, 2, 5]]
    with torch.no_grad():
        out = built.model(**inputs)
    assert out.anomaly_map[1:].isnan().sum() == 0 and out.anomaly_map[:1].isnan().all()


def test_the_inspector_episode_reads_supports_small_and_compares_them_in_full(tokenizer):
    from benchmarks.episode import measure_inspector

    built = build("KensaVL", tokenizer, dct=True)
    out = measure_inspector(built, photos(3, 896), repeats=1, support_tiles=1)
    assert out["forward s"] > 0 and out["query alone s"] > 0


def test_growth_exponent_of_a_power_law():
    from benchmarks.search_scaling import growth

    sizes = [1, 4, 8, 16]
    assert growth(sizes, [0.01 * n**0.5 for n in sizes]) == pytest.approx(0.5)
    assert growth(sizes, [0.01 * n for n in sizes]) == pytest.approx(1.0)


def test_inspect_latency_runners_take_turns_and_the_floor_judges_nothing():
    from benchmarks.inspect_latency import floor, judged, per_query
    from kensa_vl.eval.inspector import Inspector, support_item
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True)
    supports, queries = photos(2, 224), photos(3, 224, seed=1)
    cached = Inspector(model, processor, max_new_tokens=0)
    cached.set_support([support_item(image) for image in supports])
    recomputed = Inspector(model, processor, cache=False, max_new_tokens=0)
    recomputed.set_support([support_item(image) for image in supports])
    order = []

    def named(name, run):
        return lambda query: order.append(name) or run(query)

    runners = [
        named("cached", judged(cached)),
        named("recomputed", judged(recomputed)),
        named("floor", floor(cached, queries)),
    ]
    (_, _, a), (_, _, b), (alone, _, nothing) = per_query(runners, queries)
    assert order == ["cached", "recomputed", "floor"] * (1 + len(queries))  # a warm-up, then in turn per query
    assert a == pytest.approx(b, abs=1e-5) and nothing == [None] * len(queries) and alone > 0


def test_band_pass_ignores_gain_and_sees_a_faint_blot(tiny, synth_dir):
    """benchmarks/diffuse_features.py: a uniformly darker photo keeps its band-pass luminance (log: a gain cancels),
    a faint dark blot on it does not; the study runs on a validation split."""
    import numpy as np
    from PIL import Image

    from benchmarks.diffuse_features import band_pass, band_pass_scores, study
    from kensa_vl.train.data import load_synth

    rng = np.random.default_rng(0)
    base = 0.4 + 0.2 * rng.random((224, 224, 3))
    photos = [base, base * 0.85, base * (1 + 0.01 * rng.standard_normal((224, 224, 3)))]  # good: darker, noisier
    blotted = base.copy()
    yy, xx = np.mgrid[0:224, 0:224]
    blotted[(yy - 112) ** 2 + (xx - 112) ** 2 < 15**2] *= 0.85  # a 30 px blot, 15% darker
    features = {i: band_pass(Image.fromarray((np.clip(p, 0, 1) * 255).astype(np.uint8)))
                for i, p in enumerate([*photos, blotted])}  # fmt: skip
    luma = [features[i][:, 0] for i in range(4)]
    assert (luma[0] - luma[1]).abs().max() < 0.05 < (luma[0] - luma[3]).abs().max()
    good, bad = band_pass_scores(features, [0, 1], [2, 3])
    assert bad > 1.5 > good

    model, processor = tiny
    items, _ = load_synth(synth_dir)
    out = study(model, processor, items["validation"], k=2, seeds=1)
    assert set(out) == {"dct", "band-pass", "max", "geometric"} and all(0 <= r["auroc"] <= 1 for r in out.values())


def test_band_pass_on_the_cell_grid_follows_the_full_resolution_band_pass():
    """The encoder blurs the grid of cell means, not every pixel (`benchmarks/bandpass_encoder.py` times both): each
    of its channels must follow the definition, cell for cell."""
    from benchmarks.bandpass_encoder import full_resolution, textured
    from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder

    encoder = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6]})
    pixels = textured(2, 112)
    exact, fast = full_resolution(encoder, pixels).flatten(0, 1).T, encoder(pixels).flatten(0, 1).T
    for channel in range(6):
        assert torch.corrcoef(torch.stack([exact[channel], fast[channel]]))[0, 1] > 0.98
    assert torch.equal(exact[6], fast[6])  # the constant channel


def test_the_level_study_measures_each_encoder_against_its_level_on_validation(synth_dir):
    """benchmarks/verdict_levels.py: per query the kNN scores `(E,)`, the bank's sequential scores `(k - 1, E)` and
    the supports' leave-one-out scores `(k, E)` of the model's compared encoders; a rule's decision is the largest
    `scale * (score - level) / spread - margin`, and the best threshold separates what is separable."""
    import numpy as np

    from benchmarks.verdict_levels import (
        RULES,
        best_threshold,
        collect,
        decisions,
        margin_sweep,
        sweep_row,
        table,
        window_sweep,
    )
    from kensa_vl.train.build import build_tiny
    from kensa_vl.train.data import load_synth
    from kensa_vl.train.pipeline import TINY

    record = {"scores": np.array([-2.0, -7.0]), "sequential": np.array([[-3.0, -8.0], [-3.5, -9.0]]),
              "held_out": np.array([[-3.0, -8.0], [-3.2, -8.5], [-2.8, -9.0]])}  # fmt: skip
    excess = np.array([[1.0, 0.0], [0.5, 0.5]])
    kept, _, largest, ranged = (decisions([record], rule, excess)[0] for rule in RULES.values())
    assert kept == pytest.approx(max(-2.0 + 3.25, 0.5 * (-7.0 + 8.5) - 0.5))  # the medians: -3.25, -8.5
    assert largest == pytest.approx(max(-2.0 + 2.8, 0.5 * (-7.0 + 8.0) - 0.5))
    assert ranged == pytest.approx(max((-2.0 + 3.0) / 0.4, 0.5 * (-7.0 + 8.5) / 1.0 - 0.5))
    assert best_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.5, 0.9])) == 0.5

    # the DCT and band-pass cells: two compared encoders, the DCT cells alone when the band-pass margin is infinite
    model, processor = build_tiny(**{**TINY, "contrast": False, "reference_encoders": ["dct", "bandpass"]})
    records = collect(model, processor, load_synth(synth_dir)[0]["validation"], shots=2, seeds=1)
    assert {r["scores"].shape for r in records} == {(2,)} and {r["held_out"].shape for r in records} == {(2, 2)}
    assert {r["sequential"].shape for r in records} == {(1, 2)} and {r["label"] for r in records} == {0, 1}
    lines = table({"validation": records}, np.array(model.model.reference_comparison.excess))
    assert len(lines) == 2 + len(RULES) and all(line.count("|") == 9 for line in lines)
    # the margin sweep: an infinite band-pass margin leaves the DCT cells alone to decide
    excess = np.array(model.model.reference_comparison.excess)
    swept = margin_sweep({"validation": records}, excess, 1, [0.5, float("inf")])
    alone = [excess[0, 0] * (r["scores"][0] - np.median(r["sequential"][:, 0])) - excess[0, 1] for r in records]
    from sklearn.metrics import roc_auc_score

    labels = np.array([r["label"] for r in records])
    assert swept[-1].split(" | ")[1] == f"{roc_auc_score(labels, alone):.3f}" and len(swept) == 4
    # the own-window sweep collects the scores anew per window and puts the model's windows back
    comparison = model.model.reference_comparison
    kept = list(comparison.own_windows)
    items = load_synth(synth_dir)[0]["validation"]
    rows = window_sweep(model, processor, {"validation": items}, "bandpass", [0, 0.2], shots=2, seeds=1)
    assert comparison.own_windows == kept == [None, 0.2] and len(rows) == 4
    built = collect(model, processor, items, shots=2, seeds=1, leave_one_out=False)  # the entry's own window, 0.2
    assert {r["held_out"].shape for r in built} == {(0, 2)}
    assert rows[3] == sweep_row(0.2, {"validation": built}, excess)


def test_the_verdict_parts_add_up_to_what_the_inspector_reads(synth_dir, tmp_path):
    """benchmarks/verdict_parts.py: each query's verdict logit plus the language model's own odds are the odds the
    Inspector reads its P(defective) from, so the mix at weight 1 ranks as the model does; weight 0 is the verdict
    alone."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from benchmarks.verdict_parts import collect, mixes, parts, plot, table
    from kensa_vl.eval.evaluate import control_support, pools, support_for
    from kensa_vl.eval.inspector import Inspector
    from kensa_vl.train.build import build_tiny
    from kensa_vl.train.data import load_synth
    from kensa_vl.train.pipeline import TINY

    model, processor = build_tiny(**TINY)
    items = load_synth(synth_dir)[0]["validation"]
    rows = pools(items)
    category = sorted(rows)[0]
    good, _ = support_for(rows, category, 2, 0, 0)
    inspector = Inspector(model, processor, max_new_tokens=0)
    inspector.set_support(control_support(items, good, [], None, 0))
    query = items[rows[category]["defective"][0]]["image"].convert("RGB")
    verdict, lm = parts(inspector, query)
    p = inspector.judge(query)[0].p_defective
    assert verdict != 0 and 1 / (1 + np.exp(-(verdict + lm))) == pytest.approx(p, abs=1e-5)

    record = collect(model, processor, items, shots=2, seeds=1)
    assert set(record["label"]) == {0, 1} and len(record["label"]) == len(record["verdict"]) == len(record["lm"])
    scored = mixes(record, [0, 1])
    assert scored["w=0"][0] == pytest.approx(roc_auc_score(record["label"], record["verdict"]))
    assert scored["w=1"][0] == pytest.approx(roc_auc_score(record["label"], record["verdict"] + record["lm"]))
    assert scored["language model alone"][0] == pytest.approx(roc_auc_score(record["label"], record["lm"]))
    lines = table({"a": record, "b": record}, [0, 1])
    assert len(lines) == 2 + 3 and all(line.count("|") == 8 for line in lines)
    plot({"a": record}, [0, 1], tmp_path / "parts.png")
    assert (tmp_path / "parts.png").stat().st_size > 0


def test_the_view_repeats_benchmark_compares_the_two_banks_on_one_model():
    """benchmarks/view_repeats.py: the bank before 7da9d8a holds the band-pass cells again in every view; both banks
    judge alike (the repeats are the same cells, moved), and the towers are put back as they were."""
    from benchmarks.view_repeats import inspectors
    from kensa_vl.eval.inspector import support_item
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True,
        reference_encoders=["dct", "bandpass"], reference_views=["hflip", "rot90"],
    )  # fmt: skip
    support = [support_item(image) for image in photos(2, 224)]
    now, before, shown, added = inspectors(model, processor, support)
    assert added == 2 * 5 * 16 * 16 * 2  # 2 photos of 5 tiles of 16 x 16 cells, in 2 more views
    assert len(before._bank.cells["dct"]) == len(now._bank.cells["dct"]) and min(shown) > 0
    assert model.model.vision_towers["bandpass"].view_invariant
    query = photos(1, 224, seed=1)[0]
    assert now.judge(query)[0].p_defective == pytest.approx(before.judge(query)[0].p_defective, abs=1e-5)
    plain, _ = build_tiny(tile_size=112, max_tiles=4, dct=True, reference_comparison=True)
    with pytest.raises(ValueError, match="no view-invariant encoder"):
        inspectors(plain, processor, support)


def test_the_training_profile_sums_each_part_by_its_file_and_function():
    """benchmarks/profile_training.py: a part is the cumulative time of the function of that name in that file
    (the remote-code copy of a model file too); a function of the same name in another file does not count."""
    from types import SimpleNamespace

    from benchmarks.profile_training import PARTS, part_seconds

    rows = {  # pstats' (file, line, function) -> (calls, primitive calls, own time, cumulative time, callers)
        ("/repo/modeling/search_kensa_vl.py", 188, "exact_similarity"): (3, 3, 0.5, 1.5, {}),
        ("/cache/transformers_modules/m/search_kensa_vl.py", 188, "exact_similarity"): (1, 1, 0.1, 0.5, {}),
        ("/repo/benchmarks/search_scaling.py", 20, "exact_similarity"): (1, 1, 4.0, 4.0, {}),
        ("/repo/modeling/comparison_kensa_vl.py", 648, "compare_prompt"): (1, 1, 0.2, 2.5, {}),
        ("/site/torch/autograd/graph.py", 966, "_engine_run_backward"): (1, 1, 0.7, 0.75, {}),
    }
    seconds = part_seconds(SimpleNamespace(stats=rows))
    assert set(seconds) == set(PARTS)
    assert seconds["exact nearest-cell searches"] == 2.0 and seconds["the comparison (`compare_prompt`)"] == 2.5
    assert seconds["backward pass"] == 0.75 and seconds["towers (`encode_tiles`)"] == 0


def test_gpu_benchmark_counts_grouped_query_attention_as_its_broadcast_heads():
    """Qwen2's attention has fewer key/value heads than query heads; torch before 2.13 refused to count it."""
    from torch.utils import flop_counter

    from benchmarks.gpu import gqa_flop_formulas

    formulas = gqa_flop_formulas()
    query, grouped, full = (2, 12, 300, 64), (2, 2, 300, 64), (2, 12, 300, 64)
    forward = formulas[torch.ops.aten._scaled_dot_product_efficient_attention]
    backward = formulas[torch.ops.aten._scaled_dot_product_efficient_attention_backward]
    assert forward(query, grouped, grouped, None, out_shape=None) == flop_counter.sdpa_flop_count(query, full, full)
    expected = flop_counter.sdpa_backward_flop_count(query, query, full, full)
    assert backward(query, query, grouped, grouped, out_shape=None) == expected


def test_the_real_size_layout_takes_the_comparison_as_assemble_does():
    from benchmarks.memory_estimate import real_config

    config = real_config("1.5b", ["dinov2", "dct", "bandpass"])
    assert config.reference_comparison and config.reference_encoders == ["dinov2", "dct", "bandpass"]
    assert [e["name"] for e in config.vision_encoders] == ["siglip", "dinov2", "dct", "bandpass"]
    assert not real_config("1.5b").reference_comparison
    with pytest.raises(ValueError, match=r"\['clip'\]: not an encoder"):
        real_config("1.5b", ["clip"])
    masked = real_config("1.5b", ["dinov2", "dct"], mask_background="dinov2")
    assert [e.get("masks_background", False) for e in masked.vision_encoders] == [False, True, False]
    with pytest.raises(ValueError, match="--mask-background 'siglip': not an encoder compared"):
        real_config("1.5b", ["dinov2"], mask_background="siglip")


def test_learned_cells_labels_cells_by_the_defect_mask_and_judges_every_encoder(synth_dir, capsys):
    """benchmarks/learned_cells.py: a good photo's cells are all negative, a defective photo's cells at least 30%
    inside its mask positive (partly inside: ignored); the study trains and judges the three encoders per kind."""
    from benchmarks.learned_cells import load, main

    pixels, cells, cats, bad, kinds = load(synth_dir, "validation")
    assert pixels.shape[-2:] == (252, 252) and cells.shape[1:] == (36, 36) and len(cats) == len(kinds) == len(bad)
    assert (cells[torch.from_numpy(~bad)] == 0).all() and (cells[torch.from_numpy(bad)] == 1).any()
    inside = cells[torch.from_numpy(bad)]
    assert (inside == -1).any() and (inside == 1).sum() < (inside >= 0).sum()  # soft edges; most cells are good
    main(["--train", str(synth_dir), "--data", str(synth_dir), "--steps", "2", "--seeds", "1"])
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in ("DCT cells", "band-pass cells", "learnt cells"))
    assert all(kind in table for kind in set(kinds[bad]))


def test_the_unlike_table_gives_each_kinds_share_above_each_margin():
    """benchmarks/unlike_examples.py: per data folder and margin, the share of each kind of example whose excess is
    above the margin; the kept margin is marked."""
    from benchmarks.unlike_examples import KINDS, table
    from kensa_vl.eval.support_check import UNLIKE_MARGIN

    found = {"set": {kind: [0.1 * (i + 1) * 10 ** (kind == KINDS[1]) for i in range(4)] for kind in KINDS}}
    lines = table(found, [0.25, UNLIKE_MARGIN])
    low, kept = (line.split(" | ") for line in lines[2:4])
    assert low[1] == "0.25" and kept[1] == f"{UNLIKE_MARGIN:g} (kept)"
    assert low[2] == "0.50" and low[3] == "1.00"  # 0.3 and 0.4 of 0.1-0.4 are above 0.25; 1-4 all are
    assert kept[2] == "0.00" and kept[3] == "1.00"
    assert lines[-1].startswith("Examples measured: good example 4,")


def test_gpu_benchmark_times_a_query_in_each_second_look_it_is_asked_for(monkeypatch, capsys):
    """`benchmarks.gpu --fine-tiles N --phases` (the tiny path on a CPU): a row for each second look, beside the
    one-look latency it is a ratio of."""
    from benchmarks import gpu

    argv = ["gpu", "--tiny", "--size", "224", "--shots", "2", "--queries", "2", "--steps", "1", "--no-train"]
    monkeypatch.setattr("sys.argv", [*argv, "--phases", "--fine-tiles", "9", "--compare", "dct"])
    gpu.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if "also judged" in line]
    assert [row.split(":")[0] for row in rows] == [
        "| inference, cached support, also judged at 9 tiles",
        "| inference, cached support, also judged moved half a cell",
    ]
    assert all(float(row.split("(")[1].split("x")[0]) > 0 for row in rows)
