"""Examples that say something: labels read from the prompt, defective examples kept out of the good bank, and the
answer's defect name copied from the example the query resembles (`modeling/demos_kensa_vl.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kensa_vl.eval.inspector import Inspector, support_item
from kensa_vl.modeling.demos_kensa_vl import (
    REGION_SCALE,
    box_cells,
    farthest_cells,
    label_box,
    match_similarity,
    read_label,
    region_descriptor,
)


@pytest.fixture
def copying(tiny_dct):
    """The copy's gate wide open: the copy decides the name, and what is tested is which name it reads."""
    gate = tiny_dct[0].model.reference_comparison.demo_pointer.gate.bias
    start = gate.data.clone()
    gate.data.fill_(30.0)
    yield
    gate.data.copy_(start)


def _rows(test_split, label, count, skip=0):
    return [i for i, lab in enumerate(test_split["label"]) if lab == label][skip : skip + count]


def _support(test_split, names):
    good = [support_item(test_split[i]["image"]) for i in _rows(test_split, "good", 2)]
    bad = _rows(test_split, "defective", len(names))
    named = zip(bad, names, strict=True)
    return good + [support_item(test_split[i]["image"], defective=True, defect_type=n) for i, n in named]


def test_labels_are_read_after_each_image(tiny_dct):
    model, processor = tiny_dct
    text = "1. <image> good\n2. <image> defective: zorbik at the top\n3. <image> defective\nQuery: <image>\n"
    images = [np.zeros((64, 64, 3), np.uint8)] * 4
    ids = processor(text=text, images=images, max_tiles=[1] * 4)["input_ids"][0]
    closes = [i for i, t in enumerate(ids) if t == processor.tokenizer.convert_tokens_to_ids("</img>")]
    labels = [read_label(ids, close, model.config) for close in closes]
    assert [role for role, _ in labels] == ["good", "defective", "defective", None]
    assert processor.tokenizer.decode(labels[1][1]) == ": zorbik"
    assert labels[2][1] is None  # a defective example without a name is kept out of the bank, never copied


def test_an_examples_box_is_read_from_its_label(tiny_dct):
    model, processor = tiny_dct
    boxed = processor.boxes_to_text([[16, 8, 40, 24]], 64, 64)
    text = f"1. <image> defective: zorbik at the top {boxed} deep\n2. <image> defective: dent\nQuery: <image>\n"
    ids = processor(text=text, images=[np.zeros((64, 64, 3), np.uint8)] * 3, max_tiles=[1] * 3)["input_ids"][0]
    closes = [i for i, t in enumerate(ids) if t == processor.tokenizer.convert_tokens_to_ids("</img>")]
    (expected,) = processor.text_to_boxes(boxed, 1, 1)  # the covering bins' edges, as fractions
    np.testing.assert_allclose(label_box(ids, closes[0], model.config), expected)
    assert label_box(ids, closes[1], model.config) is None  # no box of its own; the next label's is not its
    assert label_box(ids, closes[2], model.config) is None


def test_box_cells_follow_the_tile_grid():
    # a 2x3 grid of tiles, 4x4 cells each: the box over the image's right third, top half is tile (0, 2) exactly
    inside = box_cells([2 / 3, 0.0, 1.0, 0.5], rows=2, cols=3, side=4)
    assert inside.shape == (6, 4, 4) and inside[2].all() and inside.sum() == 16
    # a box inside one cell still holds that cell; one on a cell edge takes the cells it overlaps, not its neighbours
    assert box_cells([0.51, 0.51, 0.52, 0.52], 1, 1, 4).nonzero().tolist() == [[0, 2, 2]]
    assert box_cells([0.25, 0.0, 0.5, 0.25], 1, 1, 4).nonzero().tolist() == [[0, 0, 1]]


def test_a_box_picks_the_defect_cells_inside_it():
    torch.manual_seed(0)
    cells = {"dct": torch.nn.functional.normalize(torch.randn(1, 4, 4, 8), dim=-1)}
    distances = [torch.rand(1, 4, 4)]
    distances[0][0, 0, 0] = 5.0  # the farthest cell lies outside the box
    selected = torch.ones(1, dtype=torch.bool)
    free = farthest_cells(cells, distances, selected, ["dct"])["dct"]
    boxed = farthest_cells(cells, distances, selected, ["dct"], box=[0.5, 0.5, 1.0, 1.0], grid=(1, 1))["dct"]
    torch.testing.assert_close(free[0], cells["dct"][0, 0, 0])
    inside = cells["dct"][0, 2:, 2:].reshape(-1, 8)
    assert len(boxed) == 4 and all(any(torch.equal(b, c) for c in inside) for b in boxed)
    order = distances[0][0, 2:, 2:].flatten().argsort(descending=True)
    torch.testing.assert_close(boxed, inside[order])  # the box's cells, farthest first


def test_a_regions_descriptor_is_its_look_against_the_surround():
    image = torch.full((3, 96, 96), 0.5)
    image[0, 16:32, 24:72] = 0.9  # a red band, 48 x 16 px, on grey
    box = [24 / 96, 16 / 96, 72 / 96, 32 / 96]
    whole = region_descriptor(image[None], 1, 1, box)
    np.testing.assert_allclose(whole[:3], [0.4, 0.0, 0.0], atol=1e-6)  # redder than its surround
    np.testing.assert_allclose(whole[3:6], 0.0, atol=1e-6)  # flat inside and out: no texture contrast
    np.testing.assert_allclose(whole[6:8], [np.log(48 * 16 / 96**2), np.log(3)], rtol=1e-5)  # share, aspect
    np.testing.assert_allclose(whole[8:10], [1.0, 1 - 16 / 48], atol=2e-3)  # all of the box unlike; 3:1 spread
    tiles = image.reshape(3, 3, 32, 3, 32).permute(1, 3, 0, 2, 4).reshape(9, 3, 32, 32)  # 3 x 3 tiles, row-major
    thumbnail = torch.zeros(1, 3, 32, 32)  # after the grid tiles; not read
    torch.testing.assert_close(region_descriptor(torch.cat([tiles, thumbnail]), 3, 3, box), whole)
    # on noise: the ring (cut at the image's edge) as a mask of it gives it
    noise = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    ring = torch.zeros(128, 128, dtype=torch.bool)
    ring[:24, 88:120] = True  # a 16 x 16 box at the top, its ring 8 px wide (half its longer side) and cut
    ring[:16, 96:112] = False
    inside, around = noise[:, :16, 96:112].reshape(3, -1), noise[:, ring]
    noise_tiles = noise.reshape(3, 4, 32, 4, 32).permute(1, 3, 0, 2, 4).reshape(16, 3, 32, 32)
    found = region_descriptor(noise_tiles, 4, 4, [0.75, 0.0, 0.875, 0.125])
    torch.testing.assert_close(found[:3], inside.mean(1) - around.mean(1))
    torch.testing.assert_close(found[3:6], inside.std(1, correction=0) - around.std(1, correction=0))


def test_an_examples_look_is_read_on_its_located_region_inside_its_box(tiny_dct):
    """A defective example's look is read as a query's is, on its located region (`locate`), and with a box on the
    region located inside it: a farther spot outside the box is not where its look is read."""
    comparison = tiny_dct[0].model.reference_comparison  # SigLIP- and DINOv2-like cells (8 x 8) and DCT cells (16)
    tiles = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    dct = torch.full((1, 16, 16), 1e-3)
    dct[0, 2, 2] = 0.5  # the farthest cell, outside the box
    dct[0, 10:12, 10:13] = 0.2  # a nearer spot, inside it
    distances = [torch.full((1, 8, 8), 1e-3), torch.full((1, 8, 8), 1e-3), dct]
    levels = torch.full((3,), np.log(1e-3))
    box = [0.6, 0.6, 0.85, 0.8]
    inside = comparison.demo_region(tiles, distances, (1, 1), box, levels)
    torch.testing.assert_close(inside, region_descriptor(tiles, 1, 1, [10 / 16, 10 / 16, 13 / 16, 12 / 16]))
    free = comparison.demo_region(tiles, distances, (1, 1), None, levels)
    torch.testing.assert_close(free, region_descriptor(tiles, 1, 1, [2 / 16, 2 / 16, 3 / 16, 3 / 16]))


def test_which_example_a_query_is_like_is_read_on_the_sharp_cells(test_split, monkeypatch):
    """With sharp (DCT) and blurred (band-pass, contrast) cells compared, the query's defect cells are matched with
    the examples' on the sharp ones alone: the blurred ones measure what the region's look does. One kind: all."""
    from kensa_vl.modeling import comparison_kensa_vl
    from kensa_vl.train.build import build_tiny

    compared = ["dct", "bandpass", "contrast"]
    model, processor = build_tiny(tile_size=112, max_tiles=4, dct=True, bandpass=True, contrast=True,
                                  reference_comparison=True, reference_encoders=compared)  # fmt: skip
    seen, match = [], comparison_kensa_vl.match_similarity
    monkeypatch.setattr(comparison_kensa_vl, "match_similarity", lambda q, *a: seen.append(set(q)) or match(q, *a))
    inspector = Inspector(model.eval(), processor, max_new_tokens=4)
    inspector.set_support(_support(test_split, ["zorbik", "キズ"]))
    inspector.judge(test_split[_rows(test_split, "defective", 1, skip=3)[0]]["image"])
    assert seen == [{"dct"}, {"dct"}]  # one match per named example
    assert model.model.reference_comparison.naming == ["dct"]
    blurred_only = build_tiny(tile_size=112, max_tiles=4, dct=True, bandpass=True, reference_comparison=True,
                          reference_encoders=["bandpass"])[0]  # fmt: skip
    assert blurred_only.model.reference_comparison.naming == ["bandpass"]  # all of one kind: all of them


def test_the_region_term_prefers_the_example_that_looks_alike():
    cells = {"dct": torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)}
    form = [0.5, 0.2, 1.0, 0.3]  # fill, elongation, edge, coherence
    dark, bright = (
        torch.tensor([-0.3] * 3 + [0.0] * 3 + [-3.0, 0.0] + form),
        torch.tensor([0.3] * 3 + [0.0] * 3 + [-3.0, 0.0] + form),
    )
    query = dark + 0.02
    plain = match_similarity(cells, cells)
    assert match_similarity(cells, cells, (query, None)) == plain  # without both regions: the cells alone
    assert match_similarity(cells, cells, (query, dark)) > match_similarity(cells, cells, (query, bright))
    assert match_similarity(cells, cells, (query, dark)) < plain  # a distance only lowers the similarity


def _grey(marks) -> torch.Tensor:
    """A faintly textured grey image, 96 px, as one tile `(1, 3, 96, 96)`, with `marks` (a boolean map) set to
    their value: `marks` is a list of (map, value)."""
    image = 0.5 + 0.005 * torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(0))
    for where, value in marks:
        image[:, where] = value
    return image[None]


def test_a_line_and_a_blot_of_one_tint_differ_in_form():
    """A faint blot is named after a strong blot, not after a thin line whose box it resembles in tint (stains
    beside a scratch example were named after the scratch, docs/naming-by-example.md): the form (fill, elongation,
    edges) tells a line from a blot where the colour terms cannot."""
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    disc = (xs - 48) ** 2 + (ys - 48) ** 2 <= 12**2
    line = ((xs - ys).abs() <= 1) & (xs >= 28) & (xs < 68)  # a diagonal line, 40 px long, 3 px wide
    disc_box, line_box = [36 / 96, 36 / 96, 61 / 96, 61 / 96], [28 / 96, 27 / 96, 68 / 96, 69 / 96]
    faint = region_descriptor(_grey([(disc, 0.44)]), 1, 1, disc_box)
    strong = region_descriptor(_grey([(disc, 0.2)]), 1, 1, disc_box)
    thin = region_descriptor(_grey([(line, 0.2)]), 1, 1, line_box)
    fill, elongation, _, coherence = thin[8:].tolist()
    assert fill < 0.25 and elongation > 0.9 and coherence > 0.5  # a line: few pixels, along one direction
    fill, elongation, _, coherence = faint[8:].tolist()
    assert fill > 0.6 and elongation < 0.1 and coherence < 0.2  # a blot: most of its box, edges every way
    torch.testing.assert_close(faint[8:10], strong[8:10], atol=0.02, rtol=0)  # fill and elongation: not tint
    cells = {"dct": torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)}
    scale = torch.tensor(REGION_SCALE)
    assert ((faint - thin)[:8] * scale).norm() < ((faint - strong)[:8] * scale).norm()  # by look alone: the line
    assert match_similarity(cells, cells, (faint, strong)) > match_similarity(cells, cells, (faint, thin))


def _spotted(seed: int, spots=()):
    """A grey noise texture, 224 px, with dark squares: `spots` of ((x, y), side)."""
    from PIL import Image

    pixels = (0.5 + 0.06 * np.random.default_rng(seed).standard_normal((224, 224, 3))).clip(0, 1)
    for (x, y), side in spots:
        pixels[y : y + side, x : x + side] = 0.1
    return Image.fromarray((pixels * 255).astype(np.uint8))


def test_the_answer_follows_the_examples_boxes(tiny_dct, copying):
    """One photo with a small and a large dark spot, shown as two named examples whose boxes mark one spot each: the
    example the query is named after is the one boxed on the same spot whichever name it carries, so swapping the
    boxes swaps the name. Each example's look is read inside its box (`demo_region`)."""
    model, processor = tiny_dct
    good = [support_item(_spotted(seed)) for seed in range(3)]
    spots = [((30, 40), 12), ((120, 110), 80)]
    photo, query = _spotted(4, spots), _spotted(10, [((20, 30), 76)])
    chosen = []
    for order in ([0, 1], [1, 0]):
        boxes = [[[x, y, x + side, y + side]] for (x, y), side in (spots[i] for i in order)]
        demos = [support_item(photo, defective=True, defect_type=name, boxes=b)
                 for name, b in zip(["zorbik", "キズ"], boxes, strict=True)]  # fmt: skip
        inspector = Inspector(model, processor, threshold=0.0, max_new_tokens=12)
        inspector.set_support(good + demos)
        for demo, (box,) in zip(inspector._bank.demos, boxes, strict=True):
            # 112 px tiles of 8 cells on the coarsest encoder: its look is read inside the cells under the box
            cells = box_cells([v / 224 for v in box], 2, 2, 8)
            assert demo.region[6] <= np.log(cells.sum() / cells.numel()) + 1e-6
        result = inspector.judge(query)[0]
        spot = order[result.example - 4]  # examples 1-3 are good
        assert result.text.startswith(f"defective: {['zorbik', 'キズ'][result.example - 4]} at"), result.text
        chosen.append(spot)
    assert chosen[0] == chosen[1]  # the same spot, under the other name


def test_defective_examples_stay_out_of_the_good_bank(tiny_dct, test_split):
    model, processor = tiny_dct
    goods = Inspector(model, processor, max_new_tokens=0)
    goods.set_support(_support(test_split, []))
    both = Inspector(model, processor, max_new_tokens=0)
    both.set_support(_support(test_split, ["zorbik"]))
    for name, cells in goods._bank.cells.items():
        assert torch.equal(both._bank.cells[name], cells)  # the good photos' cells only
    assert torch.equal(both._bank.scores, goods._bank.scores)  # the level: how far good photos lie from each other
    assert len(both._bank.demos) == 1 and processor.tokenizer.decode(both._bank.demos[0].name) == ": zorbik"
    query = test_split[_rows(test_split, "defective", 1, skip=3)[0]]["image"]
    assert both.judge(query)[0].p_defective == pytest.approx(goods.judge(query)[0].p_defective, abs=0.2)


@pytest.mark.parametrize("cache", [True, False])
def test_the_answer_names_the_matching_example_and_follows_a_swap(tiny_dct, test_split, cache, copying):
    model, processor = tiny_dct
    query = test_split[_rows(test_split, "defective", 1, skip=3)[0]]["image"]
    named = {}
    for names in (["zorbik", "キズ"], ["キズ", "zorbik"]):
        inspector = Inspector(model, processor, threshold=0.0, max_new_tokens=12, cache=cache)
        inspector.set_support(_support(test_split, names))
        _, out = inspector._score(query)
        (found,) = out.pointers
        matched = names[int(found.logits.argmax())]
        result = inspector.judge(query)[0]
        assert result.text.startswith(f"defective: {matched} at"), result.text
        # the Judgement says which example (the supports are 2 good, then the two named ones) and how strongly
        assert result.example_name == matched and result.example == 3 + names.index(matched)
        assert 0.5 <= result.example_share <= 1.0
        named[tuple(names)] = matched
    # the same images: the pointer picks the same example, whose name is now the other one
    assert named[("zorbik", "キズ")] != named[("キズ", "zorbik")]


def test_plain_generate_copies_the_name(tiny_dct, test_split, copying):
    """A Hub user's `generate` on the whole prompt (pixels included) copies as the Inspector does."""
    model, processor = tiny_dct
    inspector = Inspector(model, processor, threshold=0.0, max_new_tokens=12, cache=False)
    inspector.set_support(_support(test_split, ["zorbik", "キズ"]))
    query = test_split[_rows(test_split, "defective", 1, skip=3)[0]]["image"]
    inputs = inspector._query_inputs(query)
    defective = torch.tensor([[inspector.verdict_ids[1]]])
    ids = torch.cat([inputs["input_ids"], defective], 1)
    out = model.generate(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)},
                         max_new_tokens=10, do_sample=False)  # fmt: skip
    text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == "defective" + inspector.judge(query)[0].text.removeprefix("defective")[: len(text) - 9]
    assert text.split(" at")[0] in ("defective: zorbik", "defective: キズ")


def test_the_pointer_learns_from_the_answers_name(tiny_dct, test_split):
    from kensa_vl.train.data.conversations import episode

    model, processor = tiny_dct
    comparison = model.model.reference_comparison
    support = _support(test_split, ["zorbik", "キズ"])
    query = {**support[-1], "image": test_split[_rows(test_split, "defective", 1, skip=3)[0]]["image"]}
    row = episode(support, query, "product")
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    batch = processor(text=text, images=row["images"], return_tensors="pt")
    out = model.model(**batch)
    pointers = comparison.pointers(batch["input_ids"], list(out.summaries))
    assert len(pointers) == 1 and len(pointers[0].names) == 2
    loss = comparison.pointer_loss(out.last_hidden_state, model.lm_head.weight, batch["input_ids"], pointers)
    loss.backward()
    assert torch.isfinite(loss) and comparison.demo_pointer.gate.bias.grad.abs() > 0
    assert comparison.demo_pointer.pointer.weight.grad.abs() > 0  # which example: learnt from the name written
    model.zero_grad()


def test_name_pools_are_disjoint_and_training_names_come_from_the_prompt(synth_dir):
    from kensa_vl.train.data.conversations import naming_conversations
    from kensa_vl.train.data.names import EVALUATION, TRAINING, check_pools
    from kensa_vl.train.data.synth import load_synth

    check_pools()
    assert not set(TRAINING) & set(EVALUATION) and any("打痕" == n for n in TRAINING)
    items = load_synth(synth_dir)[0]["train"]
    rows = naming_conversations(items, 12, seed=3)
    named = 0
    for row in rows:
        answer = row["messages"][1]["content"][0]["text"]
        prompt = "".join(b["text"] or "" for b in row["messages"][0]["content"])
        if answer != "good":
            name = answer.removeprefix("defective: ").split(" at the ")[0]
            assert name in TRAINING and f"defective: {name} at the" in prompt
            named += 1
    assert named >= 4 and rows[5]["messages"] == naming_conversations(items, 12, seed=3)[5]["messages"]


def test_a_generated_box_is_the_comparisons_box(tiny_dct, test_split):
    """After a name's " at", `generate` writes the position words of the comparison's box of the query and the box
    itself: the box the Inspector reports, whatever the language model would write."""
    from kensa_vl.processing.processing_kensa_vl import position_word

    model, processor = tiny_dct
    inspector = Inspector(model, processor, threshold=0.0, max_new_tokens=0, cache=False)
    inspector.set_support(_support(test_split, []))
    item = test_split[_rows(test_split, "defective", 1, skip=3)[0]]
    expected = inspector.judge(item["image"])[0].boxes[0]
    inputs = inspector._query_inputs(item["image"])
    named = processor.tokenizer("defective: dent at", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([inputs["input_ids"], named], 1)
    out = model.generate(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)},
                         max_new_tokens=12, do_sample=False)  # fmt: skip
    text = processor.decode(out[0, ids.shape[1] :])
    width, height = item["image"].size
    word = position_word((expected[0] + expected[2]) / 2 / width, (expected[1] + expected[3]) / 2 / height)
    assert text.startswith(f" the {word} <box>") and "</box>" in text, text
    (box,) = processor.text_to_boxes(text, width, height)
    bin_size = max(width, height) / processor.num_loc_bins
    np.testing.assert_allclose(box, expected, atol=bin_size + 1)  # the same box, to a location bin


def test_names_come_from_the_users_words_and_bad_names_are_refused(tiny_dct, test_split):
    model, processor = tiny_dct
    image = test_split[_rows(test_split, "defective", 1)[0]]["image"]
    described = support_item(image, defective=True, description="a  dark\nscratch")
    assert described["defect_type"] == "a dark scratch" and described["description"] == ""  # one line, the name
    both = support_item(image, defective=True, defect_type="dent", description="near the rim, 2 mm")
    assert both["defect_type"] == "dent" and both["description"] == "near the rim, 2 mm"
    assert support_item(image, defective=True)["defect_type"] == "defect"  # no words: a generic name
    for bad in ("scratch: deep", "look at this"):
        with pytest.raises(ValueError, match="cannot hold ':' or the word 'at'"):
            support_item(image, defective=True, description=bad)
    inspector = Inspector(model, processor, max_new_tokens=0)
    long = support_item(image, defective=True, description=" ".join(["scratch"] * 40))
    with pytest.raises(ValueError, match=r"example 3's name is \d+ tokens long; .* at most 32"):
        inspector.set_support(_support(test_split, []) + [long])


def test_two_examples_with_one_name_share_it(tiny_dct, test_split, copying):
    """Two defective examples named alike (different looks): the pointer's shares on them add up on the name."""
    model, processor = tiny_dct
    inspector = Inspector(model, processor, threshold=0.0, max_new_tokens=12)
    inspector.set_support(_support(test_split, ["zorbik", "zorbik"]))
    result = inspector.judge(test_split[_rows(test_split, "defective", 1, skip=3)[0]]["image"])[0]
    assert result.text.startswith("defective: zorbik at") and result.example in (3, 4)
