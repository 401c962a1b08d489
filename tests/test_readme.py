"""The README's first snippet, run as written on the main job's model (its test budget): plain `generate` on a
KensaSynth photo says "defective", copies the described example's name and boxes the defect where it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def first_snippet() -> str:
    """The first ```python block of the README."""
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


@pytest.mark.parametrize("category", ["gravel", "marble", "nut"])  # the validation categories
def test_the_readme_snippet_boxes_the_defect_through_generate(main_run, synth_dir, category):
    from kensa_vl.train.data.synth import load_synth

    out, _ = main_run
    items = load_synth(synth_dir)[0]["validation"]
    rows = [i for i, c in enumerate(items["category"]) if c == category]
    good = [i for i in rows if items[i]["label"] == "good"]
    bad = sorted((i for i in rows if items[i]["label"] == "defective"), key=lambda i: -items[i]["area"])
    query = items[bad[0]]  # the category's largest defect; another defective photo is the described example
    code = first_snippet().replace('"outputs/main/model"', repr(str(out / "model")))
    assert "model.generate(" in code and "good_1" in code and "good_2" in code  # the snippet this test runs
    scope = {"good_1": items[good[0]]["image"], "good_2": items[good[1]]["image"], "bad": items[bad[1]]["image"],
             "query": query["image"], "print": lambda *args: None}  # fmt: skip
    exec(code, scope)  # the README's own code
    processor, generated, inputs = scope["processor"], scope["out"], scope["inputs"]
    (answer,) = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
    assert answer.startswith("defective: a dark scratch at the "), answer  # the verdict and the example's words
    boxes = processor.text_to_boxes(answer, *query["image"].size)
    assert len(boxes) == 1, answer
    x0, y0, x1, y1 = boxes[0]
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    # on the defect (the comparison's box), not a corner of the photo
    assert any(a <= centre[0] <= c and b <= centre[1] <= d for a, b, c, d in query["boxes"]), (answer, query["boxes"])
