import pytest
import torch
from conftest import random_image

from kensa_vl.processing.processing_kensa_vl import (
    IMAGE_END,
    IMAGE_START,
    boxes_to_text,
    image_token_sequence,
    text_to_boxes,
)


def test_expansion_matches_the_token_count_rule(tiny, images):
    model, processor = tiny
    out = processor(text="Look <image> and <image> then <image>.", images=images, return_tensors="pt")
    ids = out["input_ids"][0]
    grid = out["image_grid"].tolist()
    assert [g[2] for g in grid] == [7, 5, 3]  # 2x3, 2x2, 1x2 grids (+ thumbnails) at 224 px, max 6 tiles
    expected = sum(len(image_token_sequence(r, c, n, processor.image_seq_len)) for r, c, n in grid)
    tok = processor.tokenizer
    structure = {tok.convert_tokens_to_ids(t) for t in (IMAGE_START, IMAGE_END, "<global>")}
    structure |= {tok.convert_tokens_to_ids(f"<{a}_{i}>") for a in ("row", "col") for i in range(1, 33)}
    n_structure = sum(int((ids == i).sum()) for i in structure)
    n_image = int((ids == processor.image_token_id).sum())
    assert n_image + n_structure == expected
    assert n_image == out["pixel_values"].shape[0] * model.config.tokens_per_tile
    assert processor.image_seq_len == model.config.tokens_per_tile
    assert "token_type_ids" not in out


def test_nested_and_flat_images_and_text_only_samples(tiny, images):
    _, processor = tiny
    texts = ["no image here", "one <image>", "three <image><image><image>"]
    nested = processor(text=texts, images=[[], [images[0]], images], padding=True, return_tensors="pt")
    flat = processor(text=texts, images=[images[0], *images], padding=True, return_tensors="pt")
    assert torch.equal(nested["input_ids"], flat["input_ids"])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    text_only = processor(text="just words", return_tensors="pt")
    assert set(text_only) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    ("text", "n_images", "message"),
    [
        ("<image> <image>", 1, "2 <image> placeholders .* but 1 images"),
        ("<image>", 0, "1 <image> placeholders but no images"),
    ],
)
def test_placeholder_mismatch(tiny, text, n_images, message):
    _, processor = tiny
    images = [random_image(32, 32)] * n_images or None
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)


def test_nested_mismatch_names_the_counts(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"placeholders \[1, 0\], images \[0, 1\]"):
        processor(text=["<image>", "x"], images=[[], [random_image(8, 8)]])


def test_truncation_into_an_image_raises_and_text_truncation_works(tiny, images):
    _, processor = tiny
    text = "<image> then a long tail of words words words"
    full = processor(text=text, images=images[:1])["input_ids"][0]
    with pytest.raises(ValueError, match=rf"needs {len(full)} tokens; truncating to max_length=10 would cut"):
        processor(text=text, images=images[:1], truncation=True, max_length=10)
    n_image_part = full.index(processor.tokenizer.convert_tokens_to_ids(IMAGE_END)) + 1
    cut = processor(text=text, images=images[:1], truncation=True, max_length=n_image_part + 1)
    assert len(cut["input_ids"][0]) == n_image_part + 1


def test_chat_template_and_assistant_mask(tiny, images):
    _, processor = tiny
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Good:"},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": "Defective?"},
                {"type": "image", "image": images[2]},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "yes scratch"}]},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert out["pixel_values"].shape[0] == 5 + 3
    assert processor.tokenizer.decode(ids[mask]) == "yes scratch<|im_end|>"
    assert not (ids[mask] == processor.image_token_id).any()
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nGood:<image>Defective?<image><|im_end|>\n<|im_start|>assistant\n"


def test_box_round_trip_exact_to_the_bin():
    width, height, bins = 1024, 768, 256
    box = (10.3, 700.0, 517.9, 768.0)
    text = boxes_to_text([box], width, height, bins)
    assert text.startswith("<box>") and text.count("<loc_") == 4
    (decoded,) = text_to_boxes(text, width, height, bins)
    for original, back, size in zip(box, decoded, (width, height, width, height), strict=True):
        assert abs(original - back) < size / bins  # within one bin
    assert decoded[0] <= box[0] and decoded[1] <= box[1] and decoded[2] >= box[2] and decoded[3] >= box[3]
    assert boxes_to_text([decoded], width, height, bins) == text  # exact to the bin
    with pytest.raises(ValueError, match="not inside a 1024x768 image"):
        boxes_to_text([(0, 0, 1025, 10)], width, height, bins)


def test_location_tokens_survive_decoding(tiny):
    _, processor = tiny
    text = "defect " + processor.boxes_to_text([(0, 0, 50, 50)], 100, 100)
    ids = processor.tokenizer(text)["input_ids"]
    decoded = processor.post_process_image_text_to_text([ids])[0]
    assert processor.text_to_boxes(decoded, 100, 100) == [(0.0, 0.0, 50.0, 50.0)]


def test_assistant_mask_is_the_libraries_rule_on_a_padded_batch(tiny):
    """`KensaVLProcessor._adjust_assistant_masks_indices` replaces transformers' per-token Python loop: the same
    masks on a padded batch of multi-image, multi-turn chats."""
    from transformers.processing_utils import ProcessorMixin

    if not hasattr(ProcessorMixin, "_adjust_assistant_masks_indices"):
        pytest.skip("this transformers has no such step to replace")
    _, processor = tiny
    image = lambda seed: random_image(300 + 40 * seed, 200, seed)  # noqa: E731
    turn = lambda role, *content: {"role": role, "content": list(content)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    chats = [
        [turn("user", text("a"), {"type": "image", "image": image(1)}), turn("assistant", text("good"))],
        [
            turn("user", {"type": "image", "image": image(2)}, text("b"), {"type": "image", "image": image(3)}),
            turn("assistant", text("defective scratch")),
            turn("user", text("and this?"), {"type": "image", "image": image(4)}),
            turn("assistant", text("good")),
        ],
    ]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True)
    kwargs["padding"] = True
    ours = processor.apply_chat_template(chats, **kwargs)["assistant_masks"]
    original = ProcessorMixin._adjust_assistant_masks_indices
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(processor), "_adjust_assistant_masks_indices", original)
        theirs = processor.apply_chat_template(chats, **kwargs)["assistant_masks"]
    assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))
    assert torch.as_tensor(ours).sum(1).tolist()[1] > torch.as_tensor(ours).sum(1).tolist()[0] > 0
