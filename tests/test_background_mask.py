"""Masking the background (an encoder entry's `masks_background`): a product photographed on a background is
compared on the product alone; a texture, or a product that fills the frame, is compared everywhere."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image


def photo(kind: str, seed: int = 0, mark: str | None = None) -> Image.Image:
    """224 px: a textured disc on a dark, slightly noisy background ("object"), a texture filling the frame
    ("texture") or the background alone ("plain"); `mark` adds a bright speck of dust on the background ("dust"), a
    dark blot on the disc ("blot"), or puts the disc on another background, a blue one ("tray")."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:224, :224]
    image = np.repeat((0.15 + 0.02 * rng.standard_normal((224, 224)))[..., None], 3, -1)
    if mark == "tray":
        image = np.array([0.05, 0.1, 0.35]) + 0.02 * rng.standard_normal((224, 224, 1))
    texture = 0.6 + 0.15 * np.sin(x / 3.0) * np.cos(y / 4.0) + 0.05 * rng.standard_normal((224, 224))
    if kind == "object":
        disc = (x - 112) ** 2 + (y - 112) ** 2 < 60**2
        image[disc] = np.stack([texture, texture * 0.9, texture * 0.8], -1)[disc]
    elif kind == "texture":
        image = np.repeat(texture[..., None], 3, -1)
    if mark == "dust":
        image[16:36, 16:36] = 0.95
    elif mark == "blot":
        image[96:128, 116:148] = 0.02
    return Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def models():
    """The tiny DCT-comparing model, and the same weights with its DCT entry masking the background."""
    from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True,
                                  reference_encoders=["dct"])  # fmt: skip
    config = copy.deepcopy(model.config)
    next(e for e in config.vision_encoders if e["name"] == "dct")["masks_background"] = True
    masked = KensaVLForConditionalGeneration(config)
    masked.load_state_dict(model.state_dict())
    return model.eval(), masked.eval(), processor


def test_the_product_is_told_from_its_background_and_a_texture_is_not_masked(models):
    from kensa_vl.modeling.comparison_kensa_vl import product_mask, unit_cells

    model, _, processor = models
    masks = {}
    for kind in ("object", "texture", "plain"):
        batch = processor.image_processor([photo(kind)], return_tensors="pt")
        rows, cols = batch["image_grid"][0, :2].tolist()
        cells = unit_cells(model.model.image_grids(batch["pixel_values"], ["dct"]), ["dct"])["dct"]
        masks[kind] = product_mask(cells[: rows * cols], rows, cols)
    assert masks["texture"] is None and masks["plain"] is None
    mask = masks["object"]  # 32 x 32 cells of 7 px: the disc (centre 16, radius 8.6 cells), a cell grown
    assert mask.shape == (32, 32) and mask[12:20, 12:20].all() and not mask[:4].any() and not mask[:, -4:].any()
    assert 0.2 < mask.float().mean() < 0.4


def test_dust_on_the_background_is_ignored_and_a_defect_on_the_product_is_found(models):
    from kensa_vl.eval.inspector import Inspector, support_item

    model, masked, processor = models
    support = [support_item(photo("object", seed)) for seed in range(1, 4)]
    judged = {}
    for name, m in (("plain", model), ("masked", masked)):
        inspector = Inspector(m, processor, max_new_tokens=0, check_examples=False)
        inspector.set_support(support)
        judged[name] = inspector.judge([photo("object", 9, "dust"), photo("object", 9, "blot"), photo("object", 9)])
    (dust, blot, good), (dust_masked, blot_masked, good_masked) = judged["plain"], judged["masked"]
    assert dust.p_defective > good.p_defective + 0.25 and dust.heatmap[16:36, 16:36].max() == dust.heatmap.max()
    # masked, the dust reads as the good photo does, and the blot on the product as before, where it is
    assert dust_masked.p_defective == pytest.approx(good.p_defective, abs=0.01)
    assert good_masked.p_defective == pytest.approx(good.p_defective, abs=0.01)
    assert dust_masked.heatmap[16:36, 16:36].max() < np.percentile(dust_masked.heatmap, 90)
    assert blot_masked.p_defective == pytest.approx(blot.p_defective, abs=0.01)
    assert blot.p_defective > good.p_defective + 0.4
    y, x = np.unravel_index(blot_masked.heatmap.argmax(), blot_masked.heatmap.shape)
    assert 90 <= y < 134 and 110 <= x < 154


def test_a_part_on_another_background_is_not_unlike_its_examples_when_the_background_is_masked(models):
    """The examples check (`support_check`) reads the product's cells alone too: the same part on another tray is
    unlike the examples by its background alone, and not once the background is masked."""
    from kensa_vl.eval.inspector import support_item
    from kensa_vl.eval.support_check import UNLIKE_MARGIN, compared_features, measure_support

    model, masked, processor = models
    support = [support_item(photo("object", seed)) for seed in range(1, 5)]
    excess = {}
    for name, m in (("plain", model), ("masked", masked)):
        _, normal = measure_support(m, processor, support)
        assert normal.masking == (None if name == "plain" else "dct")
        excess[name] = [
            normal.excess(compared_features(m, processor, photo("object", 9, look))) for look in (None, "tray")
        ]
    assert excess["plain"][1] > UNLIKE_MARGIN > excess["masked"][1]
    assert max(excess["plain"][0], excess["masked"][0]) < UNLIKE_MARGIN  # the part on its own tray, either way


def test_one_compared_encoder_masks_the_background(models):
    from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig

    model, _, _ = models
    settings = model.config.to_dict()
    for encoder in settings["vision_encoders"]:
        encoder["masks_background"] = True
    with pytest.raises(ValueError, match="masks_background: at most one encoder, and one the comparison runs on"):
        KensaVLConfig(**{k: v for k, v in settings.items() if k not in ("model_type", "transformers_version")})
    assert torch.is_tensor(model.model.reference_comparison.linear.weight)
