"""`assemble` copies pretrained parts into KensaVL exactly: towers and LM behave as the standalone components."""

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
from kensa_vl.processing.processing_kensa_vl import IMAGE_TOKEN
from kensa_vl.train.build import assemble

VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14, "image_size": 56}


def _plain_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["a plain language model tokenizer"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    siglip = SiglipModel(
        SiglipConfig(
            vision_config={**VIT, "intermediate_size": 64},
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 50,
            },
        )
    )
    siglip.save_pretrained(root / "siglip")
    SiglipImageProcessorPil(image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2]).save_pretrained(root / "siglip")
    Dinov2Model(Dinov2Config(**VIT, mlp_ratio=2)).save_pretrained(root / "dinov2")
    BitImageProcessorPil().save_pretrained(root / "dinov2")
    tokenizer = _plain_tokenizer()
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    out = assemble(
        [str(root / "siglip"), str(root / "dinov2")], str(root / "lm"), root / "kensa", tile_size=56, max_tiles=4
    )
    return root, out


def _towers_equal_the_components(model, root, side: int, **kwargs) -> None:
    """The assembled towers' output equals the saved SigLIP's and DINOv2's (called with `kwargs`) at `side` px."""
    x = torch.randn(2, 3, side, side)
    references = {
        "siglip": AutoModel.from_pretrained(root / "siglip").vision_model,
        "dinov2": AutoModel.from_pretrained(root / "dinov2"),
    }
    for name, reference in references.items():
        with torch.no_grad():
            expected = reference(pixel_values=x, **kwargs).last_hidden_state
            got = model.model.vision_towers[name](pixel_values=x).last_hidden_state
        torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_assembled_towers_and_lm_equal_the_components(parts):
    root, out = parts
    model = KensaVLForConditionalGeneration.from_pretrained(out).eval()
    _towers_equal_the_components(model, root, 56)
    lm = AutoModelForCausalLM.from_pretrained(root / "lm").eval()
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert got.shape[-1] > expected.shape[-1]  # KensaVL's tokens were added to the vocabulary
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected)


@pytest.mark.slow
def test_towers_assembled_at_a_larger_tile_hold_their_position_embeddings_resized_once(parts, tmp_path):
    """At 84 px tiles the 56 px towers give what the components give with their own interpolation, and no forward
    interpolates again (the tower's size is the tile's)."""
    root, _ = parts
    out = assemble([str(root / "siglip"), str(root / "dinov2")], str(root / "lm"), tmp_path / "k", tile_size=84)
    model = KensaVLForConditionalGeneration.from_pretrained(out).eval()
    assert {e["config"]["image_size"] for e in model.config.vision_encoders} == {84}
    assert model.model._tower_kwargs == {"siglip": {}, "dinov2": {}}
    _towers_equal_the_components(model, root, 84, interpolate_pos_encoding=True)


@pytest.mark.slow
def test_assembled_config_records_provenance_and_tokens(parts):
    root, out = parts
    model = KensaVLForConditionalGeneration.from_pretrained(out)
    config = model.config
    encoders = {e["name"]: e for e in config.vision_encoders}
    assert set(encoders) == {"siglip", "dinov2"}
    assert encoders["siglip"]["image_mean"] == [0.4, 0.4, 0.4]  # read from the component's image processor
    assert config.base_models == {"vision": [str(root / "siglip"), str(root / "dinov2")], "text": str(root / "lm")}
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert processor.image_seq_len == config.tokens_per_tile == 4
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)


def _stripes(seed: int, defect: bool = False):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.arange(112)
    pattern = 128 + 60 * np.sin(x / 3.0)[None, :] + rng.normal(0, 4, (112, 112))
    if defect:
        pattern[40:56, 60:76] = 20  # a dark blotch
    return Image.fromarray(np.repeat(pattern.clip(0, 255).astype(np.uint8)[..., None], 3, -1))


@pytest.mark.slow
def test_an_assembled_model_with_a_comparison_inspects_before_any_training(parts, tmp_path):
    from kensa_vl.eval.inspector import Inspector, support_item

    root, _ = parts
    vision, lm = [str(root / "siglip"), str(root / "dinov2")], str(root / "lm")
    with pytest.raises(ValueError, match="clip.*not an encoder of this model"):
        assemble(vision, lm, tmp_path / "bad", tile_size=56, max_tiles=4, compare=["clip"])
    out = assemble(
        vision, lm, tmp_path / "kensa", tile_size=56, max_tiles=4, compare=["dinov2", "dct"], reference_views=["hflip"]
    )
    inspector = Inspector.from_pretrained(str(out), max_new_tokens=0)
    config = inspector.model.config
    assert config.reference_comparison and config.reference_encoders == ["dinov2", "dct"]
    assert config.reference_views == ["hflip"] and config.verdict_token_ids and config.answer_prompt_ids
    inspector.set_support([support_item(_stripes(seed)) for seed in range(3)])
    good, bad = inspector.judge([_stripes(10), _stripes(11, defect=True)])
    assert good.verdict == "good" and bad.verdict == "defective"  # the comparison's verdict, untrained
    x0, y0, x1, y1 = bad.boxes[0]
    assert x0 <= 68 <= x1 and y0 <= 48 <= y1  # around the blotch
    assert bad.heatmap[48, 68] > np.percentile(bad.heatmap, 90)


def test_assemble_takes_every_comparison_setting_on_the_command_line(parts, tmp_path):
    import json

    from kensa_vl.train.cli import main

    root, _ = parts
    main(["assemble", "--vision", str(root / "dinov2"), "--text", str(root / "lm"), "--out", str(tmp_path / "k"),
          "--tile-size", "56", "--max-tiles", "4", "--compare", "dinov2", "--compare", "bandpass",
          "--reference-views", "hflip,rot90", "--mask-background", "dinov2",
          "--coreset", "0.5", "--search-probes", "4", "--exact-search-cells", "1000"])  # fmt: skip
    config = json.loads((tmp_path / "k" / "config.json").read_text())
    assert config["reference_encoders"] == ["dinov2", "bandpass"] and config["reference_views"] == ["hflip", "rot90"]
    assert [e.get("masks_background", False) for e in config["vision_encoders"]] == [True, False]
    with pytest.raises(ValueError, match="--mask-background 'dct': not an encoder compared"):
        assemble([str(root / "dinov2")], str(root / "lm"), tmp_path / "m", tile_size=56, max_tiles=4,
                 compare=["dinov2"], mask_background="dct")  # fmt: skip
    bandpass = config["vision_encoders"][-1]["config"]  # its Gaussians scaled with the tile (3 and 6 px at 112)
    assert bandpass["model_type"] == "kensa_bandpass" and bandpass["sigmas"] == [1.5, 3.0]
    assert (config["reference_coreset"], config["search_probes"], config["exact_search_cells"]) == (0.5, 4, 1000)
