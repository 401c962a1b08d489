"""`kensa-vl inspect` over folders: results written as they are made (JSON Lines and CSV), a bad file is one error
record, and a stopped run resumes without judging a photo twice."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
from PIL import Image

from tests.conftest import random_image


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "lot7"
    (photos / "sub").mkdir(parents=True)
    for i in range(5):
        random_image(120, 90, i).save(photos / ("sub" if i == 4 else "") / f"p{i}.png")
    whole = (photos / "p0.png").read_bytes()
    (photos / "cut.png").write_bytes(whole[: len(whole) // 2])  # a truncated PNG
    (photos / "notes.txt").write_text("not a photo")  # not listed: no image suffix
    random_image(100, 100, 9).save(tmp_path / "good.png")
    return tmp_path, photos


def run(main, tiny_dir, *extra) -> int:
    """The command's exit status."""
    try:
        main(["inspect", "--model", str(tiny_dir), "--good", *extra])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def test_a_folder_streams_to_jsonl_and_csv_and_resumes(tiny_dir, folder, capsys):
    from kensa_vl.train.cli import main

    root, photos = folder
    out = root / "results.jsonl"
    code = run(main, tiny_dir, str(root / "good.png"), "--query-dir", str(photos), "--out", str(out))
    captured = capsys.readouterr()
    assert code == 2 and "1 of 6 queries could not be read" in captured.err and "cut.png" in captured.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"].rsplit("/", 1)[1] for r in lines) == ["cut.png", "p0.png", "p1.png", "p2.png", "p3.png",
                                                                  "p4.png"]  # fmt: skip
    (error,) = [r for r in lines if r["verdict"] == "error"]
    assert error["file"].endswith("cut.png") and error["p_defective"] is None and "truncated" in error["text"]
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert [r["file"] for r in rows] == [r["file"] for r in lines] and rows[1]["verdict"] in ("good", "defective")

    # stopped after three photos: the rest, and only the rest, are judged on --resume
    out.write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    code = run(main, tiny_dir, str(root / "good.png"), "--query-dir", str(photos), "--out", str(out), "--resume")
    judged = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert judged == [r["file"] for r in lines[3:]] and code == (2 if error in lines[3:] else 0)
    again = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert sorted(again) == sorted(r["file"] for r in lines) and len(set(again)) == len(again)

    with pytest.raises(SystemExit) as exit_info:  # an existing results file is never overwritten silently
        main(["inspect", "--model", str(tiny_dir), "--good", str(root / "good.png"), "--query-dir", str(photos),
              "--out", str(out)])  # fmt: skip
    assert exit_info.value.code == 2 and "pass --resume" in capsys.readouterr().err


def test_globs_and_lists_of_queries(tiny_dir, folder, capsys):
    from kensa_vl.train.cli import main

    root, photos = folder
    (root / "list.txt").write_text(f"{photos / 'p1.png'}\n\n{photos / 'p2.png'}\n")
    main(["inspect", "--model", str(tiny_dir), "--good", str(root / "good.png"), "--query", str(photos / "p[03].png"),
          "--query-list", str(root / "list.txt")])  # fmt: skip
    judged = [line.split("\t")[0].rsplit("/", 1)[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert judged == ["p0.png", "p3.png", "p1.png", "p2.png"]
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--model", str(tiny_dir), "--good", str(root / "good.png"), "--query", str(photos / "*.jpg")])
    assert exit_info.value.code == 2 and "matches no file" in capsys.readouterr().err
    # a folder without photos and an empty list say which option found nothing, not that none was given
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no photo here")
    (root / "blank.txt").write_text("\n  \n")
    for option, value, message in (("--query-dir", root / "empty", "holds no photos"),
                                   ("--query-list", root / "blank.txt", "lists no photo")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", "--model", str(tiny_dir), "--good", str(root / "good.png"), option, str(value)])
        assert exit_info.value.code == 2 and f"{option} {value} {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]), "truncated"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"),
            "not a readable safetensors",
        ),
        (lambda d: (d / "config.json").write_text('{"model_type": "kensa_vl",'), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pickle weights only"),
        (lambda d: (d / "model.safetensors").unlink(), "holds no weights"),
    ],
    ids=["truncated", "bad-header", "bad-config", "no-config", "pickle", "no-weights"],
)
def test_a_broken_model_folder_is_refused_before_anything_runs(tiny_dir, tmp_path, capsys, damage, message):
    import shutil

    from kensa_vl.train.cli import main

    broken = shutil.copytree(tiny_dir, tmp_path / "model")
    damage(broken)
    random_image(64, 64).save(tmp_path / "q.png")
    query = str(tmp_path / "q.png")
    inspect = [
        "inspect",
        "--model",
        str(broken),
        "--good",
        query,
        "--query",
        query,
        "--out",
        str(tmp_path / "r.jsonl"),
    ]
    publish = ["publish", "--model", str(broken), "--out", str(tmp_path / "export"), "--allow-missing-results"]
    for command in (inspect, publish):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "export").exists()  # nothing written


def test_named_defective_examples_say_which_one_a_photo_resembles(folder, tmp_path, capsys):
    from kensa_vl.train.build import build_tiny, save_kensa
    from kensa_vl.train.cli import main

    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    model_dir = save_kensa(model, processor, tmp_path / "compare")
    root, photos = folder
    out = root / "named.jsonl"  # threshold 0: the photo is judged defective, so the example it resembles is printed
    code = run(main, model_dir, str(root / "good.png"), str(photos / "p1.png"), "--defective",
               f"{photos / 'p2.png'}=a dark scratch", f"{photos / 'p3.png'}=打痕", "--query", str(photos / "p0.png"),
               "--out", str(out), "--threshold", "0")  # fmt: skip
    printed = capsys.readouterr().out.strip().split("\t")
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and record["example"] in (3, 4) and record["example_name"] in ("a dark scratch", "打痕")
    assert printed[-1] == f"like example {record['example']}: {record['example_name']}"
    assert next(csv.DictReader(open(root / "named.csv")))["example_name"] == record["example_name"]


def test_the_printed_line_marks_a_query_unlike_the_good_examples_and_a_defect_like_an_example(tmp_path, capsys):
    from kensa_vl.eval.inspect_command import Sink, emit
    from kensa_vl.eval.inspector import Judgement

    sink, failed = Sink(str(tmp_path / "r.jsonl"), False), []
    for name, unlike in (("own.png", None), ("other.png", 1.48)):
        record = {"file": name, "category": "nut", **Judgement("defective", 0.9, unlike=unlike).to_dict()}
        emit(record, sink, failed)
    # the defective example a photo resembles is printed for a defective verdict only: a good photo shows no defect
    for verdict in ("good", "defective"):
        judged = Judgement(verdict, 0.9 if verdict == "defective" else 0.1, example=5, example_name="打痕")
        emit({"file": f"{verdict}.png", "category": "nut", **judged.to_dict()}, sink, failed)
    sink.close()
    own, other, good, defective = capsys.readouterr().out.strip().split("\n")
    assert own == "own.png\tdefective\t0.900" and failed == []
    assert other.endswith("\tunlike the good examples (4.4x as far): another product or zoom?"), other
    assert good == "good.png\tgood\t0.100" and defective == "defective.png\tdefective\t0.900\tlike example 5: 打痕"
    table = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [row["unlike"] for row in table] == ["", "1.48", "", ""]
    assert [row["example_name"] for row in table] == ["", "", "打痕", "打痕"]  # the record keeps what was measured


def test_a_coreset_bank_is_a_setting_of_the_command(folder, tmp_path, capsys):
    from kensa_vl.train.build import build_tiny, save_kensa
    from kensa_vl.train.cli import main

    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    model_dir = save_kensa(model, processor, tmp_path / "compare")
    root, photos = folder
    scores = {}
    for name, extra in (("exact", []), ("coreset", ["--coreset", "0.1"])):
        out = root / f"{name}.jsonl"
        code = run(main, model_dir, str(root / "good.png"), str(photos / "p1.png"), "--query", str(photos / "p0.png"),
                   "--out", str(out), *extra)  # fmt: skip
        assert code == 0
        scores[name] = json.loads(out.read_text())["p_defective"]
    assert scores["coreset"] != pytest.approx(scores["exact"], abs=1e-6)  # the supports' bank holds a tenth
    capsys.readouterr()
    assert run(main, model_dir, str(root / "good.png"), "--query", str(photos / "p0.png"), "--coreset", "2") != 0
    assert "reference_coreset is the share of cells kept, in (0, 1]; got 2.0" in capsys.readouterr().err


def test_a_second_tile_budget_is_a_setting_of_the_command(folder, tmp_path):
    from kensa_vl.eval.inspector import Inspector, load_pretrained, support_item
    from kensa_vl.train.build import build_tiny, save_kensa
    from kensa_vl.train.cli import main

    model, processor = build_tiny(tile_size=112, max_tiles=2, reference_comparison=True, dct=True)
    model_dir = save_kensa(model, processor, tmp_path / "compare")
    root, photos = folder
    out = root / "fine.jsonl"
    code = run(main, model_dir, str(root / "good.png"), str(photos / "p1.png"), "--query", str(photos / "p0.png"),
               "--out", str(out), "--fine-tiles", "6")  # fmt: skip
    model, processor = load_pretrained(model_dir)
    scores = []
    for fine in (6, None):
        inspector = Inspector(model, processor, fine_tiles=fine)
        inspector.set_support([support_item(Image.open(p)) for p in (root / "good.png", photos / "p1.png")])
        scores.append(inspector.judge(Image.open(photos / "p0.png"))[0].p_defective)
    assert code == 0 and json.loads(out.read_text())["p_defective"] == pytest.approx(scores[0], abs=1e-5)
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)  # the second budget moved it
    from kensa_vl.eval.inspect_command import fine_tiles_setting

    assert [fine_tiles_setting(t) for t in ("auto", "off", "16")] == ["auto", None, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="takes auto, off or a whole number of tiles >= 1, got '0'"):
        fine_tiles_setting("0")


def test_a_defective_examples_box_is_read_from_the_command_line(folder):
    from kensa_vl.eval.inspect_command import defective_example

    root, photos = folder
    path = str(photos / "p2.png")
    boxed = defective_example(f"{path}=a dark scratch@4,6,20,18")
    assert boxed["defect_type"] == "a dark scratch" and boxed["boxes"] == [[4, 6, 20, 18]]
    assert defective_example(f"{path}@4,6,20,18")["boxes"] == [[4, 6, 20, 18]]  # no name: "defect"
    plain = defective_example(f"{path}=mail@home")  # not a box: part of the name
    assert plain["defect_type"] == "mail@home" and plain["boxes"] == []
    with pytest.raises(ValueError, match=r"box is @X0,Y0,X1,Y1; .* gives 3 numbers, not 4"):
        defective_example(f"{path}=dent@4,6,20")
    with pytest.raises(ValueError, match=r"box \[4, 6, 2000, 18\] is not \[x0, y0, x1, y1\] inside"):
        defective_example(f"{path}=dent@4,6,2000,18")
