"""Grading by example in the model: graded examples read from the prompt, the grade pointer over whole-image
statistics, the answer's copied grade (`modeling/grading_kensa_vl.py`), and the Inspector's grading mode."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kensa_vl.eval.inspector import Inspector, support_item
from kensa_vl.modeling.demos_kensa_vl import read_label
from kensa_vl.modeling.grading_kensa_vl import grade_closeness
from kensa_vl.train.data.conversations import grading_episode

NAMES = ["zorp", "blick", "一等"]
LEVELS = [(0.0, 0, False), (1 / 3, 0, True), (0.4, 1, False), (2 / 3, 1, True), (0.85, 2, False), (1.0, 2, False)]
QUERIES = [(0.1, 0), (0.5, 1), (0.95, 2)]


@pytest.fixture(scope="module")
def grader():
    from kensa_vl.train.build import build_tiny

    torch.manual_seed(0)
    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    return model.eval(), processor


def shade(level: float, seed: int, size: int = 112) -> Image.Image:
    """A textured grey panel, darker with `level`: what a shade grading grades."""
    rng = np.random.default_rng(seed)
    texture = rng.normal(0, 12, (size // 8, size // 8, 1)).repeat(8, 0).repeat(8, 1)
    pixels = 200 * (1 - 0.6 * level) + texture + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _support(names=NAMES):
    return [support_item(shade(level, i), label=names[g], limit=limit) for i, (level, g, limit) in enumerate(LEVELS)]


def _prompt(processor, names, query):
    support = [{"image": shade(level, i), "limit": limit} for i, (level, _, limit) in enumerate(LEVELS)]
    row = grading_episode(support, [g for _, g, _ in LEVELS], {"image": query, "noun": "panel"}, names, "shade")
    text = processor.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=row["images"], return_tensors="pt")


def test_graded_labels_are_read_after_each_image(grader):
    model, processor = grader
    batch = _prompt(processor, NAMES, shade(0.5, 9))
    ids = batch["input_ids"][0].tolist()
    closes = [i for i, t in enumerate(ids) if t == processor.tokenizer.convert_tokens_to_ids("</img>")]
    labels = [read_label(ids, c, model.config) for c in closes]
    tokenizer = processor.tokenizer
    for (role, name), want in zip(labels, [NAMES[g] for _, g, _ in LEVELS], strict=False):
        assert role == "grade" and tokenizer.decode(name).strip() == want  # ", limit sample" is not the name
    assert labels[-1] == (None, None)  # the query


@pytest.mark.parametrize("names", [NAMES, NAMES[1:] + NAMES[:1]])
def test_generate_copies_the_closest_grade_and_follows_the_names(grader, names):
    model, processor = grader
    for level, grade in QUERIES:
        batch = _prompt(processor, names, shade(level, 100 + grade))
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        answer = processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer.startswith(f"grade: {names[grade]},"), (level, answer)


def test_closeness_ignores_the_grades_order_and_handles_one_example_per_grade():
    rng = np.random.default_rng(0)
    examples = torch.tensor(rng.normal(0, 1, (6, 5)), dtype=torch.float32)
    examples[:, 0] += torch.tensor([0.0, 0.2, 3.0, 3.2, 6.0, 6.2])  # the grades lie along the first statistic
    groups, query = torch.tensor([0, 0, 1, 1, 2, 2]), examples[2:4].mean(0)
    close = grade_closeness(query, examples, groups)
    assert int(close.argmax()) == 1 and close.max() == pytest.approx(0, abs=1e-5)
    renamed = grade_closeness(query, examples, torch.tensor([2, 2, 0, 0, 1, 1]))
    torch.testing.assert_close(renamed, close[[1, 2, 0]])  # the grades' names move their closeness, nothing else
    single = grade_closeness(query, examples[::2], torch.tensor([0, 1, 2]))
    assert torch.isfinite(single).all() and int(single.argmax()) == 1


@pytest.mark.parametrize("cache", [True, False])
def test_the_inspector_grades_and_names_the_nearest_limit_sample(grader, cache):
    model, processor = grader
    inspector = Inspector(model, processor, noun="panel", graded_by="shade", max_new_tokens=16, cache=cache)
    inspector.set_support(_support())
    results = inspector.judge([shade(level, 200 + g) for level, g in QUERIES])
    assert [r.grade for r in results] == [NAMES[g] for _, g in QUERIES] == [r.verdict for r in results]
    for result, (_, grade) in zip(results, QUERIES, strict=True):
        assert set(result.grade_probabilities) == set(NAMES) and sum(result.grade_probabilities.values()) == (
            pytest.approx(1))  # fmt: skip
        assert max(result.grade_probabilities, key=result.grade_probabilities.get) == NAMES[grade]
        assert np.isnan(result.p_defective) and result.text.startswith(f"grade: {NAMES[grade]}")
    assert [r.limit_sample for r in results] == [2, 2, 4]  # the limit samples are examples 2 and 4
    whole = Inspector(model, processor, noun="panel", graded_by="shade", cache=False)  # its prompt, images and all
    whole.set_support(_support())
    for result, (level, grade) in zip(results, QUERIES, strict=True):  # the answer plain `generate` writes
        batch = whole._query_inputs(shade(level, 200 + grade))
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
        plain = processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert len(result.text) > len(f"grade: {NAMES[grade]},") and plain.startswith(result.text), (plain, result)


def test_a_smaller_support_budget_grades_alike(grader):
    """The language model reads the supports at one tile while the comparison's bank keeps the query's budget
    (`support_bank` with the labels): the grade pointer reads the same statistics."""
    model, processor = grader
    big = [support_item(shade(level, i, 224), label=NAMES[g], limit=lim) for i, (level, g, lim) in enumerate(LEVELS)]
    shared = Inspector(model, processor, max_new_tokens=0)
    separate = Inspector(model, processor, max_new_tokens=0, support_max_tiles=1)
    query = shade(0.5, 7, 224)
    for inspector in (shared, separate):
        inspector.set_support(big)
    a, b = shared.judge(query)[0], separate.judge(query)[0]
    assert a.grade_probabilities == pytest.approx(b.grade_probabilities, abs=1e-5)


def test_the_pointer_learns_from_the_answers_grade(grader):
    model, processor = grader
    comparison = model.model.reference_comparison
    support = [{"image": shade(level, i), "limit": limit} for i, (level, _, limit) in enumerate(LEVELS)]
    grades = [g for _, g, _ in LEVELS]
    row = grading_episode(support, grades, {"image": shade(0.5, 3), "noun": "panel"}, NAMES, "shade",
                          answer="grade: blick, darker than the zorp limit sample")  # fmt: skip
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    batch = processor(text=text, images=row["images"], return_tensors="pt")
    out = model.model(**batch)
    pointers = comparison.pointers(batch["input_ids"], list(out.summaries))
    assert len(pointers) == 1 and pointers[0].graded and len(pointers[0].names) == 3
    loss = comparison.pointer_loss(out.last_hidden_state, model.lm_head.weight, batch["input_ids"], pointers)
    loss.backward()
    assert torch.isfinite(loss) and comparison.grade_pointer.gate.bias.grad.abs() > 0
    assert comparison.grade_pointer.pointer.weight.grad.abs() > 0 and comparison.demo_pointer.gate.bias.grad is None
    model.zero_grad()


def test_bad_grading_supports_say_what_is_wrong(grader, tiny):
    model, processor = grader
    inspector = Inspector(model, processor)
    one = [support_item(shade(0.1, 1), label="A"), support_item(shade(0.2, 2), label="A")]
    with pytest.raises(ValueError, match="at least two grades"):
        inspector.set_support(one)
    with pytest.raises(ValueError, match="graded examples only"):
        inspector.set_support([support_item(shade(0.1, 1)), *_support()])
    twice = [*_support(), support_item(shade(0.0, 0), label="blick")]  # example 1's photo, another grade
    with pytest.raises(ValueError, match="example 7 is the same photo as example 1"):
        inspector.set_support(twice)
    with pytest.raises(ValueError, match="grade name"):
        support_item(shade(0.1, 1), label="A, B")
    with pytest.raises(ValueError, match="label="):
        support_item(shade(0.1, 1), limit=True)
    with pytest.raises(ValueError, match="does not grade"):
        Inspector(*tiny).set_support(_support())  # no reference comparison
    mixed = [support_item(shade(level, i, 96 + 32 * i), label=NAMES[g]) for i, (level, g, _) in enumerate(LEVELS)]
    inspector.set_support(mixed)  # photos of different sizes: each is described by its own statistics
    assert inspector.judge(shade(0.95, 5, 160))[0].grade == NAMES[2]


def test_inspect_grades_from_the_command_line(grader, tmp_path, capsys):
    from kensa_vl.train.build import save_kensa
    from kensa_vl.train.cli import main

    model, processor = grader
    folder = save_kensa(model, processor, tmp_path / "model")
    paths = {}
    for i, (level, grade, limit) in enumerate(LEVELS):
        shade(level, i).save(tmp_path / f"e{i}.png")
        paths.setdefault((grade, limit), []).append(str(tmp_path / f"e{i}.png"))
    for level, grade in QUERIES:
        shade(level, 300 + grade).save(tmp_path / f"q{grade}.png")
    classes = [a for (g, limit), p in paths.items() if not limit for a in ("--class", f"{NAMES[g]}={','.join(p)}")]
    limits = [a for (g, limit), p in paths.items() if limit for a in ("--limit", f"{NAMES[g]}={','.join(p)}")]
    out = tmp_path / "graded.jsonl"
    main(["inspect", "--model", str(folder), *classes, *limits, "--graded-by", "shade", "--noun", "panel",
          "--query", str(tmp_path / "q*.png"), "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["grade"] for r in records] == NAMES and all(r["p_defective"] is None for r in records)
    printed = capsys.readouterr().out
    assert "q2.png\t一等\t" in printed and "nearest limit sample: example" in printed
    table = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [row["grade"] for row in table] == NAMES and json.loads(table[0]["grade_probabilities"])["zorp"] > 0.5
    bad = [["--good", paths[(0, False)][0], *classes], ["--class", "A"]]
    for extra, message in zip(bad, ["do not mix", "GRADE=IMAGE"], strict=True):
        with pytest.raises(SystemExit):
            main(["inspect", "--model", str(folder), *extra, "--query", paths[(0, False)][0]])
        assert message in capsys.readouterr().err
