"""Shared fixtures: a tiny random KensaVL built offline, and images of assorted sizes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SURFACES_SYNTH = {"seed": 1, "num_images": 400, "num_episodes": 40, "resolution": 256}  # `surfaces_dir`


def stand_in_photos(folder, flat_every: int = 10) -> None:
    """A small photo for every real surface (every `flat_every`-th one flat, as a smooth plaster is): the real ones
    come from PyPI wheels, which tests do not download."""
    from kensa_vl.train.data.surfaces import SURFACES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(SURFACES):
        flat = i % flat_every == 0
        texture = np.full((48, 48, 3), 120.0) if flat else rng.uniform(0, 255, (48, 48, 3))
        Image.fromarray(texture.astype(np.uint8)).save(folder / f"{name}.png")


@pytest.fixture(scope="session")
def tiny():
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny()
    return model, processor


@pytest.fixture(scope="module")
def tiny_dct():
    """A tiny model comparing on the DCT cells at 112 px tiles (one per test module: some tests set its weights)."""
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True)
    return model.eval(), processor


@pytest.fixture(scope="module")
def test_split(synth_dir):
    """The small KensaSynth folder's test split (`synth_dir`)."""
    from kensa_vl.train.data.synth import load_synth

    return load_synth(synth_dir)[0]["test"]


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    from kensa_vl.train.build import save_kensa

    model, processor = tiny
    return save_kensa(model, processor, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small KensaSynth folder (240 photos at 256 px, 40 episodes; 6 good photos per validation category)."""
    from kensa_vl.train.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "ks"
    return generate(
        SynthConfig(seed=0, num_images=240, num_episodes=40, resolution=256, grading_photos=12, grading_episodes=40),
        out,
        workers=2,
    )


@pytest.fixture(scope="session")
def surfaces_dir(tmp_path_factory):
    """A small KensaSynth on real surfaces (400 photos at 256 px: 2 or more good ones per validation surface) made
    from `stand_in_photos`."""
    from kensa_vl.train.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("surfaces")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KENSA_VL_CACHE", str(root / "cache"))
        stand_in_photos(root / "cache" / "surfaces")
        return generate(SynthConfig.real_surfaces(**SURFACES_SYNTH), root / "ks", workers=2)


@pytest.fixture(scope="session")
def main_run(synth_dir, surfaces_dir, tmp_path_factory):
    """The offline main job on a 64-step budget per stage (enough for the answers' form: the README's snippet is
    tested on it), its real-surface episodes from `surfaces_dir`: (output folder, returned metrics)."""
    from kensa_vl.train.cli import main_job

    out = tmp_path_factory.mktemp("main") / "run"
    budget = ["--max_steps", "64", "--num_rows", "256", "--per_device_train_batch_size", "4"]
    budget += ["--surfaces", str(surfaces_dir)]
    return out, main_job(out, synth_dir, shots=(0, 1), seeds=2, queries_per_category=2, overrides=budget)


@pytest.fixture
def images():
    """Three images of different sizes and aspect ratios (2x3, 2x2 and 1x2 grids at 224 px)."""
    return [random_image(200, 150, 1), random_image(448, 448, 2), random_image(500, 240, 3)]
