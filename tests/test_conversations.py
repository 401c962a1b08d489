"""Adapters to TRL conversations: placeholders where the images were, boxes as location tokens, bad records named."""

from __future__ import annotations

import io
import json

import pytest
from conftest import random_image
from datasets import Dataset, Image, List, Value

from kensa_vl.processing.processing_kensa_vl import NUM_LOC_BINS, parse_inspection_answer, text_to_boxes
from kensa_vl.train.data import conversations as conv


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _layout(messages) -> list[str]:
    """Content blocks in order, images as "<image>"."""
    return ["<image>" if b["type"] == "image" else b["text"] for m in messages for b in m["content"]]


def test_interleaved_places_images_where_they_were():
    a, b = random_image(32, 24, 1), random_image(16, 16, 2)
    compact = conv.interleaved({"texts": ["Intro.", None, "Middle.", None], "images": [a, b]}, "doc-1")
    assert _layout(compact["messages"]) == ["Intro.", "<image>", "Middle.", "<image>"]
    assert [im.size for im in compact["images"]] == [(32, 24), (16, 16)]
    parallel = conv.interleaved({"texts": [None, "Caption.", None], "images": [b, None, a]}, "doc-2")  # OBELICS
    assert _layout(parallel["messages"]) == ["<image>", "Caption.", "<image>"]
    assert [im.size for im in parallel["images"]] == [(16, 16), (32, 24)]


@pytest.mark.parametrize(
    "record",
    [
        {"texts": ["A", None, None], "images": [random_image(8, 8)]},  # two placeholders, one image
        {"texts": ["A", None], "images": [random_image(8, 8), None]},  # parallel lists that disagree
    ],
)
def test_interleaved_mismatch_names_the_record(record):
    with pytest.raises(conv.InvalidRecord, match="record doc-7: .* placeholders"):
        conv.interleaved(record, "doc-7")


def test_caption_vqa_classification():
    image = random_image(20, 10)
    cap = conv.caption({"image": image, "sentences": [{"raw": " A cat. "}]})
    assert _layout(cap["messages"]) == ["<image>", "Describe the image.", "A cat."]
    qa = conv.vqa({"image": image, "question": "Colour?", "answers": ["red", "blue", "red"]})
    assert _layout(qa["messages"])[-1] == "red" and qa["messages"][0]["role"] == "user"
    cls = conv.classification({"image": image, "label": 1}, class_names=["ok", "scratched"])
    assert _layout(cls["messages"])[-1] == "scratched" and "ok, scratched" in _layout(cls["messages"])[1]
    with pytest.raises(conv.InvalidRecord, match="record 5: label 'dent' is not one of the 2 classes"):
        conv.classification({"image": image, "label": "dent"}, 5, class_names=["ok", "scratched"])


def test_detection_writes_location_tokens_and_rejects_bad_boxes():
    image = random_image(200, 100)
    record = {"image": image, "objects": {"bbox": [[100, 50, 50, 40], [10, 5, 20, 10]], "category": [1, "nut"]}}
    out = conv.detection(record, "img-3", class_names=["nut", "screw"])
    answer = _layout(out["messages"])[-1]
    assert answer.startswith("nut<box>") and " screw<box>" in answer  # reading order: top object first
    boxes = text_to_boxes(answer, 200, 100, NUM_LOC_BINS)
    for (x0, y0, x1, y1), (x, y, w, h) in zip(boxes, [(10, 5, 20, 10), (100, 50, 50, 40)], strict=True):
        assert x0 <= x < x + w <= x1 and y0 <= y < y + h <= y1 and x1 - x0 - w < 2 and y1 - y0 - h < 1
    outside = {"image": image, "objects": {"bbox": [[190, 10, 20, 10]], "category": [0]}}
    with pytest.raises(conv.InvalidRecord, match=r"record img-4: Box \(190, 10, 210, 20\) is not inside a 200x100"):
        conv.detection(outside, "img-4", class_names=["nut"])
    with pytest.raises(conv.InvalidRecord, match="unknown category 'bolt'"):
        conv.detection({"image": image, "objects": {"bbox": [[1, 1, 2, 2]], "category": ["bolt"]}}, 1, ["nut"])


def test_coco_json_to_conversations_with_a_missing_image(tmp_path):
    random_image(64, 48).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"}],
        "categories": [{"id": 7, "name": "crack"}, {"id": 3, "name": "dent"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 10, 10]}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset, names = conv.coco_detection(str(tmp_path / "ann.json"), str(tmp_path))
    assert names == ["dent", "crack"]
    with pytest.raises(conv.InvalidRecord, match="record 2: image could not be read"):
        conv.to_conversations(dataset, conv.detection, class_names=names)
    rows, summary = conv.to_conversations(dataset, conv.detection, skip_invalid=True, class_names=names)
    assert len(rows) == 1 and summary["skipped"] == 1 and "crack<box>" in rows[0]["messages"][1]["content"][0]["text"]
    coco["annotations"].append({"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with pytest.raises(conv.InvalidRecord, match="annotation 2: unknown category_id 9"):
        conv.coco_detection(str(tmp_path / "ann.json"), str(tmp_path))


def test_corrupt_image_in_a_dataset_is_named_or_skipped_and_counted():
    good = _png(random_image(16, 16))
    features = {"id": Value("string"), "image": Image(decode=False), "caption": Value("string")}
    rows = {
        "id": ["p0", "p1", "p2"],
        "image": [{"bytes": good, "path": None}, {"bytes": good[:40], "path": None}, {"bytes": good, "path": None}],
        "caption": ["a", "b", "c"],
    }
    dataset = Dataset.from_dict(rows, features=__import__("datasets").Features(features))
    with pytest.raises(conv.InvalidRecord, match="record p1: image could not be read"):
        conv.to_conversations(dataset, conv.caption)
    out, summary = conv.to_conversations(dataset, conv.caption, skip_invalid=True)
    assert [m[1]["content"][0]["text"] for m in out["messages"]] == ["a", "c"] and summary["skipped"] == 1
    assert out.features["images"] == List(Image())


def test_lazy_conversations_equal_written_ones_and_carry_the_masks():
    from datasets import Features

    images = [random_image(16, 16, seed) for seed in range(3)]
    masks = [None, random_image(16, 16, 7).convert("L"), None]
    features = Features({"id": Value("string"), "image": Image(), "caption": Value("string"), "mask": Image()})
    dataset = Dataset.from_dict({"id": ["p0", "p1", "p2"], "image": images, "caption": ["a", "b", "c"],
                                 "mask": masks}, features=features)  # fmt: skip
    written, _ = conv.to_conversations(dataset, conv.caption)
    lazy = conv.lazy_conversations(dataset, conv.caption, masks=True)
    assert len(lazy) == 3
    for i in range(3):
        assert lazy[i]["messages"] == written[i]["messages"]
        assert list(lazy[i]["images"][0].getdata()) == list(images[i].convert("RGB").getdata())
        assert (lazy[i]["masks"][0] is None) == (masks[i] is None)
    assert list(lazy[1]["masks"][0].getdata()) == list(masks[1].getdata())
    assert "masks" not in conv.lazy_conversations(dataset, conv.caption)[0]


def test_episode_conversation_round_trips_the_answer(tiny, tmp_path):
    from kensa_vl.train.data.synth import SynthConfig, generate, load_synth

    out = generate(SynthConfig(seed=1, num_images=160, num_episodes=30, resolution=128), tmp_path / "ks", workers=1)
    items, episodes = load_synth(out)
    rows = conv.episode_conversations(items["test"], episodes["test"])
    _, processor = tiny
    for ep, row in zip(episodes["test"], rows, strict=True):
        layout = _layout(row["messages"])
        assert layout.count("<image>") == len(row["images"]) == len(ep["support"]) + 1
        query = items["test"][ep["query"]]
        parsed = parse_inspection_answer(layout[-1], 128, 128, NUM_LOC_BINS)
        shown = any(items["test"][int(i)]["defect_type"] is not None for i in ep["support"])
        named = query["defect_type"] if shown or query["defect_type"] is None else "defect"  # no example names it
        assert parsed["verdict"] == query["label"] and parsed["defect_type"] == named
        assert parsed["position"] == query["position"] and len(parsed["boxes"]) == len(query["boxes"])
        for (x0, y0, x1, y1), (a, b, c, d) in zip(parsed["boxes"], query["boxes"], strict=True):
            assert x0 <= a and y0 <= b and c <= x1 and d <= y1  # the decoded box contains the true one
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    batch = processor(text=text, images=row["images"], return_tensors="pt")
    assert int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<img>")).sum()) == len(row["images"])


def test_mixture_follows_weights_and_fetches_lazily():
    a = Dataset.from_dict({"n": list(range(10))}).with_transform(
        lambda b: {
            "messages": [[{"role": "user", "content": f"a{n}"}] for n in b["n"]],
            "images": [[] for _ in b["n"]],
        }
    )
    b = Dataset.from_dict({"messages": [[{"role": "user", "content": "b"}]] * 5, "images": [[]] * 5})
    mix = conv.mixture({"a": a, "b": b}, {"a": 3, "b": 1}, num_rows=2000, seed=0)
    sources = mix["source"]
    assert 0.7 < sources.count("a") / 2000 < 0.8
    first = [mix[i] for i in range(20)]
    assert all(r["messages"][0]["content"].startswith(r["source"]) for r in first)
    firsts_a = [r["messages"][0]["content"] for r in (mix[i] for i in range(200)) if r["source"] == "a"][:10]
    assert sorted(firsts_a) == sorted(f"a{n}" for n in range(10))  # each source cycles through all its rows
    assert conv.mixture({"a": a, "b": b}, {"a": 3, "b": 1}, 2000, seed=0)["source"] == sources
    with pytest.raises(ValueError, match="weights must be >= 0 for exactly the sources"):
        conv.mixture({"a": a, "b": b}, {"a": 1}, 10)


def test_episodes_decode_an_item_once_while_it_is_kept():
    class Items:  # a split that counts how often each item is read (decoded)
        def __init__(self):
            self.reads = []

        def __getitem__(self, index):
            self.reads.append(index)
            image = random_image(32, 32, index)
            return {"image": image, "defect_type": None, "position": None, "boxes": [], "description": ""}

    episodes = Dataset.from_dict({"category": ["wood"] * 3, "support": [[0, 1], [1, 2], [0, 2]], "query": [2, 0, 1]})
    items = Items()
    rows = [r["images"] for r in conv.episode_conversations(items, episodes)]
    assert sorted(items.reads) == [0, 1, 2]  # nine images shown, three decoded
    assert [len(images) for images in rows] == [3, 3, 3] and rows[1][0] is rows[0][1]
    items = Items()
    [r["images"] for r in conv.episode_conversations(items, episodes, decoded=1)]
    assert len(items.reads) > 3


def test_a_defect_no_example_shows_is_answered_defect_not_a_recalled_type():
    """With good examples alone the answer names no type ("defect"); with a defective example shown, the query's
    type, as before."""
    from PIL import Image as Photo

    from kensa_vl.processing.processing_kensa_vl import UNNAMED_DEFECT

    def photo(kind=None):
        item = {"image": Photo.new("RGB", (64, 64)), "defect_type": kind, "position": None, "boxes": []}
        return item if kind is None else {**item, "position": "center", "boxes": [[20, 20, 40, 40]], "description": ""}

    query = photo("hole")
    alone = conv.episode([photo(), photo()], query, "nut")["messages"][-1]["content"][0]["text"]
    assert alone.startswith(f"defective: {UNNAMED_DEFECT} at the center <box>"), alone
    shown = conv.episode([photo(), photo("scratch")], query, "nut")["messages"][-1]["content"][0]["text"]
    assert shown.startswith("defective: hole at the center <box>"), shown
    assert conv.episode([photo()], photo(), "nut")["messages"][-1]["content"][0]["text"] == "good"
    assert query["defect_type"] == "hole"  # the item itself is left as it was
