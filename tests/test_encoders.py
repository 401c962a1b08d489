"""The fine-detail switches beside the ViTs: a transformers CNN stage, direct patch input, S2 multi-scale tiles
(the DCT encoder and interleave/concat fusion are tested with the anomaly map and the model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration, KensaVLModel
from kensa_vl.modeling.vision_kensa_vl import KensaVLPatchEncoder
from kensa_vl.train.build import TINY_ENCODERS

TEXT = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
DCT = {"name": "dct", "config": {"model_type": "kensa_dct", "patch_size": 7, "luma_coefficients": 6,
                                 "chroma_coefficients": 1}}  # fmt: skip


def _config(*encoders, tile_size=112, **kwargs) -> KensaVLConfig:
    vit = {"name": "siglip", **TINY_ENCODERS["siglip"]}
    vit["config"] = {**vit["config"], "image_size": tile_size}
    return KensaVLConfig(
        text_config=TEXT, vision_encoders=[vit, *encoders], tile_size=tile_size, image_token_id=3, **kwargs
    )


def test_cnn_stage_is_pooled_onto_the_common_grid():
    resnet = {"name": "resnet", **TINY_ENCODERS["resnet"]}  # stage 2: stride 8, 14 x 14 at 112 px, 32 channels
    config = _config(resnet)
    assert config.grid_size == 8 and config.encoder_hidden_sizes()["resnet"] == 32
    model = KensaVLModel(config).eval()
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        grids = model.image_grids(x)
        mean, std = (
            torch.tensor(v).view(1, 3, 1, 1)
            for v in (config.vision_encoders[1]["image_mean"], config.vision_encoders[1]["image_std"])
        )
        stage = model.vision_towers["resnet"]((x - mean) / std, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(grids["resnet"], stage.permute(0, 2, 3, 1))
        assert model.get_image_features(x).pooler_output.shape == (2, 16, 32)  # 8 x 8 common grid, 2 x 2 pixel shuffle
    with pytest.raises(ValueError, match=r"tapped stages \[1, 2\] have different strides \[4, 8\]"):
        _config({**resnet, "feature_layers": [1, 2]})


def test_patch_encoder_is_a_linear_map_of_raw_pixel_patches():
    encoder = KensaVLPatchEncoder({"patch_size": 14, "hidden_size": 8})
    x = torch.rand(1, 3, 28, 28)
    out = encoder(x)
    assert out.shape == (1, 4, 8)
    patch = x[0, :, 14:28, 0:14].reshape(-1)  # row 1, column 0: the third patch in row-major order
    torch.testing.assert_close(out[0, 2], encoder.proj(patch))


def test_s2_scales_encode_sub_tiles_in_one_call_and_pool_them_back():
    """With the block-local DCT encoder, the 2x half of the channels must equal the DCT of the whole 2x-upsampled
    tile, average-pooled: that checks the cut, the stitching order and the pooling."""
    config = _config({**DCT, "scales": [1, 2]})
    assert config.encoder_hidden_sizes()["dct"] == 2 * 8
    model = KensaVLModel(config).eval()
    calls = []
    model.vision_towers["dct"].register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    x = torch.rand(3, 3, 112, 112)
    with torch.no_grad():
        grid = model.image_grids(x)["dct"]  # (3, 16, 16, 16)
        assert calls == [3 + 3 * 4]  # the tiles and their sub-tiles in one call
        base, doubled = grid[..., :8], grid[..., 8:]
        tower = model.vision_towers["dct"]
        torch.testing.assert_close(base, tower(x).view(3, 16, 16, 8))
        big = tower(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)).view(3, 32, 32, 8)
        torch.testing.assert_close(doubled, F.avg_pool2d(big.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"scales must be distinct whole numbers starting with 1.*\[2\]"):
        _config({**DCT, "scales": [2]})


@pytest.mark.parametrize("window", [0, -0.2, 1.0, 3])
def test_an_own_window_outside_the_image_is_refused(window):
    with pytest.raises(ValueError, match=rf"own_window is a share of the image's longer side.*got {window}"):
        _config({**DCT, "own_window": window})
    assert _config({**DCT, "own_window": 0.2}).vision_encoders[1]["own_window"] == 0.2


def test_new_encoders_save_and_load(tmp_path):
    patch = {"name": "patch", **TINY_ENCODERS["patch"]}
    resnet = {"name": "resnet", **TINY_ENCODERS["resnet"]}
    bandpass = {"name": "bandpass", "config": {"model_type": "kensa_bandpass", "patch_size": 7, "sigmas": [3, 6]}}
    config = _config(patch, resnet, {**DCT, "scales": [1, 2]}, bandpass, fusion="interleave")
    assert config.encoder_hidden_sizes()["bandpass"] == 7  # 3 planes x 2 bands + the constant channel
    model = KensaVLForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    loaded, info = KensaVLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.get_image_features(x).pooler_output, model.model.get_image_features(x).pooler_output
        )
    encoders = loaded.config.vision_encoders
    assert encoders[3]["scales"] == [1, 2] and encoders[4]["config"]["sigmas"] == [3, 6]
