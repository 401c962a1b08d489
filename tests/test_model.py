import copy

import pytest
import torch
from conftest import random_image
from transformers import AutoModel

from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig, build_encoder_config
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration, KensaVLModel
from kensa_vl.modeling.vision_kensa_vl import tapped_hidden_states


def _batch(processor, texts, images, **kwargs):
    return processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)


def test_forward_shapes_and_loss(tiny, images):
    model, processor = tiny
    inputs = _batch(processor, ["a <image> b"], images[:1])
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (7, model.config.tokens_per_tile, model.config.text_config.hidden_size)
    assert torch.isfinite(out.loss) and out.loss > 0


def test_feature_token_mismatch_raises(tiny, images):
    model, processor = tiny
    inputs = _batch(processor, ["a <image> b"], images[:1])
    first = int((inputs["input_ids"][0] == processor.image_token_id).nonzero()[0])
    inputs["input_ids"][0, first] = 5  # one image token fewer than the features
    with pytest.raises(ValueError, match=r"Image features and image tokens do not match: tokens: 447, features: 448"):
        model(**inputs)


def test_batch_mixing_zero_one_and_three_images(tiny, images):
    model, processor = tiny
    texts = ["text only sample", "one <image> image", "<image><image> three <image>"]
    batch = _batch(processor, texts, [[], [images[2]], images])
    with torch.no_grad():
        logits = model(**batch).logits
    processor.tokenizer.padding_side = "right"
    for i, (text, imgs) in enumerate(zip(texts, [[], [images[2]], images], strict=True)):
        single = processor(text=text, images=imgs or None, return_tensors="pt")
        with torch.no_grad():
            alone = model(**single).logits[0]
        n = alone.shape[0]
        torch.testing.assert_close(logits[i, :n], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batched_generation_equals_one_by_one(tiny, images, use_cache):
    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    texts = ["describe <image>", "is <image> defective? compare with <image> please"]
    per_sample = [[images[0]], [images[1], images[2]]]
    batch = _batch(processor, texts, per_sample)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    for i, (text, imgs) in enumerate(zip(texts, per_sample, strict=True)):
        single = processor(text=text, images=imgs, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False, use_cache=use_cache)
        assert out[i, -6:].tolist() == alone[0, -6:].tolist()
    processor.tokenizer.padding_side = "right"


def test_cached_generation_equals_uncached(tiny, images):
    model, processor = tiny
    inputs = processor(text="compare <image> with <image>", images=images[1:], return_tensors="pt")
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_gradient_checkpointing_backward(tiny, images):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = _batch(processor, ["x <image> y"], images[:1])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    named = dict(model.named_parameters())
    for key in (
        "model.multi_modal_projector.mlps.fused.1.weight",
        "model.layer_merges.dinov2.layer_logits",
        "model.vision_towers.siglip.embeddings.patch_embedding.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ):
        assert named[key].grad is not None and named[key].grad.abs().sum() > 0, key


VIT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "patch_size": 8, "image_size": 64}
FAMILIES = {
    "siglip": {"model_type": "siglip_vision_model", "intermediate_size": 64, **VIT},
    "clip": {"model_type": "clip_vision_model", "intermediate_size": 64, **VIT},
    "dinov2": {"model_type": "dinov2", "mlp_ratio": 2, **VIT},
    "dinov2reg": {"model_type": "dinov2_with_registers", "mlp_ratio": 2, "num_register_tokens": 4, **VIT},
}


def _small_config(encoders, fusion="concat", tile_size=64):
    text = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    return KensaVLConfig(
        text_config=text, vision_encoders=encoders, fusion=fusion, tile_size=tile_size, image_token_id=3
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fusion", ["concat", "interleave"])
def test_every_encoder_family_and_fusion(family, fusion):
    encoders = [
        {"name": family, "config": FAMILIES[family], "feature_layers": [1, -1], "layer_merge": "concat"},
        {"name": "second", "config": FAMILIES["dinov2"], "feature_layers": [-2, -1]},
    ]
    config = _small_config(encoders, fusion)
    model = KensaVLForConditionalGeneration(config).eval()
    streams = 2 if fusion == "interleave" else 1
    assert config.tokens_per_tile == streams * (64 // 8 // 2) ** 2
    tiles = torch.rand(3, 3, 64, 64)
    features = model.get_image_features(tiles).pooler_output
    assert features.shape == (3, config.tokens_per_tile, 32)
    n = 3 * config.tokens_per_tile
    ids = torch.tensor([[1] + [3] * n + [2]])
    assert model(input_ids=ids, pixel_values=tiles).logits.shape == (1, n + 2, 64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tapped_layers_equal_hidden_states(family):
    """The hooks return what `output_hidden_states` returns, CLS/registers included before they are dropped."""
    tower = AutoModel.from_config(build_encoder_config({"config": FAMILIES[family]})).eval()
    tower = getattr(tower, "vision_model", tower)
    x = torch.randn(2, 3, 64, 64)
    taps = [0, 1, -2, -1]
    got = tapped_hidden_states(tower, taps, x, {})
    reference = tower(pixel_values=x, output_hidden_states=True).hidden_states
    if reference is None:
        pytest.skip("this transformers version returns no hidden_states from the unwrapped tower")
    for tap, value in zip(taps, got, strict=True):
        torch.testing.assert_close(value, reference[tap])


def test_grids_that_cannot_align_raise():
    a = {"name": "a", "config": {**FAMILIES["siglip"], "patch_size": 14}}  # 112 / 14 = 8
    b = {"name": "b", "config": {**FAMILIES["dinov2"], "patch_size": 16}}  # 112 / 16 = 7: pooled onto 7, odd
    with pytest.raises(ValueError, match=r"common patch grid 7 is not divisible by pixel_shuffle 2.*'a': 8, 'b': 7"):
        _small_config([a, b], tile_size=112)
    with pytest.raises(ValueError, match="tile_size 60 is not a multiple of its patch_size 14"):
        _small_config([a], tile_size=60)


def test_common_grid_pools_the_finer_encoder():
    encoders = [
        {"name": "coarse", "config": {**FAMILIES["siglip"], "patch_size": 16}},
        {"name": "fine", "config": FAMILIES["dinov2"]},
    ]
    config = _small_config(encoders)
    assert config.grid_size == 4 and config.tokens_per_tile == 4
    model = KensaVLModel(config).eval()
    assert model.get_image_features(torch.rand(2, 3, 64, 64)).pooler_output.shape == (2, 4, 32)


def test_image_features_give_the_merged_grid_and_each_towers_layers():
    """`last_hidden_state`: both encoders' merged features on the common 8x8 grid, channels side by side; with
    `output_hidden_states`, each tower's embeddings and layers, one tuple over both; a tuple without return_dict."""
    encoders = [{"name": "siglip", "config": FAMILIES["siglip"]}, {"name": "dinov2", "config": FAMILIES["dinov2"]}]
    model = KensaVLModel(_small_config(encoders)).eval()
    tiles = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out = model.get_image_features(tiles, output_hidden_states=True)
        grids = model.image_grids(tiles)
    assert out.last_hidden_state.shape == (3, 8 * 8, 32 + 32)
    torch.testing.assert_close(out.last_hidden_state[..., 32:], grids["dinov2"].flatten(1, 2))
    assert len(out.hidden_states) == 2 * (VIT["num_hidden_layers"] + 1) and out.attentions is None
    assert out.hidden_states[0].shape[1] == 64 and out.hidden_states[-1].shape[1] == 65  # DINOv2 keeps its CLS
    as_tuple = model.get_image_features(tiles, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.pooler_output)
    with pytest.raises(ValueError, match="image_grid describes 4 tiles, pixel_values has 3"):
        model.get_image_features(tiles, image_grid=torch.tensor([[2, 2, 4]]))


def test_taps_leave_unread_tower_parameters_frozen():
    """Parameters no tap reads never get a gradient: they are frozen where the towers are built, also when a recipe
    unfreezes the towers, and the layers a recipe unfreezes are the last ones the taps read."""
    from kensa_vl.train.sft import KensaArguments, select_trainable

    encoders = [
        {"name": "siglip", "config": FAMILIES["siglip"], "feature_layers": [-2]},  # reads layers 0 and 1 of 3
        {"name": "dinov2", "config": FAMILIES["dinov2"]},
    ]
    model = KensaVLForConditionalGeneration(_small_config(encoders))
    frozen = {n.removeprefix("model.vision_towers.") for n, p in model.named_parameters() if not p.requires_grad}
    assert {"siglip.post_layernorm.weight", "siglip.encoder.layers.2.mlp.fc1.weight", "dinov2.layernorm.weight",
            "dinov2.embeddings.mask_token"} <= frozen  # fmt: skip
    assert not any(n.startswith(("siglip.encoder.layers.1.", "siglip.embeddings.", "dinov2.encoder")) for n in frozen)
    groups = select_trainable(model, KensaArguments(train=["vision"]))
    trained = {id(p) for p in groups["vision"]}
    assert not any(id(p) in trained for n, p in model.named_parameters() if "post_layernorm" in n)
    select_trainable(model, KensaArguments(train=["projector"], vision_unfreeze_layers=1))
    unfrozen = {n for n, p in model.named_parameters() if p.requires_grad and "vision_towers.siglip" in n}
    assert unfrozen and all(".encoder.layers.1." in n for n in unfrozen)


def test_save_load_round_trip(tiny, tiny_dir, images):
    model, processor = tiny
    loaded, info = KensaVLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = processor(text="x <image>", images=images[:1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_nan_and_wrong_shape_pixels(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_tiles, 3, 224, 224\), got \(1, 3, 64, 64\)"):
        model.get_image_features(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        from kensa_vl.processing.image_processing_kensa_vl import to_rgb

        to_rgb(random_image(4, 4).convert("F").point(lambda _: float("nan")))


def test_text_only_batch_under_distributed_still_runs_the_towers(tiny, tmp_path):
    """ZeRO-3 needs every rank to run the towers: a text-only training batch runs them on a dummy tile."""
    import torch.distributed as dist

    model, processor = tiny
    model = copy.deepcopy(model).train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        inputs = processor(text=["only words here"], return_tensors="pt")
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    finally:
        dist.destroy_process_group()
    tower_grad = model.model.vision_towers["siglip"].embeddings.patch_embedding.weight.grad
    assert tower_grad is not None and tower_grad.abs().sum() == 0  # in the graph, contributing nothing


def test_timm_cnn_encoder_beside_a_vit():
    """Optional extra: a timm CNN through transformers' timm wrapper, its stage map pooled onto the common grid."""
    pytest.importorskip("timm", reason="timm is an optional extra (needs torchvision); exercised where installed")
    cnn = {
        "name": "resnet",
        "config": {"model_type": "timm_wrapper", "architecture": "resnet18", "do_pooling": False},
        "feature_layers": [3],
        "feature_stride": 16,
        "hidden_size": 256,
    }
    vit = {"name": "dinov2", "config": {**FAMILIES["dinov2"], "patch_size": 8}}
    config = _small_config([vit, cnn])  # 64 px tiles: DINOv2 8x8 patches, resnet18 stage 3 at stride 16 -> 4x4
    model = KensaVLModel(config).eval()
    assert model.get_image_features(torch.rand(2, 3, 64, 64)).pooler_output.shape == (2, config.tokens_per_tile, 32)


def test_tied_word_embeddings_survive_save_and_load(tmp_path):
    config = _small_config([{"name": "dinov2", "config": FAMILIES["dinov2"]}])
    config = KensaVLConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    assert config.text_config.tie_word_embeddings  # 4.x reads it here, 5.x at the top level
    model = KensaVLForConditionalGeneration(config).eval()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded, info = KensaVLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 2, 5]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_generate_writes_only_closed_boxes(tiny, images):
    """A random language model opens no box by itself; told to write one, it writes four ordered location tokens
    and closes it (`BoxGrammar`), and writes no location token after."""
    model, processor = tiny
    config = model.config
    inputs = processor(text="describe <image> defective at the top <box>", images=images[:1], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    bins = [t - config.loc_token_start_id for t in out[:4]]
    assert all(0 <= b < config.num_loc_bins for b in bins) and bins[2] >= bins[0] and bins[3] >= bins[1], out
    assert out[4] == config.box_token_ids[1]
    assert not any(t >= config.loc_token_start_id or t in config.box_token_ids for t in out[5:]), out


def test_box_grammar_masks_by_position_and_survives_top_k(tiny):
    from kensa_vl.modeling.demos_kensa_vl import BoxGrammar

    config = tiny[0].config
    grammar, opening, closing = BoxGrammar(config), *config.box_token_ids
    loc = config.loc_token_start_id
    rows = [[5, 6], [opening, loc + 9], [opening, loc + 9, loc + 3], [opening, loc, loc, loc + 1, loc + 2]]
    ids = torch.tensor([[0] * (5 - len(row)) + row for row in rows])  # left-padded
    scores = torch.zeros(4, config.text_config.vocab_size)
    allowed = torch.isfinite(grammar(ids, scores))
    assert not allowed[0, loc : loc + config.num_loc_bins].any() and not allowed[0, closing] and allowed[0, 5]
    assert allowed[1].nonzero().flatten().tolist() == list(range(loc, loc + config.num_loc_bins))  # y0: any bin
    assert allowed[2].nonzero().flatten().tolist() == list(range(loc + 9, loc + config.num_loc_bins))  # x1 >= x0
    assert allowed[3].nonzero().flatten().tolist() == [closing]
    # top-k left only other tokens finite: the allowed ones share equal scores instead of an empty row
    top_k = torch.full_like(scores, -torch.inf)
    top_k[:, 5] = 1.0
    kept = grammar(ids, top_k)
    assert kept[3, closing] == 0 and torch.isfinite(kept[3]).sum() == 1 and kept[0, 5] == 1.0
