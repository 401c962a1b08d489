"""KensaSynth: splits, ground truth, episodes, determinism, integrity and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from kensa_vl.processing.processing_kensa_vl import region_position
from kensa_vl.train.data.defects import CLASSIC_DEFECTS, DEFECTS, SIZES, apply_defect, mask_boxes
from kensa_vl.train.data.materials import MATERIALS, master, view
from kensa_vl.train.data.synth import SynthConfig, generate, load_synth, verify_checksums

SMALL = SynthConfig(seed=3, num_images=160, num_episodes=60, resolution=128, grading_photos=12, grading_episodes=60)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = generate(SMALL, tmp_path_factory.mktemp("synth") / "ks", preview=True, workers=2)
    return out, *load_synth(out)


def test_splits_hold_out_categories_and_defects(synth):
    _, items, episodes = synth
    assert set(items) == set(episodes) == {"train", "validation", "test"}
    cats = {split: set(items[split]["category"]) for split in items}
    assert cats["test"] == set(SMALL.test_categories) and cats["validation"] == set(SMALL.validation_categories)
    assert not cats["train"] & cats["validation"] and not cats["train"] & cats["test"]
    assert not cats["validation"] & cats["test"] and len(cats["train"]) >= 8
    defects = {split: set(items[split]["defect_type"]) - {None} for split in items}
    assert not defects["train"] & {*SMALL.validation_defects, *SMALL.heldout_defects}
    assert defects["validation"] <= defects["train"] | set(SMALL.validation_defects)
    assert defects["test"] <= defects["train"] | set(SMALL.heldout_defects) and SMALL.heldout_defects
    assert defects["validation"] & set(SMALL.validation_defects)  # a small set still holds its held-out defects
    assert [len(items[s]) for s in ("train", "validation", "test")] == SMALL.split_sizes()
    for split in items:  # every category of a split has good and defective photos, about half each
        labels = items[split]["label"]
        assert abs(labels.count("good") - labels.count("defective")) <= len(set(items[split]["category"]))


def test_ground_truth_matches_the_pixels(synth):
    _, items, _ = synth
    for row in items["test"]:
        mask = np.asarray(row["mask"]) > 0
        assert row["image"].size == row["mask"].size == (SMALL.resolution, SMALL.resolution)
        if row["label"] == "good":
            assert not mask.any() and row["boxes"] == [] and row["defect_type"] is None
            continue
        assert mask.any() and row["position"] == region_position(mask)
        assert row["area"] == pytest.approx(mask.mean(), abs=1e-4)
        covered = np.zeros_like(mask)
        for x0, y0, x1, y1 in row["boxes"]:
            region = mask[y0:y1, x0:x1]  # tight: the defect touches every edge of its box
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert covered[mask].all()
        meta = json.loads(row["meta"])
        assert meta["defect"]["size"] == row["size"] and row["position"] in row["description"]


def test_good_photos_are_views_not_copies(synth):
    _, items, _ = synth
    goods = items["train"].filter(lambda c, lab: c == "wood" and lab == "good", input_columns=["category", "label"])
    a, b = (np.asarray(goods[i]["image"], np.float32) for i in range(2))
    assert np.abs(a - b).mean() > 5  # another crop, angle and light, not the same pixels


def test_episodes_refer_to_items_of_their_category(synth):
    _, items, episodes = synth
    for split in episodes:
        cats, labels = items[split]["category"], items[split]["label"]
        queries = []
        for ep in episodes[split]:
            support, query = ep["support"], ep["query"]
            assert query not in support and len(set(support)) == len(support)
            assert all(cats[i] == ep["category"] for i in [*support, query])
            assert [labels[i] for i in support].count("good") == ep["num_good"] <= SMALL.max_good_support
            assert [labels[i] for i in support].count("defective") == ep["num_defective"]
            queries.append(labels[query])
        assert 0.2 < queries.count("good") / len(queries) < 0.8


def test_same_seed_same_bytes_and_checksums_catch_changes(synth, tmp_path):
    out, _, _ = synth
    again = generate(SMALL, tmp_path / "again", preview=True, workers=1)  # other worker count, same bytes
    assert (again / "checksums.json").read_bytes() == (out / "checksums.json").read_bytes()
    assert verify_checksums(again) == []
    arrow = next((again / "items" / "test").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    assert verify_checksums(again) == [arrow.relative_to(again).as_posix()]
    other = generate(SynthConfig(**{**SMALL.__dict__, "seed": 4}), tmp_path / "other", workers=2)
    assert (other / "checksums.json").read_bytes() != (out / "checksums.json").read_bytes()


def test_overwrite_rules(synth, tmp_path):
    out, _, _ = synth
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(SMALL, out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a KensaSynth output"):
        generate(SMALL, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_folder_made_with_other_settings_is_used_with_a_warning_that_names_them(synth, tmp_path):
    import dataclasses
    import shutil
    import warnings

    from kensa_vl.train.data.synth import ensure

    out, _, _ = synth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure(out, SMALL) == out  # the same settings: nothing to say
    with pytest.warns(UserWarning, match=r"num_images: 160, expected 800"):
        assert ensure(out, dataclasses.replace(SMALL, num_images=800)) == out
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "config.json").unlink()  # made before the settings were recorded
    with pytest.warns(UserWarning, match="not recorded"):
        ensure(old, SMALL)
    assert len(load_synth(old)[0]["train"]) == len(load_synth(out)[0]["train"])  # used as it is, not made anew


def test_preview_and_card(synth):
    out, items, _ = synth
    from PIL import Image

    for split in items:
        sheet = Image.open(out / f"preview_{split}.png")
        kinds = 1 + len({d for d in items[split]["defect_type"] if d})
        assert sheet.width == 224 * kinds and sheet.height > 224 * len(set(items[split]["category"]))
    card = (out / "README.md").read_text()
    assert "## Answer format" in card and all(name in card for name in MATERIALS)
    assert all(f"| {d} |" in card for d in SMALL.defect_kinds) and "| smear |" not in card  # its own kinds only


@pytest.mark.parametrize("name", list(DEFECTS))
def test_every_defect_spans_tiny_to_large(name):
    res = 512
    product, fg = master("metal", 0, res)
    areas = {}
    for size in ("tiny", "large"):
        rng = np.random.default_rng(1)
        rgb, fg_view, _ = view("metal", product, fg, res, rng)
        out, mask, boxes, meta = apply_defect(name, rgb, fg_view, size, rng)
        change = np.abs(out - rgb).max(-1)
        outside = change[~ndimage.binary_dilation(mask, iterations=4)]
        assert boxes and np.abs(out - rgb)[mask].mean() > DEFECTS[name].min_contrast
        # a sharp defect changes nothing outside its mask; a diffuse one (smear, dent, ...) only its faint fringe
        assert outside.max(initial=0) <= (0 if name in CLASSIC_DEFECTS else 0.3 * change[mask].max())
        areas[size] = mask.mean()
    assert areas["tiny"] <= 2 * SIZES["tiny"][1] and areas["large"] > SIZES["small"][1]


def test_defects_stay_on_the_product():
    res = 256
    product, fg = master("nut", 0, res)
    rgb, fg_view, _ = view("nut", product, fg, res, np.random.default_rng(0))
    for i, name in enumerate(DEFECTS):
        out, mask, _, _ = apply_defect(name, rgb, fg_view, "medium", np.random.default_rng(i))
        assert mask.any() and not mask[~fg_view].any() and np.array_equal(out[~fg_view], rgb[~fg_view])


def test_mask_boxes_one_per_component_and_specks_removed():
    mask = np.zeros((64, 64), bool)
    mask[5:10, 5:20] = True
    mask[40:50, 30:33] = True
    mask[60, 60] = True  # a speck
    cleaned, boxes = mask_boxes(mask)
    assert boxes == [[5, 5, 20, 10], [30, 40, 33, 50]] and not cleaned[60, 60] and cleaned.sum() == mask.sum() - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 4096}, "resolution must be in"),
        ({"num_images": 30}, "the splits need at least"),
        ({"test_categories": ("plastic",)}, "unknown categories"),
        ({"validation_categories": ("cap",)}, "disjoint"),
        ({"validation_defects": ("contamination",)}, "disjoint"),
        ({"grading_photos": 5}, "grading_photos must be 0"),
    ],
)
def test_bad_config_says_what_was_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_the_cli_starts_without_the_data_extra(tmp_path):
    """The base install (no extras) builds the tiny model: `kensa-vl tiny` must not import scipy or scikit-image."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('scipy', 'skimage'): sys.modules[m] = None\n"  # as if not installed
        "from kensa_vl.train.cli import main\n"
        f"main(['tiny', '--out', {str(tmp_path / 'tiny')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tiny" / "config.json").exists()
