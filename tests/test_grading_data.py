"""KensaSynth grading tasks: held-out attributes, limit samples, episodes, attributes that change what they say."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage, stats

from kensa_vl.train.data.grading import (
    ATTRIBUTES,
    BOUNDARIES,
    TEST_ATTRIBUTES,
    VALIDATION_ATTRIBUTES,
    grade_of,
    is_query,
)
from kensa_vl.train.data.synth import SynthConfig, generate, load_grading

SMALL = SynthConfig(seed=5, num_images=160, num_episodes=10, resolution=128, grading_photos=16, grading_episodes=90)


@pytest.fixture(scope="module")
def grading(tmp_path_factory):
    out = generate(SMALL, tmp_path_factory.mktemp("grading") / "ks", preview=True, workers=2)
    return out, *load_grading(out)


def test_splits_hold_out_categories_and_attributes(grading):
    _, items, episodes = grading
    attributes = {split: set(items[split]["attribute"]) for split in items}
    assert not attributes["train"] & {*VALIDATION_ATTRIBUTES, *TEST_ATTRIBUTES}
    assert attributes["validation"] - attributes["train"] == set(VALIDATION_ATTRIBUTES)
    assert attributes["test"] - attributes["train"] == set(TEST_ATTRIBUTES)
    for split in items:
        assert set(items[split]["category"]) == set(SMALL.categories(split))
        assert len(episodes[split]) == SMALL.split_sizes(SMALL.grading_episodes)[["train", "validation", "test"]
                                                                                  .index(split)]  # fmt: skip
        limits = [(c, a, Fraction(float(lv)).limit_denominator(12)) for c, a, lv, lim in zip(
            *(items[split][k] for k in ("category", "attribute", "level", "limit")), strict=True) if lim]  # fmt: skip
        assert len(limits) == len(set(limits)) == len(set(items[split]["category"])) * len(attributes[split]) * len(
            BOUNDARIES)  # fmt: skip


def test_grades_and_limit_samples():
    assert [grade_of(x, 3) for x in (0.0, 0.2, 1 / 3, 0.34, 2 / 3, 0.9, 1.0)] == [0, 0, 0, 1, 1, 2, 2]
    assert grade_of(0.5, 2) == 0 and grade_of(0.5001, 2) == 1  # a limit sample belongs to the grade below it
    assert is_query(0.5 / 3, 3) and not is_query(0.32, 3) and not is_query(0.35, 3)
    with pytest.raises(ValueError, match="level in"):
        grade_of(1.2, 3)


def test_episodes_grade_their_examples_by_level(grading):
    _, items, episodes = grading
    for split in episodes:
        rows = items[split].select_columns(["category", "attribute", "level", "limit"]).to_dict()
        for ep in episodes[split]:
            n, support, query = ep["num_grades"], ep["support"], ep["query"]
            assert 2 <= n <= 4 and query not in support and len(set(support)) == len(support)
            assert all((rows["category"][i], rows["attribute"][i]) == (ep["category"], ep["attribute"])
                       for i in [*support, query])  # fmt: skip
            assert ep["grades"] == [grade_of(rows["level"][i], n) for i in support]
            assert sorted(set(ep["grades"])) == list(range(n)) and all(ep["grades"].count(g) <= 4 for g in range(n))
            assert ep["query_grade"] == grade_of(rows["level"][query], n) and is_query(rows["level"][query], n)
            assert not rows["limit"][query]
            for i, g in zip(support, ep["grades"], strict=True):  # a limit sample is its grade's upper boundary
                assert not rows["limit"][i] or rows["level"][i] == pytest.approx((g + 1) / n)
        shown = [rows["limit"][i] for ep in episodes[split] for i in ep["support"]]
        assert 0 < np.mean(shown) < 0.5


def _luminance(image) -> np.ndarray:
    return np.asarray(image.convert("L"), np.float32) / 255


MEASURES = {  # a plain statistic each attribute must move with its level
    "shade": lambda im: -_luminance(im).mean(),
    "fading": lambda im: -np.asarray(im, np.float32).std(-1).mean(),
    "blotch": lambda im: ndimage.uniform_filter(_luminance(im), 24).std(),
    "roughness": lambda im: np.abs(ndimage.laplace(_luminance(im))).mean(),
    "gloss": lambda im: _luminance(im).max() - np.median(_luminance(im)),
}


@pytest.mark.parametrize("attribute", sorted(MEASURES))
def test_an_attribute_changes_its_photos_with_its_level(grading, attribute):
    _, items, _ = grading
    split = "test" if attribute in TEST_ATTRIBUTES else "train"
    chosen = items[split].filter(lambda c, a: c == SMALL.categories(split)[0] and a == attribute,
                                 input_columns=["category", "attribute"])  # fmt: skip
    measure = [MEASURES[attribute](im) for im in chosen["image"]]
    assert stats.spearmanr(chosen["level"], measure).statistic > 0.8, ATTRIBUTES[attribute].noun


def test_card_preview_and_missing_grading(grading, tmp_path):
    out, items, _ = grading
    card = (out / "README.md").read_text()
    assert "## Grading tasks" in card and all(a.noun in card for a in ATTRIBUTES.values())
    assert (out / "preview_grading_test.png").exists()
    old = generate(SynthConfig(**{**SMALL.__dict__, "grading_photos": 0}), tmp_path / "old", workers=2)
    with pytest.raises(FileNotFoundError, match="no grading tasks"):
        load_grading(old)


def test_a_grading_conversation_labels_its_examples_and_answers_why(grading):
    from kensa_vl.processing.processing_kensa_vl import grading_answer, parse_grading_answer
    from kensa_vl.train.data.conversations import grading_conversations

    _, items, episodes = grading
    rows = grading_conversations(items["train"], episodes["train"], seed=1)
    for index in range(5):
        row, episode = rows[index], episodes["train"][index]
        prompt = "".join(b["text"] or "<image>" for b in row["messages"][0]["content"])
        answer = parse_grading_answer(row["messages"][1]["content"][0]["text"])
        labels = [line.split("<image> ", 1)[1] for line in prompt.splitlines() if "<image> grade:" in line]
        names = [parse_grading_answer(label)["grade"] for label in labels]
        assert len(row["images"]) == len(episode["support"]) + 1 == prompt.count("<image>")
        assert len(set(names)) == episode["num_grades"]  # one name per grade, drawn for this episode
        assert [names.index(n) for n in names] == [episode["grades"].index(g) for g in episode["grades"]]
        assert sum("limit sample" in label for label in labels) == sum(items["train"]["limit"][i]
                                                                       for i in episode["support"])  # fmt: skip
        assert answer["grade"] == names[episode["grades"].index(episode["query_grade"])]
        attribute = ATTRIBUTES[episode["attribute"]]
        assert attribute.noun in prompt and (attribute.more in answer["why"] or attribute.less in answer["why"])
    with pytest.raises(ValueError, match="grade name"):
        grading_answer("B, C")
