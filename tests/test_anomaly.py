"""The DCT encoder, the anomaly map's targets and loss, and the untrained comparison's PatchCore ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import random_image


@pytest.fixture(scope="module")
def tiny_dct():
    from kensa_vl.train.build import build_tiny

    return build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True)


def test_dct_encoder_matches_scipy_block_dct(tiny_dct):
    from scipy.fft import dctn

    model, processor = tiny_dct
    tower = model.model.vision_towers["dct"]
    pixels = processor.image_processor([random_image(224, 224, 3)], return_tensors="pt")["pixel_values"][:1]
    out = tower(pixels).view(16, 16, -1)  # 112 px tile, 7 px blocks
    rgb = pixels[0].numpy().astype(np.float64)
    y = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    ycc = np.stack([y, 0.564 * (rgb[2] - y), 0.713 * (rgb[0] - y)])
    blocks = ycc.reshape(3, 16, 7, 16, 7).transpose(1, 3, 0, 2, 4)  # (16, 16, 3, 7, 7): every 7 px block
    coefficients = dctn(blocks, axes=(-2, -1), norm="ortho")
    zigzag = sorted(((u, v) for u in range(7) for v in range(7)), key=lambda uv: (sum(uv), uv[0]))
    assert zigzag[:6] == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0)]
    pick = lambda channel, count: [coefficients[:, :, channel, u, v] for u, v in zigzag[:count]]  # noqa: E731
    expected = np.stack(pick(0, 36) + pick(1, 3) + pick(2, 3), -1)  # 36 luma, 3 Cb, 3 Cr
    compress = np.sign(expected) * np.log1p(10 * np.abs(expected))
    np.testing.assert_allclose(out.numpy(), compress, rtol=1e-4, atol=1e-4)
    assert not any(True for _ in tower.parameters())  # a fixed transform: nothing to train or save


def test_dct_config_and_tile_size_are_checked():
    from kensa_vl.modeling.vision_kensa_vl import KensaVLDCTEncoder

    with pytest.raises(ValueError, match="luma_coefficients <= 49"):
        KensaVLDCTEncoder({"patch_size": 7, "luma_coefficients": 64, "chroma_coefficients": 3})
    encoder = KensaVLDCTEncoder({"patch_size": 7, "luma_coefficients": 36, "chroma_coefficients": 3})
    with pytest.raises(ValueError, match=r"multiples of patch_size 7, got \(112, 110\)"):
        encoder(torch.rand(1, 3, 112, 110))


def _texture(seed: int, blotch: float = 0.0, side: int = 112) -> torch.Tensor:
    """A fine random grey texture `(1, 3, side, side)` in [0, 1], darkened by a smooth Gaussian blotch (sigma 12 px,
    `blotch` deep at its centre): a low-contrast smear."""
    x = 0.5 + 0.1 * torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    yy, xx = torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    return (x - blotch * torch.exp(-((yy - side * 0.55) ** 2 + (xx - side * 0.45) ** 2) / (2 * 12.0**2))).clamp(0, 1)


def test_bandpass_encoder_sees_a_faint_smooth_smear_that_the_dct_cells_do_not():
    """Nearest-support cosine distances of a query's cells, as the comparison takes them: a smear 6% deep lies far
    outside the good photos' spread in the band-pass cells and inside it in the DCT cells."""
    import torch.nn.functional as F

    from kensa_vl.modeling.search_kensa_vl import nearest_distances
    from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder, KensaVLDCTEncoder

    ratios = {}
    for name, encoder in (
        ("dct", KensaVLDCTEncoder({"patch_size": 7, "luma_coefficients": 36, "chroma_coefficients": 3})),
        ("bandpass", KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6]})),
    ):
        cells = lambda x: F.normalize(encoder(x), dim=-1).view(1, 16, 16, -1)  # noqa: B023, E731
        bank = torch.cat([cells(_texture(seed)).flatten(0, 2) for seed in range(4)])
        good, smear = (nearest_distances(cells(_texture(10, depth)), bank).max() for depth in (0.0, 0.06))
        ratios[name] = (smear / good).item()
    assert ratios["bandpass"] > 5 and ratios["dct"] < 1.2, ratios


def test_bandpass_encoder_ignores_flat_tiles_and_checks_its_input():
    """A flat tile of any colour has no band (each Gaussian mean is over the tile's own pixels, so its border is
    flat too); the last channel is the constant `offset`. Bad settings and tile sides are named."""
    from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder

    encoder = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6], "offset": 2.0})
    flat = torch.tensor([0.8, 0.3, 0.1]).view(1, 3, 1, 1).expand(2, 3, 112, 112)
    out = encoder(flat)
    assert out.shape == (2, 256, 7)
    torch.testing.assert_close(out[..., :6], torch.zeros(2, 256, 6), atol=1e-6, rtol=0)
    assert (out[..., 6] == 2.0).all() and encoder(_texture(0))[..., :6].abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"multiples of patch_size 7, got \(112, 110\)"):
        encoder(torch.rand(1, 3, 112, 110))
    with pytest.raises(ValueError, match=r"sigmas must be positive pixel widths, got \[0, 6\]"):
        KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [0, 6]})


def _softened(seed: int) -> torch.Tensor:
    """`_texture(seed)` with a square smoothed by a 7 px box mean: the texture gone, the local brightness kept."""
    x = _texture(seed)
    blurred = torch.nn.functional.avg_pool2d(x, 7, 1, 3, count_include_pad=False)
    x[..., 35:70, 42:77] = blurred[..., 35:70, 42:77]
    return x


def test_contrast_plane_sees_a_softened_texture_that_brightness_and_colour_do_not():
    """The band-pass encoder's "contrast" plane (each block's log standard deviation of log-luminance): a square
    whose texture is smoothed away, its brightness kept, lies far outside the good photos' spread in it and inside
    it in the luma and chroma planes."""
    import torch.nn.functional as F

    from kensa_vl.modeling.search_kensa_vl import nearest_distances
    from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder

    ratios = {}
    for planes in (["luma", "chroma"], ["contrast"]):
        encoder = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6], "planes": planes})
        cells = lambda x: F.normalize(encoder(x), dim=-1).view(1, 16, 16, -1)  # noqa: B023, E731
        bank = torch.cat([cells(_texture(seed)).flatten(0, 2) for seed in range(4)])
        good, softened = (nearest_distances(cells(x), bank).max() for x in (_texture(10), _softened(10)))
        ratios[planes[0]] = (softened / good).item()
    assert ratios["contrast"] > 10 and ratios["luma"] < 1.5, ratios


def test_log_colour_ratios_see_a_yellowing_on_a_dark_surface_as_on_a_pale_one():
    """The "logchroma" plane (log R/G, log B/G): the same yellowing (a fifth of the blue taken away over a soft
    blotch) lies as far outside the good photos' spread on a dark brown surface as on a pale one; in Cb and Cr it
    moves with the brightness, and the dark surface's hides it."""
    import torch.nn.functional as F

    from kensa_vl.modeling.search_kensa_vl import nearest_distances
    from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder

    def surface(seed, tone, yellowed=0.0):
        x = _texture(seed) * torch.tensor(tone).view(1, 3, 1, 1) / 0.5  # the grey texture, coloured
        yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
        x[:, 2] *= 1 - yellowed * torch.exp(-((yy - 60) ** 2 + (xx - 50) ** 2) / (2 * 12.0**2))
        return x.clamp(0, 1)

    ratios = {}
    for planes in (["chroma"], ["logchroma"]):
        encoder = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6], "planes": planes})
        cells = lambda x: F.normalize(encoder(x), dim=-1).view(1, 16, 16, -1)  # noqa: B023, E731
        for name, tone in (("dark", (0.25, 0.15, 0.1)), ("pale", (0.8, 0.75, 0.65))):
            bank = torch.cat([cells(surface(seed, tone)).flatten(0, 2) for seed in range(4)])
            good, yellowed = (nearest_distances(cells(surface(10, tone, y)), bank).max() for y in (0.0, 0.2))
            ratios[planes[0], name] = (yellowed / good).item()
    assert ratios["logchroma", "dark"] > 10 and ratios["logchroma", "dark"] > 0.5 * ratios["logchroma", "pale"], ratios
    assert ratios["chroma", "dark"] < 0.25 * ratios["chroma", "pale"], ratios


def test_bandpass_planes_set_the_channels_and_are_checked():
    """`planes` picks what is band-passed; the config's hidden size follows; a plane that does not exist is named."""
    from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig
    from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder
    from kensa_vl.train.build import contrast_encoder, with_compared

    x = _texture(0)
    default = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6]})(x)
    every = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6], "planes": ["luma", "chroma", "contrast"]})(x)
    assert default.shape == (1, 256, 7) and every.shape == (1, 256, 9)
    torch.testing.assert_close(every[..., [0, 1, 2, 4, 5, 6, 8]], default)  # luma and chroma as before, per sigma
    with pytest.raises(ValueError, match=r"planes must be distinct names of .*, got \['gloss'\]"):
        KensaVLBandPassEncoder({"patch_size": 7, "sigmas": [3, 6], "planes": ["gloss"]})
    entry = contrast_encoder(112)
    config = KensaVLConfig(vision_encoders=[entry], tile_size=112)
    assert config.vision_encoders[0]["config"]["hidden_size"] == 3  # one plane at two sigmas, then the constant
    assert [e["name"] for e in with_compared([], ["dct", "contrast"], 112)] == ["dct", "contrast"]


def test_reference_views_turn_the_dct_cells_but_not_the_band_pass_cells():
    """A flipped or turned tile's band-pass cells are its cells, moved (`view_invariant`), so the bank holds them
    once; the DCT cells, which see orientation, get every view."""
    from kensa_vl.modeling.comparison_kensa_vl import reference_view
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True,
        reference_encoders=["dct", "bandpass"], reference_views=["hflip", "rot90"],
    )  # fmt: skip
    pixels = processor.image_processor([random_image(224, 224, 3)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        bank = model.model.reference_cells(pixels)
        grids = model.model.image_grids(pixels, ["bandpass"])["bandpass"].permute(0, 3, 1, 2)
        for view in ("hflip", "vflip", "rot90", "rot270"):
            turned = model.model.image_grids(reference_view(pixels, view), ["bandpass"])["bandpass"]
            torch.testing.assert_close(turned.permute(0, 3, 1, 2), reference_view(grids, view), atol=1e-6, rtol=0)
    cells = len(pixels) * 16 * 16  # 5 tiles of 16 x 16 cells
    assert len(bank["bandpass"]) == cells and len(bank["dct"]) == 3 * cells


@pytest.mark.parametrize(
    ("compared", "dtype"),
    [(["dct"], torch.float32), (["dct", "bandpass"], torch.float32), (["dct", "bandpass"], torch.bfloat16)],
)
def test_the_untrained_verdict_is_defective_when_one_compared_encoder_sees_the_defect(compared, dtype):
    """Each compared encoder's score is measured against its own level (how far the good supports lie from each
    other in it), and the verdict starts from the largest: the smear the DCT cells miss is caught once the band-pass
    cells are compared beside them, and a good photo stays good. The same in bf16, as on a GPU."""
    from kensa_vl.eval.inspector import Inspector, support_item
    from kensa_vl.train.build import build_tiny

    def photo(seed, blotch=0.0):
        return Image.fromarray((_texture(seed, blotch, 224)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))

    model, processor = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True, reference_encoders=compared
    )
    inspector = Inspector(model.to(dtype), processor, max_new_tokens=0)
    inspector.set_support([support_item(photo(seed)) for seed in range(4)])
    assert inspector._bank.levels.shape == (len(compared),)
    good, smear = inspector.judge([photo(10), photo(11, 0.1)])
    assert good.verdict == "good"
    assert smear.verdict == ("defective" if "bandpass" in compared else "good")


def test_the_band_pass_cells_place_the_box_of_a_smear_only_they_see():
    """Every compared encoder places the box, each against its own level (`distance_map`; on both validation sets
    boxes hit more often so, docs/reference-comparison.md): the smear that only the band-pass cells see is boxed
    where it is. An entry that says `locate: false` is left out of the heatmap: the DCT cells alone then put it
    elsewhere, as a model that compares only them does."""
    from kensa_vl.eval.inspector import Inspector, support_item
    from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
    from kensa_vl.train.build import build_tiny

    def photo(seed, blotch=0.0):
        return Image.fromarray((_texture(seed, blotch, 224)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))

    model, processor = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True, reference_encoders=["dct"]
    )
    both = model.config.to_dict()
    both["reference_encoders"] = ["dct", "bandpass"]
    judged = {}
    for name in ("dct", "both", "both, bandpass not locating"):
        config = model.config if name == "dct" else type(model.config).from_dict(both)
        if name.endswith("not locating"):
            next(entry for entry in config.vision_encoders if entry["name"] == "bandpass")["locate"] = False
        torch.manual_seed(0)
        inspector = Inspector(KensaVLForConditionalGeneration(config).eval(), processor, max_new_tokens=0)
        inspector.set_support([support_item(photo(seed)) for seed in range(4)])
        judged[name] = inspector.judge([photo(11, 0.1)])[0]
    centre = (0.45 * 224, 0.55 * 224)  # the blotch's, `_texture`

    def holds(box):
        return box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3]

    assert judged["both"].verdict == "defective" and len(judged["both"].boxes) == 1
    assert holds(judged["both"].boxes[0])
    peak = np.unravel_index(np.argmax(judged["both"].heatmap), judged["both"].heatmap.shape)
    assert abs(peak[0] - centre[1]) < 30 and abs(peak[1] - centre[0]) < 30
    left_out = judged["both, bandpass not locating"]
    np.testing.assert_allclose(left_out.heatmap, judged["dct"].heatmap, atol=1e-5)
    assert not holds(left_out.boxes[0])


def test_a_sharp_defect_is_boxed_on_the_dct_cells_that_found_it():
    """The box is cut from the map of the encoder that found the defect (`finder`): a small dark square, which the
    DCT cells flag by themselves, is boxed on their map alone, as tightly as a model that compares only them would
    box it, while the heatmap shows every encoder's cells (the band-pass cells spread it over its surround)."""
    from kensa_vl.eval.inspector import Inspector, support_item
    from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
    from kensa_vl.train.build import build_tiny

    def photo(seed, square=False):
        x = _texture(seed, 0.0, 224)
        if square:
            x[..., 100:114, 60:74] *= 0.3
        return Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))

    model, processor = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True, reference_encoders=["dct"]
    )
    both = model.config.to_dict()
    both["reference_encoders"] = ["dct", "bandpass"]
    judged = {}
    for name, config in (("dct", model.config), ("both", type(model.config).from_dict(both))):
        torch.manual_seed(0)
        inspector = Inspector(KensaVLForConditionalGeneration(config).eval(), processor, max_new_tokens=0)
        inspector.set_support([support_item(photo(seed)) for seed in range(4)])
        judged[name] = inspector.judge([photo(11, square=True)])[0]
        comparison = inspector.model.model.reference_comparison
    assert judged["both"].verdict == judged["dct"].verdict == "defective"
    assert judged["both"].boxes == judged["dct"].boxes
    x0, y0, x1, y1 = judged["both"].boxes[0]
    assert x0 <= 60 and x1 >= 74 and y0 <= 100 and y1 >= 114 and (x1 - x0) * (y1 - y0) < 4 * 14 * 14
    assert np.abs(judged["both"].heatmap - judged["dct"].heatmap).max() > 0.1
    assert comparison.encoders == ["dct", "bandpass"]


def test_anomaly_labels_follow_the_mask_into_tiles_and_tokens(tiny_dct):
    _, processor = tiny_dct
    mask = np.zeros((224, 224), np.uint8)
    mask[120:130, 10:20] = 255  # bottom-left tile (rows 112..223, columns 0..111), its token row 0, column 0
    batch = processor.image_processor([random_image(224, 224), random_image(224, 224)], return_tensors="pt")
    labels = processor.image_processor.anomaly_labels([Image.fromarray(mask), None], batch["image_grid"], 4)
    assert labels.shape == (10, 16)
    first = labels[:5].reshape(5, 4, 4)
    assert first[2, 0, 0] == 1 and first[2].sum() == 1  # the tile and the token that hold the defect
    assert first[[0, 1, 3]].sum() == 0
    assert first[4, 2, 0] == 1  # the thumbnail sees it at half scale: rows 60..65, columns 5..10
    assert (labels[5:] == -1).all()  # no mask: unknown, not "good"
    with pytest.raises(ValueError, match="1 masks were given for 2 images"):
        processor.image_processor.anomaly_labels([None], batch["image_grid"], 4)


def test_collator_gives_anomaly_labels_and_the_model_learns_from_them(tiny_dct, synth_dir):
    from kensa_vl.train.data.conversations import episode_conversations
    from kensa_vl.train.data.synth import load_synth
    from kensa_vl.train.sft import KensaCollator

    model, processor = tiny_dct
    items, episodes = load_synth(synth_dir)
    rows = episode_conversations(items["train"], episodes["train"])
    collator = KensaCollator(processor, max_length=None, assistant_only_loss=True, token_side=model.config.token_side)
    batch = collator([rows[i] for i in range(4)])
    labels = batch.pop("anomaly_labels")
    assert labels.shape == (batch["pixel_values"].shape[0], 16) and set(labels.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        plain = model(**batch).loss
        both = model(**batch, anomaly_labels=labels).loss
        out = model(**batch)
    known = ~out.anomaly_map.isnan()
    assert known.any() and both > plain  # the map's loss is added where there are references
    with pytest.raises(ValueError, match="anomaly_labels must be"):
        model(**batch, anomaly_labels=labels[:-1])


def test_interleaved_encoders_get_the_comparison_on_each_token_of_a_position(synth_dir):
    """With `fusion="interleave"` a tile has one token per encoder at each position: the map and its targets are per
    position, and every encoder's token of a position gets the same comparison embedding."""
    from kensa_vl.train.build import build_tiny
    from kensa_vl.train.data.conversations import episode_conversations
    from kensa_vl.train.data.synth import load_synth
    from kensa_vl.train.sft import KensaCollator

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True, fusion="interleave")
    side, streams = model.config.token_side, len(model.config.vision_encoders)
    assert model.config.tokens_per_tile == streams * side * side == 3 * 16
    items, episodes = load_synth(synth_dir)
    rows = episode_conversations(items["train"], episodes["train"])
    collator = KensaCollator(processor, max_length=None, assistant_only_loss=True, token_side=side)
    batch = collator([rows[i] for i in range(2)])
    labels = batch.pop("anomaly_labels")
    assert labels.shape == (batch["pixel_values"].shape[0], side * side)
    comparison = model.model.reference_comparison
    torch.nn.init.normal_(comparison.embed[-1].weight)  # trained: the embedding is no longer zero
    with torch.no_grad():
        out = model(**batch, anomaly_labels=labels)
        plain = model.model.project_grids(model.model.image_grids(batch["pixel_values"]))
    assert out.anomaly_map.shape == labels.shape and torch.isfinite(out.loss)
    added = (out.image_hidden_states - plain).view(len(plain), side * side, streams, -1)
    compared = ~out.anomaly_map.isnan().all(1)
    assert added[compared].abs().amax() > 0 and not added[~compared].any()
    torch.testing.assert_close(added[:, :, 1:], added[:, :, :1].expand_as(added[:, :, 1:]))


def test_reference_views_let_a_flipped_or_turned_photo_match_its_reference(tiny_dct, monkeypatch):
    """With `reference_views`, a query that is the reference flipped (or turned) finds every cell in the bank: its
    kNN score drops to the floor; without them it is far. Bad views are named."""
    from kensa_vl.modeling.comparison_kensa_vl import reference_view
    from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig

    model, processor = tiny_dct
    tiles = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(
        reference_view(tiles, "rot270"), reference_view(reference_view(tiles, "rot90"), "rot180")
    )
    reference = random_image(224, 224, 3)
    scores = {}
    for view, query in (("hflip", reference.transpose(Image.FLIP_LEFT_RIGHT)), ("rot90", reference.rotate(90))):
        batch = processor(text="<image> <image>", images=[reference, query], return_tensors="pt")
        for views in ([], [view]):
            monkeypatch.setattr(model.config, "reference_views", views)
            with torch.no_grad():
                scores[view, bool(views)] = model(**batch).image_scores[1].max().item()  # every encoder
    for view in ("hflip", "rot90"):
        assert scores[view, True] < np.log(1e-3) < scores[view, False]
    with pytest.raises(ValueError, match=r"reference_views must be distinct views of .*\['mirror'\]"):
        KensaVLConfig(**{**model.config.to_dict(), "reference_views": ["mirror"]})


def test_untrained_comparison_starts_as_patchcore_and_changes_no_visual_token(tiny_dct):
    """`_init_weights` reaches the comparison's layers (5.x skips custom modules without parameters of their own):
    the map starts as the mean log-distance, the per-token residuals at zero."""
    model, processor = tiny_dct
    comparison = model.model.reference_comparison
    weight = comparison.linear.weight
    assert torch.equal(weight, torch.full_like(weight, 1 / weight.shape[1]))
    images = [random_image(224, 224, s) for s in (1, 2)]
    batch = processor(text="<image> <image>", images=images, return_tensors="pt")
    with torch.no_grad():
        grids = model.model.image_grids(batch["pixel_values"])
        base = model.model.project_grids(grids)
        compared = comparison.compare_prompt(
            base, grids, batch["input_ids"], batch["image_grid"], batch["pixel_values"], model.model.reference_cells
        )
        out, anomaly = base + compared.token_embeddings, compared.anomaly_map
        features = comparison.features(grids)
        query = {name: f[5:] for name, f in features.items()}
        bank = {name: f[:5].reshape(-1, f.shape[-1]) for name, f in features.items()}
        expected = comparison.distances(query, bank)[0].mean(-1)
    torch.testing.assert_close(out, base)
    torch.testing.assert_close(anomaly[5:], expected)


def test_untrained_comparison_ranks_a_defect_like_patchcore(tiny_dct):
    """Before any training the map already says where the query differs from its references."""
    model, processor = tiny_dct
    rng = np.random.default_rng(0)
    texture = rng.integers(90, 110, (224, 224, 3), dtype=np.uint8)
    query = texture.copy()
    query[40:60, 150:170] = 20  # a dark spot in the top-right tile
    images = [Image.fromarray(texture), Image.fromarray(query)]
    batch = processor(text="<image> <image>", images=images, return_tensors="pt")
    with torch.no_grad():
        anomaly = model(**batch).anomaly_map[5:10]  # the query's 5 tiles
    assert anomaly.isnan().sum() == 0
    assert anomaly[1].max() > anomaly[[0, 2, 3]].max()  # the top-right tile holds the highest score


def test_trainer_adds_the_anomaly_verdict_and_pointer_losses_that_trl_drops(tiny_dct, synth_dir, tmp_path):
    """TRL 1.16 builds its loss from log-probabilities of its own LM head: it ignores `outputs.loss`, the verdict
    odds and the copied names; KensaTrainer adds the map's loss, the verdict's and the pointer's."""
    from trl import SFTConfig, SFTTrainer

    from kensa_vl.modeling.demos_kensa_vl import Pointer, copy_terms
    from kensa_vl.train.data.conversations import episode_conversations
    from kensa_vl.train.data.synth import load_synth
    from kensa_vl.train.sft import KensaCollator, KensaTrainer

    model, processor = tiny_dct
    items, episodes = load_synth(synth_dir)
    rows = episode_conversations(items["train"], episodes["train"])
    collator = KensaCollator(processor, max_length=None, assistant_only_loss=True, token_side=model.config.token_side)
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[], max_length=None, remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, activation_checkpointing=False)  # fmt: skip
    trainer = KensaTrainer(
        model=model, args=args, train_dataset=rows, processing_class=processor, data_collator=collator
    )
    batch = collator([rows[i] for i in range(4)])
    ours = trainer.compute_loss(model, dict(batch))
    comparison, words = model.model.reference_comparison, model.config.verdict_token_ids
    with torch.no_grad():
        trl = SFTTrainer.compute_loss(trainer, model, dict(batch))
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        # the verdict's loss: the two verdict words' cross-entropy at each answer's start, read off the full logits
        # that inference uses (the language model's odds plus the verdict's, `set_verdict_odds`)
        rows_, cols, _ = comparison.verdict_positions(batch["input_ids"][:, :-1], list(out.summaries))
        pairs = out.logits[torch.tensor(rows_), torch.tensor(cols)][:, words]
        target = (batch["input_ids"][torch.tensor(rows_), torch.tensor(cols) + 1] == words[1]).long()
        verdict = torch.nn.functional.cross_entropy(pairs, target)
        # the pointer's loss: the answer's name tokens under the pointer-generator's mix, read off the same logits
        # (the copied box's tokens are not trained: its gate is fixed)
        ids = batch["input_ids"]
        names = [Pointer(p.row, p.start, p.names, p.logits, p.gate) for p in comparison.pointers(ids, out.summaries)]
        named = [
            (p.row, t)
            for p in names
            if p.names
            for t in range(p.start + 1, ids.shape[1] - 1)
            if copy_terms(p, ids[p.row, p.start + 1 : t + 1].tolist(), model.config) is not None
        ]
        at, col = map(torch.tensor, zip(*named, strict=True))
        pointer = -out.logits[at, col].log_softmax(-1).gather(-1, ids[at, col + 1][:, None]).mean()
    assert out.anomaly_loss > 0 and len(rows_) == 4  # one answer per episode
    assert len(set(at.tolist())) >= 1  # an episode whose query's defect type a named example shows
    torch.testing.assert_close(ours.detach(), trl + out.anomaly_loss + verdict + pointer)
    linear, head = comparison.linear.weight, comparison.verdict.weight
    linear.grad = head.grad = None
    ours.backward()  # the map and the verdict learn from the same pass (no second, gradient-free forward)
    assert linear.grad is not None and linear.grad.abs().sum() > 0
    assert head.grad is not None and head.grad.abs().sum() > 0
    model.zero_grad()


def _one_cell_changed(tiny_dct, change):
    """The comparison's token log-distances `(tiles, tokens, PER_ENCODER * E)` of a photo against itself with one
    interior cell of its first tile replaced by `change(cell)` in every compared encoder."""
    model, processor = tiny_dct
    comparison = model.model.reference_comparison
    batch = processor.image_processor([random_image(224, 224, 1)], return_tensors="pt")
    with torch.no_grad():
        features = comparison.features(model.model.image_grids(batch["pixel_values"]))
        bank = {name: f.reshape(-1, f.shape[-1]) for name, f in features.items()}
        query = {name: f.clone() for name, f in features.items()}
        for f in query.values():
            f[0, 5, 5] = change(f[0, 5, 5])
        return comparison.distances(query, bank)[0]


def test_a_one_cell_defect_shows_in_the_farthest_cell_not_diluted_by_the_mean(tiny_dct):
    """Each token reads the 3x3 mean distance and the farthest single cell under it: a query identical to its
    reference except for one cell is 9x farther there by the farthest cell than by the mean."""
    from kensa_vl.modeling.locate_kensa_vl import LOG_FLOOR

    comparison = tiny_dct[0].model.reference_comparison
    x = _one_cell_changed(tiny_dct, lambda cell: -cell)  # the cell points the other way
    mean, far = x[..., 0], x[..., 2]  # the first encoder's 3x3 mean and farthest cell (logs)
    assert comparison.PER_ENCODER == 4 and x.shape[-1] == 4 * len(comparison.encoders)
    assert far.max() - mean.max() == pytest.approx(np.log(9), abs=1e-4)
    assert far[1:].max() <= np.log(LOG_FLOOR) + 1e-6  # the other tiles match their reference exactly


def test_small_distances_keep_their_order_above_the_log_floor(tiny_dct):
    """The band-pass cells' cosine distances lie at 1e-5-1e-3: a query whose one cell is turned by a small angle
    reads as farther than one turned by half that angle (under a floor of 1e-4, both read as the floor)."""
    import torch.nn.functional as F

    def turned(angle):
        def change(cell):
            turn = torch.randn(cell.shape, generator=torch.Generator().manual_seed(0))
            turn = F.normalize(turn - (turn @ cell) * cell, dim=0)
            return cell * np.cos(angle) + turn * np.sin(angle)

        return change

    far = [_one_cell_changed(tiny_dct, turned(angle))[..., 2].max().item() for angle in (2e-3, 4e-3)]
    assert far[1] - far[0] == pytest.approx(np.log(4), abs=0.1)  # cosine distances 2e-6 and 8e-6


def test_the_image_summary_reads_the_grid_tiles_not_the_thumbnail(tiny_dct):
    from kensa_vl.modeling.comparison_kensa_vl import scored_tiles

    assert scored_tiles(torch.tensor([False, False, True])).tolist() == [True, True, False]
    assert scored_tiles(torch.tensor([False])).tolist() == [True]  # one tile, no grid: that tile
    model, processor = tiny_dct
    comparison = model.model.reference_comparison
    batch = processor.image_processor([random_image(224, 224, s) for s in (1, 2)], return_tensors="pt")
    with torch.no_grad():
        features = comparison.features(model.model.image_grids(batch["pixel_values"]))
        bank = {name: f[:5].reshape(-1, f.shape[-1]) for name, f in features.items()}
        query = {name: f[5:] for name, f in features.items()}
        other = {name: torch.cat([f[5:9], f[:1]]) for name, f in features.items()}  # another thumbnail
        thumbnail = torch.tensor([False] * 4 + [True])
        _, logits, summary, _, score, _ = comparison(query, thumbnail, bank)
        _, other_logits, other_summary, _, other_score, _ = comparison(other, thumbnail, bank)
    assert not torch.allclose(logits[4], other_logits[4])  # the thumbnail's own map changes ...
    # ... the image's summary does not (up to the thumbnail's share in the per-image median the features are over)
    torch.testing.assert_close(summary, other_summary, atol=1e-4, rtol=1e-3)
    assert torch.equal(score, other_score)


def test_peak_region_box_grows_from_the_peak_through_cells_above_the_threshold():
    from kensa_vl.modeling.locate_kensa_vl import peak_region_box

    cells = torch.zeros(8, 16)
    cells[2:5, 10:14] = 1.0  # the defect: rows 2..4, columns 10..13
    cells[3, 12] = 2.0  # its peak
    cells[6, 1] = 1.5  # a separate bright cell that is not connected to the peak
    box, peak = peak_region_box(cells, threshold=0.5)
    assert box == pytest.approx([10 / 16, 2 / 8, 14 / 16, 5 / 8]) and peak == 2.0
    cells[5, 14] = 1.0  # touches the defect's corner: 8-connected, so it joins
    assert peak_region_box(cells, 0.5)[0] == pytest.approx([10 / 16, 2 / 8, 15 / 16, 6 / 8])
    assert peak_region_box(cells, 5.0)[0] == pytest.approx([12 / 16, 3 / 8, 13 / 16, 4 / 8])  # nothing passes


def test_peak_region_box_joins_the_pieces_of_a_defects_seams():
    """A pasted square differs at its seams, which break into pieces: a nearby piece about as far from the supports
    as the peak joins the region; a nearby weak one or a strong one far away does not."""
    from kensa_vl.modeling.locate_kensa_vl import peak_region_box

    cells = torch.zeros(32, 32)
    cells[10, 10:16] = 2.0  # the square's top seam, with the peak
    cells[10, 12] = 2.2
    cells[13:18, 18] = 1.9  # its right seam, two cells away from the top one's end: joins
    box, _ = peak_region_box(cells, threshold=0.5)
    assert box == pytest.approx([10 / 32, 10 / 32, 19 / 32, 18 / 32])
    cells[13:18, 18] = 1.0  # the same piece, far less far from the supports than the peak: stays out
    assert peak_region_box(cells, 0.5)[0] == pytest.approx([10 / 32, 10 / 32, 16 / 32, 11 / 32])
    cells[13:18, 18] = 0.0
    cells[25:28, 25] = 2.1  # strong, but ten cells away
    assert peak_region_box(cells, 0.5)[0] == pytest.approx([10 / 32, 10 / 32, 16 / 32, 11 / 32])


def test_locate_box_measures_each_encoder_against_its_own_level():
    """Encoders' log-distances lie on different scales: a cell far for the DCT cells (its level -3) is the defect,
    not a band-pass cell that is 3 above the DCT cells' level but below its own (-6), however the mean of the two
    maps ranks them. Band-pass excess counts at its scale and margin, as in the verdict."""
    from kensa_vl.modeling.locate_kensa_vl import distance_map, locate_box

    dct, bandpass = torch.full((4, 4, 4), math.exp(-3.2)), torch.full((4, 4, 4), 1e-4)  # 2 x 2 tiles of 4 x 4 cells
    dct[0, 1:3, 1:3] = math.exp(-2.0)  # the defect: 1 above the DCT level, top-left tile
    bandpass[3, 3, 3] = math.exp(-6.5)  # bottom-right corner: 2.7 above the band-pass floor, 0.5 below its level
    excess = [(1.0, 0.0), (0.5, 0.5)]
    box, peak = locate_box([dct, bandpass], 2, 2, torch.tensor([-3.0, -6.0]), excess)
    assert box == pytest.approx([1 / 8, 1 / 8, 3 / 8, 3 / 8]) and peak == pytest.approx(1.0)
    cells = distance_map([dct, bandpass], 2, 2, [-3.0, -6.0], excess)
    assert cells[7, 7].item() == pytest.approx(max(-0.2, (-6.5 + 6.0) * 0.5 - 0.5))  # the larger of its two
    # one level for every encoder (PatchCore's threshold) and, without levels, each map's own median
    assert locate_box([dct, bandpass], 2, 2, -3.0)[0] == pytest.approx([1 / 8, 1 / 8, 3 / 8, 3 / 8])
    assert distance_map([dct], 2, 2).median().item() == pytest.approx(0.0)


def test_stitch_tiles_puts_each_tile_where_the_processor_cut_it(tiny_dct):
    from kensa_vl.modeling.locate_kensa_vl import stitch_tiles

    _, processor = tiny_dct
    image = np.zeros((224, 448, 3), np.uint8)  # 2 x 4 tiles of 112 px: the value of each pixel is its tile's
    for tile in range(8):
        row, col = divmod(tile, 4)
        image[row * 112 : (row + 1) * 112, col * 112 : (col + 1) * 112] = tile * 30
    batch = processor.image_processor([Image.fromarray(image)], max_tiles=8, return_tensors="pt")
    rows, cols, tiles = batch["image_grid"][0].tolist()
    assert (rows, cols, tiles) == (2, 4, 9)
    cells = batch["pixel_values"][:, 0, ::7, ::7]  # (tiles, 16, 16): a 7 px cell map of the red channel
    stitched = stitch_tiles(cells, rows, cols)
    assert stitched.shape == (32, 64)
    expected = torch.from_numpy(image[::7, ::7, 0] / 255.0).float()
    torch.testing.assert_close(stitched, expected)


def test_locate_finds_a_defect_against_good_references_before_any_training(tiny_dct):
    """The comparison's map gives the box (the untrained DCT encoder has no weights to learn): a dark spot in the
    lower-right tile of a 2 x 2 grid is boxed there, in the query's pixel fractions, cached or recomputed, from the
    forward pass's distances as from `locate` comparing again."""
    from kensa_vl.eval.inspector import Inspector, pixel_box, support_item

    model, processor = tiny_dct
    rng = np.random.default_rng(0)
    stripes = 100 + 40 * np.sin(np.arange(224) / 4)[None, :, None]  # a product's regular texture, photographed
    photos = [np.clip(stripes + rng.normal(0, 2, (224, 224, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    query = photos.pop()
    query[150:178, 130:165] = 20  # x 130..164, y 150..177
    support = [support_item(Image.fromarray(photo)) for photo in photos]
    boxes, heatmaps = {}, {}
    for cache in (True, False):
        inspector = Inspector(model, processor, cache=cache, max_new_tokens=0)
        inspector.set_support(support)
        inputs, out = inspector._score(Image.fromarray(query))
        evidence = inspector._evidence(inputs, Image.fromarray(query), "defective", out.reference_distances[-1])
        boxes[cache], heatmaps[cache] = evidence["boxes"], evidence["heatmap"]
        assert inspector.judge(Image.fromarray(query))[0].heatmap.shape == (224, 224)
        grid = inputs["image_grid"][-1:]  # `locate` compares the query again
        box, _ = model.model.locate(inputs["pixel_values"][-int(grid[0, 2]) :], grid, inspector._bank)
        assert [pixel_box(box, 224, 224)] == boxes[cache]
    assert boxes[True] == boxes[False]
    np.testing.assert_allclose(heatmaps[True], heatmaps[False], atol=1e-4)
    peak_y, peak_x = np.unravel_index(heatmaps[True].argmax(), heatmaps[True].shape)  # the heatmap's peak: the spot
    assert 120 <= peak_x < 175 and 140 <= peak_y < 188
    assert heatmaps[True][150:178, 130:165].mean() > np.percentile(heatmaps[True], 90)
    (x0, y0, x1, y1), true = boxes[True][0], (130, 150, 165, 178)
    inter = max(0, min(x1, true[2]) - max(x0, true[0])) * max(0, min(y1, true[3]) - max(y0, true[1]))
    union = (x1 - x0) * (y1 - y0) + 35 * 28 - inter
    assert inter / union >= 0.5, (boxes[True], true)
    # the training-free baseline boxes it with the same rule on the same distances
    from kensa_vl.eval.baseline import PatchCore

    baseline = PatchCore(model, processor)
    baseline.set_support(support)
    judged = baseline.judge([Image.fromarray(query), Image.fromarray(photos[0])])
    assert [j.verdict for j in judged] == ["defective", "good"]
    assert judged[0].boxes == boxes[True] and judged[1].boxes == []
    grid = processor.image_processor([Image.fromarray(query)], return_tensors="pt")
    with pytest.raises(ValueError, match="locate takes one image"):
        model.model.locate(grid["pixel_values"][:2], grid["image_grid"], inspector._bank)


def test_the_baseline_boxes_each_encoder_against_its_own_level(synth_dir):
    """With encoders whose distances lie on different scales (DCT, band-pass and contrast cells), the kNN baseline's
    box is cut from each encoder's map against that encoder's own leave-one-out level: a leather's defects are boxed,
    none by the whole photo (one level for all encoders boxed two of these five whole)."""
    from kensa_vl.eval.baseline import PatchCore
    from kensa_vl.eval.inspector import support_item
    from kensa_vl.eval.metrics import box_iou
    from kensa_vl.train.build import build_tiny
    from kensa_vl.train.data.synth import load_synth

    test = load_synth(synth_dir)[0]["test"]
    rows = [i for i, category in enumerate(test["category"]) if category == "leather"]
    good = [i for i in rows if test[i]["label"] == "good"][:4]
    compared = ["dct", "bandpass", "contrast"]
    model, processor = build_tiny(tile_size=112, max_tiles=4, dct=True, bandpass=True, contrast=True,
                                  reference_comparison=True, reference_encoders=compared)  # fmt: skip
    baseline = PatchCore(model.eval(), processor)
    baseline.set_support([support_item(test[i]["image"]) for i in good])
    assert baseline.levels.shape == (3,)
    hits = 0
    for i in [i for i in rows if test[i]["label"] == "defective"][:5]:
        (judged,) = baseline.judge([test[i]["image"]])
        width, height = test[i]["image"].size
        for x0, y0, x1, y1 in judged.boxes:
            assert (x1 - x0) * (y1 - y0) < width * height / 2, (i, judged.boxes)
        hits += bool(judged.boxes) and box_iou(judged.boxes[0], test[i]["boxes"][0]) >= 0.5
    assert hits >= 3


def test_nearest_distances_in_blocks_equal_the_full_matrix():
    import torch.nn.functional as F

    from kensa_vl.modeling.search_kensa_vl import nearest_distances

    torch.manual_seed(0)
    query, bank = F.normalize(torch.randn(3, 5, 5, 8), dim=-1), F.normalize(torch.randn(50, 8), dim=-1)
    full = (1 - query.reshape(-1, 8) @ bank.T).amin(-1).clamp_min(0).view(3, 5, 5)
    for chunk in (7, 16, 4096):  # blocks that split rows and bank unevenly, and one block
        torch.testing.assert_close(nearest_distances(query, bank, chunk=chunk), full)


def _clustered_cells(count: int, seed: int) -> torch.Tensor:
    """Unit cells around 64 directions, as a texture's patches lie: (count, 16)."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    pick = torch.randint(0, 64, (count,), generator=generator)
    return F.normalize(centres[pick] + 0.15 * torch.randn(count, 16, generator=generator), dim=-1)


def test_the_approximate_search_finds_the_exact_neighbours_it_probes():
    from kensa_vl.modeling.search_kensa_vl import LIST_CELLS, nearest_distances

    bank, query = _clustered_cells(32 * LIST_CELLS, 1), _clustered_cells(2048, 2).view(8, 16, 16, 16)
    exact = nearest_distances(query, bank)
    everything = nearest_distances(query, bank, probes=32)  # every list probed: the exact search
    torch.testing.assert_close(everything, exact)
    approximate = nearest_distances(query, bank, probes=4)
    assert (approximate >= exact - 1e-6).all()  # a missed neighbour only makes a cell look farther
    assert (approximate - exact).abs().lt(1e-6).float().mean() > 0.97  # 4 of 32 lists find nearly every neighbour
    assert not torch.equal(nearest_distances(query, bank, probes=1), exact)  # one list does miss some
    torch.testing.assert_close(nearest_distances(query, bank, probes=4), approximate)  # seeded: the same lists
    small = bank[: 4 * LIST_CELLS]  # a bank of no more lists than probes is searched exactly
    torch.testing.assert_close(nearest_distances(query, small, probes=4), nearest_distances(query, small))


def test_a_coreset_covers_every_cluster_of_cells_and_keeps_its_share():
    import torch.nn.functional as F

    from kensa_vl.modeling.search_kensa_vl import coreset, exact_similarity

    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(64, 16, generator=generator), dim=-1)
    owner = torch.cat([torch.zeros(2048, dtype=torch.long), torch.arange(64).repeat(32)])  # one cluster holds half
    cells = F.normalize(centres[owner] + 0.01 * torch.randn(len(owner), 16, generator=generator), dim=-1)
    torch.testing.assert_close(coreset(cells, 1.0), cells)  # every cell, in order
    kept = coreset(cells, 64 / len(cells))  # one per round: PatchCore's greedy k-center
    rows = (kept @ cells.T).argmax(-1)
    assert torch.equal(cells[rows], kept)  # cells themselves, not centroids
    assert sorted(owner[rows].tolist()) == list(range(64))  # one in every cluster, however small
    drawn = torch.randperm(len(cells), generator=generator)[:64]
    assert len(set(owner[drawn].tolist())) < 64  # which a random draw of as many misses
    assert (1 - exact_similarity(cells, kept)).max() < 0.01 < (1 - exact_similarity(cells, cells[drawn])).max()
    assert len(coreset(cells, 0.25)) == len(cells) // 4


def test_reference_coreset_is_checked(tiny_dct):
    from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig

    model, _ = tiny_dct
    for wrong in (0.0, 1.5):
        with pytest.raises(
            ValueError, match=rf"reference_coreset is the share of cells kept, in \(0, 1\]; got {wrong}"
        ):
            KensaVLConfig(**{**model.config.to_dict(), "reference_coreset": wrong})


def test_the_comparison_searches_approximately_beyond_exact_search_cells(tiny_dct, monkeypatch):
    from kensa_vl.modeling import comparison_kensa_vl, search_kensa_vl

    comparison = tiny_dct[0].model.reference_comparison
    calls = []
    search = search_kensa_vl.inverted_file_similarity
    monkeypatch.setattr(search_kensa_vl, "inverted_file_similarity", lambda *a: calls.append(1) or search(*a))
    bank, query = _clustered_cells(16 * 256, 3), _clustered_cells(512, 4).view(2, 16, 16, 16)
    monkeypatch.setattr(comparison.config, "exact_search_cells", len(bank))
    exact = comparison.nearest(query, bank)
    assert not calls
    monkeypatch.setattr(comparison.config, "exact_search_cells", len(bank) - 1)
    approximate = comparison.nearest(query, bank)  # 512 query cells, 1/8 of the bank: worth building the lists
    assert calls and (approximate >= exact - 1e-6).all()
    calls.clear()
    comparison.nearest(query[:, :8, :8], bank)  # 128 cells: building the lists would cost more than they save
    assert not calls
    # on a GPU the exact search is faster at any size: a bank off the CPU is searched exactly, in large blocks
    meta = comparison.nearest(query.to("meta"), bank.to("meta"))
    assert not calls and meta.shape == exact.shape
    assert comparison.bank_lists(comparison_kensa_vl.ReferenceBank({"dct": bank.to("meta")}, torch.zeros(0))) is None
    assert search_kensa_vl.search_chunk(torch.device("cuda")) > search_kensa_vl.search_chunk(bank.device)


def test_the_verdict_logit_sets_the_odds_where_the_answer_starts(tiny_dct):
    model, processor = tiny_dct
    words = model.config.verdict_token_ids
    images = [random_image(224, 224, s) for s in (1, 2, 3)]
    image, say = {"type": "image"}, lambda words: {"type": "text", "text": words}
    content = [image, say("good\n"), image, say("good"), say("Query:"), image, say("good or defective?")]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=images, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        verdict = model.model(**inputs).summaries[-1].verdict
        model.config.answer_prompt_ids = []  # the language model's logits alone
        try:
            plain = model(**inputs).logits
        finally:
            model.config.answer_prompt_ids = processor.tokenizer(
                "<|im_start|>assistant\n", add_special_tokens=False
            ).input_ids
    changed = (out.logits - plain).abs().amax(-1).nonzero().tolist()
    assert changed == [[0, inputs["input_ids"].shape[1] - 1]]  # the answer's start only
    last, lm = out.logits[0, -1, words], plain[0, -1, words]
    torch.testing.assert_close(last.logsumexp(0), lm.logsumexp(0))  # "good" and "defective" keep their share
    # the odds are the language model's plus the comparison's verdict
    torch.testing.assert_close(last[1] - last[0], lm[1] - lm[0] + verdict, atol=1e-4, rtol=1e-4)
    assert abs(verdict.item()) > 0.1


def test_in_training_the_verdict_odds_sit_before_the_answers_first_token(tiny_dct):
    model, processor = tiny_dct
    images = [random_image(224, 224, s) for s in (1, 2)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "good"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "defective: scratch at the top"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=text, images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        summaries = model.model(**inputs).summaries
        out = model(**inputs).logits
        words = model.config.verdict_token_ids
        answer = (ids == words[1]).nonzero().flatten()  # the answer's "defective"
        assert len(answer) == 1
        model.config.verdict_token_ids = []
        try:
            plain = model(**inputs).logits
        finally:
            model.config.verdict_token_ids = words
    assert (out - plain).abs().amax(-1)[0].nonzero().flatten().tolist() == [int(answer) - 1]
    assert len(summaries) == 1  # the second image, compared with the first


def test_a_banks_lists_are_built_once_and_search_as_lists_built_anew():
    from kensa_vl.modeling.comparison_kensa_vl import ReferenceBank
    from kensa_vl.modeling.search_kensa_vl import nearest_distances

    bank = ReferenceBank({"dct": _clustered_cells(32 * 256, 1)})
    lists = bank.inverted_lists("dct")
    assert bank.inverted_lists("dct") is lists and len(lists.sizes) == 32 and sum(lists.sizes) == 32 * 256
    query = _clustered_cells(512, 2).view(2, 16, 16, 16)
    cells = bank.cells["dct"]
    kept = nearest_distances(query, cells, probes=4, lists=lists)
    torch.testing.assert_close(kept, nearest_distances(query, cells, probes=4))  # seeded: the same lists


def test_pair_cache_gives_the_same_comparison_and_searches_a_pair_once(monkeypatch):
    """Training's `PairCache`: the search against several references is the max over pairs, so results equal the
    joint search; a prompt seen again searches nothing and makes no bank cells; the byte budget holds."""
    from kensa_vl.modeling.search_kensa_vl import PairCache
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True,
                                  reference_encoders=["dct"], reference_views=["hflip", "rot90"])  # fmt: skip
    images = [random_image(224, 224, s) for s in (1, 2, 3)]
    batch = processor(
        text=["<image> <image> <image>", "<image> <image> <image>"],
        images=[images, [images[1], images[0], images[2]]],
        return_tensors="pt",
    )
    comparison = model.model.reference_comparison
    with torch.no_grad():
        expected = model(**batch)
        comparison.pair_cache = cache = PairCache()
        first = model(**batch)
        pairs = cache.misses
        calls, encode = [], model.model.reference_cells
        monkeypatch.setattr(model.model, "reference_cells", lambda *a, **k: calls.append(1) or encode(*a, **k))
        again = model(**batch)
    # row 1: b~a, c~a, c~b; row 2: a~b, c~b, c~a: four distinct (query, reference) pairs, a hit for each repeat
    assert pairs == 4 and cache.hits == 2 + 6
    assert calls == []  # every pair known: no reference's bank cells made
    for out in (first, again):
        torch.testing.assert_close(out.image_scores, expected.image_scores, equal_nan=True)
        torch.testing.assert_close(out.logits, expected.logits)
    one = cache.get(next(iter(cache.pairs))).nbytes  # slabs of one pair's similarities, two slabs at most
    small = PairCache(max_bytes=2 * one, slab_bytes=one)
    comparison.pair_cache = small
    with torch.no_grad():
        out = model(**batch)
    assert len(small.pairs) == 2 and small.bytes <= small.max_bytes
    assert small.misses > 4  # a dropped pair is searched again when it comes back
    torch.testing.assert_close(out.logits, expected.logits)


def test_pair_cache_keeps_each_images_own_distances(monkeypatch):
    """An encoder compared with the photo itself (`own_window`: the band-pass cells) searches each image's own cells
    once while training's `PairCache` is set; the outputs equal those computed without it."""
    from kensa_vl.modeling import comparison_kensa_vl
    from kensa_vl.modeling.search_kensa_vl import PairCache
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True, bandpass=True,
                                  reference_encoders=["dct", "bandpass"], reference_views=[])  # fmt: skip
    assert model.model.reference_comparison.own_windows == [None, 0.2]
    images = [random_image(224, 224, s) for s in (1, 2, 3)]
    batch = processor(
        text=["<image> <image> <image>", "<image> <image> <image>"],
        images=[images, [images[1], images[0], images[2]]],
        return_tensors="pt",
    )
    calls, search = [], comparison_kensa_vl.own_nearest
    monkeypatch.setattr(comparison_kensa_vl, "own_nearest", lambda *a, **k: calls.append(1) or search(*a, **k))
    with torch.no_grad():
        expected = model(**batch)
        assert len(calls) == 4  # the second and third image of each row, without the cache
        model.model.reference_comparison.pair_cache = PairCache()
        first, again = model(**batch), model(**batch)
    assert len(calls) == 4 + 3  # a, b and c once each
    for out in (first, again):
        torch.testing.assert_close(out.image_scores, expected.image_scores, equal_nan=True)
        torch.testing.assert_close(out.logits, expected.logits)


def test_the_verdict_starts_from_the_largest_scaled_excess_over_each_encoders_level():
    """`VERDICT_SLOPE * (max_e(scale_e * (score_e - level_e) - margin_e) - VERDICT_MARGIN)`, with the band-pass
    entry's scale 0.5 and margin 0.25 (`train/build.py`) and the DCT entry's 1 and 0."""
    from kensa_vl.modeling.comparison_kensa_vl import VERDICT_MARGIN, VERDICT_SLOPE
    from kensa_vl.train.build import build_tiny

    model, processor = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True,
        reference_encoders=["dct", "bandpass"],
    )  # fmt: skip
    comparison = model.model.reference_comparison
    assert comparison.excess == [(1.0, 0.0), (0.5, 0.25)]
    batch = processor.image_processor([random_image(224, 224, s) for s in (1, 2)], return_tensors="pt")
    with torch.no_grad():
        features = comparison.features(model.model.image_grids(batch["pixel_values"], comparison.encoders))
        bank = {name: f[:5].flatten(0, 2) for name, f in features.items()}
        query = {name: f[5:] for name, f in features.items()}
        thumbnail = torch.tensor([False] * 4 + [True])
        for level in (torch.tensor([0.0, -9.0]), torch.tensor([-9.0, 0.0])):  # each encoder in turn the larger
            verdict, score = comparison(query, thumbnail, bank, level)[3:5]
            excess = torch.stack([score[0] - level[0], 0.5 * (score[1] - level[1]) - 0.25])
            torch.testing.assert_close(verdict, VERDICT_SLOPE * (excess.max() - VERDICT_MARGIN))


def _own_brute_force(surface: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Each cell of a unit map `(H, W, C)`: cosine distance to the nearest cell on the `stride` lattice at least
    `radius` cells away along a row or a column."""
    height, width, _ = surface.shape
    out = torch.full((height, width), 2.0)
    for y in range(height):
        for x in range(width):
            for v in range(0, height, stride):
                for u in range(0, width, stride):
                    if max(abs(y - v), abs(x - u)) >= radius:
                        out[y, x] = min(out[y, x], 1 - float(surface[y, x] @ surface[v, u]))
    return out.clamp_min(0)


def _tiles_of(surface: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A map `(rows * g, cols * g, C)` cut into its tiles `(rows * cols, g, g, C)`, row-major, as the processor cuts
    an image, plus a random thumbnail tile last."""
    g = surface.shape[0] // rows
    tiles = surface.reshape(rows, g, cols, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * cols, g, g, -1)
    return torch.cat([tiles, torch.nn.functional.normalize(torch.randn(1, g, g, surface.shape[-1]), dim=-1)])


def test_own_nearest_is_the_nearest_cell_of_the_photo_outside_the_window(monkeypatch):
    """Over the whole image (its tiles stitched), never within the window's half side (a fifth of 10 cells: 2), the
    thumbnail left out; a map larger than OWN_BANK_CELLS is compared with a coarser lattice of its cells."""
    import kensa_vl.modeling.comparison_kensa_vl as comparison
    from kensa_vl.modeling.comparison_kensa_vl import own_nearest
    from kensa_vl.modeling.locate_kensa_vl import stitch_tiles

    surface = torch.nn.functional.normalize(torch.randn(10, 15, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    tiles = _tiles_of(surface, 2, 3)
    found = own_nearest(tiles, 2, 3, 0.2)
    assert found.shape == (6, 5, 5)
    torch.testing.assert_close(stitch_tiles(found, 2, 3), _own_brute_force(surface, 3), atol=1e-6, rtol=0)
    monkeypatch.setattr(comparison, "OWN_BANK_CELLS", 40)  # 150 cells: every second one each way
    torch.testing.assert_close(
        stitch_tiles(own_nearest(tiles, 2, 3, 0.2), 2, 3), _own_brute_force(surface, 3, 2), atol=1e-6, rtol=0
    )


def test_a_surface_is_its_own_reference_for_the_encoders_with_an_own_window():
    """A photo unlike every reference but like itself (two looks in stripes wider than the window) reads near in
    the band-pass cells, whose entry has an `own_window`, except its one odd cell; the DCT cells' distances and the
    thumbnail's are the bank's."""
    from kensa_vl.train.build import build_tiny

    model, _ = build_tiny(
        tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True,
        reference_encoders=["dct", "bandpass"],
    )  # fmt: skip
    comparison = model.model.reference_comparison
    assert comparison.own_windows == [None, 0.2]
    looks = torch.eye(7)[:3]  # three orthogonal looks: 1 apart
    surface = looks[(torch.arange(32) // 8 % 2)][None].expand(32, 32, 7).clone()  # stripes 8 cells wide
    surface[20, 5] = looks[2]
    query = {"dct": _tiles_of(torch.nn.functional.normalize(torch.randn(32, 32, 42), dim=-1), 2, 2),
             "bandpass": _tiles_of(surface, 2, 2)}  # fmt: skip
    far = [torch.ones(5, 16, 16), torch.ones(5, 16, 16)]  # every cell far from the bank
    dct, bandpass = comparison.with_own(query, far, (2, 2))
    assert torch.equal(dct, far[0]) and torch.equal(bandpass[4], far[1][4])
    near = bandpass[:4].reshape(2, 2, 16, 16).permute(0, 2, 1, 3).reshape(32, 32)
    assert near[20, 5] == 1 and near.flatten().topk(2).values[1] < 1e-5
