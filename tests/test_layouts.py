"""The public dataset layouts (MVTec AD, MVTec LOCO, VisA, a good/defective folder) written small by the tests, read
by `kensa-vl eval`/`inspect` as a user's folder would be, with their bad-input cases; and the evaluation run
data-parallel under `accelerate launch`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kensa_vl.eval.evaluate import aggregate, evaluate, pools, support_for
from kensa_vl.eval.layouts import detect, load

ROOT = Path(__file__).parent.parent
SIZE = 224


def photo(seed: int, defect: bool = False) -> tuple[Image.Image, np.ndarray]:
    """A striped product photo with noise; a defective one has a dark spot, returned as its mask."""
    rng = np.random.default_rng(seed)
    stripes = 110 + 40 * np.sin(np.arange(SIZE) / 5)[None, :, None]
    rgb = np.clip(stripes + rng.normal(0, 3, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    if defect:
        y, x = rng.integers(20, SIZE - 60, 2)
        mask[y : y + 30, x : x + 24] = True
        rgb[mask] = 25
    return Image.fromarray(rgb), mask


def save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def write_mvtec(root: Path, categories=("bottle", "screw"), train=4, good=3, defects=("scratch", "hole"), loco=False):
    seed = 0
    for category in categories:
        for i in range(train):
            (root / category / "train" / "good").mkdir(parents=True, exist_ok=True)
            photo(seed := seed + 1)[0].save(root / category / "train" / "good" / f"{i:03d}.png")
        (root / category / "test" / "good").mkdir(parents=True, exist_ok=True)
        for i in range(good):
            photo(seed := seed + 1)[0].save(root / category / "test" / "good" / f"{i:03d}.png")
        for defect in defects:
            (root / category / "test" / defect).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                image, mask = photo(seed := seed + 1, defect=True)
                image.save(root / category / "test" / defect / f"{i:03d}.png")
                truth = root / category / "ground_truth" / defect
                if loco:  # a folder of masks per image: the spot split in two
                    save_mask(mask & (np.arange(SIZE)[:, None] % 2 == 0), truth / f"{i:03d}" / "000.png")
                    save_mask(mask & (np.arange(SIZE)[:, None] % 2 == 1), truth / f"{i:03d}" / "001.png")
                else:
                    save_mask(mask, truth / f"{i:03d}_mask.png")
    return root


def write_visa(root: Path) -> Path:
    rows = []
    for i in range(8):
        defective = i >= 6
        image, mask = photo(100 + i, defect=defective)
        name = f"Data/Images/{'Anomaly' if defective else 'Normal'}/{i:03d}.JPG"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, format="JPEG", quality=95)
        mask_name = f"Data/Masks/Anomaly/{i:03d}.png" if defective else ""
        if defective:
            save_mask(mask, root / mask_name)
        split = "train" if i < 4 else "test"
        rows.append({"object": "pcb1", "split": split, "label": "anomaly" if defective else "normal",
                     "image": name, "mask": mask_name})  # fmt: skip
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_folder(root: Path) -> Path:
    for i in range(5):
        (root / "normal").mkdir(parents=True, exist_ok=True)
        photo(200 + i)[0].save(root / "normal" / f"n{i}.png")
    for i in range(3):
        image, mask = photo(300 + i, defect=True)
        (root / "abnormal" / "spot").mkdir(parents=True, exist_ok=True)
        image.save(root / "abnormal" / "spot" / f"a{i}.png")
        save_mask(mask, root / "mask" / f"a{i}_mask.png")
    return root


def test_each_layout_is_recognised_and_read(tmp_path):
    mvtec = load(write_mvtec(tmp_path / "mvtec"))
    assert mvtec.layout == "mvtec" and sorted(set(mvtec["category"])) == ["bottle", "screw"]
    rows = pools(mvtec)
    assert [len(rows["bottle"][k]) for k in ("support", "good", "defective")] == [4, 3, 4]
    spot = mvtec[rows["bottle"]["defective"][0]]
    assert (
        spot["mask"].shape == (SIZE, SIZE) and len(spot["boxes"]) == 1 and spot["defect_type"] in ("hole", "scratch")
    )
    assert load(write_mvtec(tmp_path / "mvtec") / "bottle").layout == "mvtec"  # one category's folder

    loco = load(write_mvtec(tmp_path / "loco", ("juice",), defects=("logical_anomalies",), loco=True))
    assert loco.layout == "mvtec-loco"
    union = loco[pools(loco)["juice"]["defective"][0]]
    assert union["area"] == pytest.approx(30 * 24 / SIZE**2)  # the two half-masks together

    visa = load(write_visa(tmp_path / "visa"))
    assert visa.layout == "visa" and [len(pools(visa)["pcb1"][k]) for k in ("support", "good", "defective")] == [
        4,
        2,
        2,
    ]

    folder = load(write_folder(tmp_path / "folder"))
    assert folder.layout == "folder" and folder["category"] == ["folder"] * 8
    assert all(folder[i]["mask"] is not None for i in pools(folder)["folder"]["defective"])


def test_bad_folders_say_what_was_expected(tmp_path):
    (tmp_path / "holiday").mkdir()
    photo(1)[0].save(tmp_path / "holiday" / "beach.png")
    with pytest.raises(
        ValueError, match=r"matches no known layout; expected one of: KensaSynth.*found \['beach.png'\]"
    ):
        detect(tmp_path / "holiday")
    with pytest.raises(ValueError, match="no such folder"):
        detect(tmp_path / "nowhere")

    wrong = write_mvtec(tmp_path / "wrong", ("cable",), defects=("cut",))
    bad_mask = wrong / "cable" / "ground_truth" / "cut" / "001_mask.png"
    Image.new("L", (100, 80)).save(bad_mask)
    with pytest.raises(ValueError, match=r"1 masks do not match.*001_mask.png is 100x80, its image .*001.png 224x224"):
        load(wrong)
    bad_mask.unlink()
    with pytest.raises(ValueError, match=r"1 of 2 defective images have no mask.*cut/001.png"):
        load(wrong)

    few = load(write_mvtec(tmp_path / "few", ("cable",), train=2))
    with pytest.raises(ValueError, match=r"'cable' has 2 support pool \(train/good\).*a support of 4 good"):
        support_for(pools(few), "cable", 4, 0, seed=0)


def test_grayscale_16_bit_and_corrupt_photos(tmp_path, tiny):
    root = write_folder(tmp_path / "folder")
    deep = (np.linspace(0, 60_000, SIZE)[None, :] * np.ones((SIZE, 1))).astype(np.uint16)
    Image.fromarray(deep).save(root / "normal" / "n5.png")  # 16-bit grayscale: read, scaled, not clipped white
    (root / "abnormal" / "spot" / "a3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt, with a mask
    save_mask(photo(0, defect=True)[1], root / "mask" / "a3_mask.png")
    items = load(root)
    index = [str(p.path) for p in items.photos].index(str(root / "normal" / "n5.png"))
    image = np.asarray(items[index]["image"])
    assert items[index]["image"].mode == "RGB" and image[:, 0].mean() < 5 and image[:, -1].mean() > 200

    model, processor = tiny
    out = evaluate(model, processor, items, shots=(2,), seeds=1, controls=(), generate=False, progress=False,
                   resamples=0)  # fmt: skip
    records = out["records"]
    assert len(records) == 6 - 2 + 4  # the good photos but the supports, and every defective one
    (error,) = [r for r in records if r["verdict"] == "error"]
    assert error["label"] == "defective" and "corrupt" in error["error"].lower() or "a3.png" in error["error"]
    assert out["shots"][2]["errors"] == 1 and out["shots"][2]["overall"]["n"] == len(records) - 1
    assert aggregate(records, resamples=0)["errors"] == 1


@pytest.fixture(scope="module")
def comparing_dir(tmp_path_factory):
    """A tiny model with the reference comparison on the DCT encoder (heatmaps), saved."""
    from kensa_vl.train.build import build_tiny, save_kensa

    model, processor = build_tiny(tile_size=112, max_tiles=4, reference_comparison=True, dct=True,
                                  reference_encoders=["dct"])  # fmt: skip
    return save_kensa(model, processor, tmp_path_factory.mktemp("comparing") / "model")


def test_eval_and_inspect_on_an_mvtec_folder(comparing_dir, tmp_path, capsys):
    from kensa_vl.train.cli import main

    data = write_mvtec(tmp_path / "mvtec")
    main(["eval", "--model", str(comparing_dir), "--data", str(data), "--shots", "1,2", "--seeds", "2", "--no-text",
          "--out", str(tmp_path / "eval")])  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    overall = metrics["kensa"]["shots"]["2"]["overall"]
    assert overall["n"] == 2 * 2 * (3 + 4)  # seeds x categories x every test image
    for name in ("auroc", "aupr", "f1_max", "pixel_auroc", "aupro", "balanced_accuracy"):
        assert 0 <= overall[name]["mean"] <= 1 and overall[name]["ci95"][0] <= overall[name]["ci95"][1]
    # a dark spot on regular stripes: the comparison's heatmap finds it without training
    assert (
        overall["pixel_auroc"]["mean"] > 0.8 and metrics["patchcore"]["shots"]["2"]["overall"]["auroc"]["mean"] > 0.8
    )
    assert metrics["patchcore"]["config"]["calibration"] == "none (scale 1)" and not metrics["kensa"]["controls"]
    assert "pixel AUROC" in (tmp_path / "eval" / "table.md").read_text()
    assert (tmp_path / "eval" / "heatmaps.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    assert "pixels" not in records[0] and records[0]["file"].startswith(str(data))

    main(["inspect", "--model", str(comparing_dir), "--data", str(data / "bottle"), "--shots", "2",
          "--viz", str(tmp_path / "viz"), "--out", str(tmp_path / "inspect.json")])  # fmt: skip
    results = json.loads((tmp_path / "inspect.json").read_text())
    assert len(results) == 3 + 4 and {r["category"] for r in results} == {"bottle"}
    assert len(list((tmp_path / "viz").glob("*.png"))) == 7
    capsys.readouterr()


def test_eval_judges_at_a_second_tile_budget_and_phase_when_asked(comparing_dir, tmp_path):
    from kensa_vl.train.cli import main

    data = write_mvtec(tmp_path / "mvtec", ("bottle",))
    scores, names = {}, ("default", "fine", "one_phase")
    for name, extra in zip(names, ([], ["--fine-tiles", "1"], ["--phases", "1"]), strict=True):  # too small for more
        main(["eval", "--model", str(comparing_dir), "--data", str(data), "--shots", "2", "--seeds", "1", "--no-text",
              "--no-baseline", "--out", str(tmp_path / name), *extra])  # fmt: skip
        lines = (tmp_path / name / "records.jsonl").read_text().splitlines()
        scores[name] = [json.loads(line)["p_defective"] for line in lines]
    assert len(scores["fine"]) == len(scores["default"]) == len(scores["one_phase"]) == 7
    runs = [json.loads((tmp_path / name / "metrics.json").read_text())["run"] for name in names]
    assert [run["fine_tiles"] for run in runs] == ["auto", 1, "auto"]  # which setting each report was made with
    assert [run["phases"] for run in runs] == [2, 2, 1]
    assert scores["fine"] != pytest.approx(scores["default"], abs=1e-4)  # each query judged at one tile too
    assert scores["one_phase"] != pytest.approx(scores["default"], abs=1e-4)  # the default judges moved photos too


@pytest.mark.slow
def test_eval_data_parallel_gives_the_records_of_one_process(comparing_dir, tmp_path):
    data = write_mvtec(tmp_path / "mvtec", ("bottle", "screw", "cable"))
    arguments = ["eval", "--model", str(comparing_dir), "--data", str(data), "--shots", "1,2", "--seeds", "2",
                 "--no-baseline", "--no-text"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29523", "-m", "kensa_vl.train.cli"]  # fmt: skip
    for command, out in (([sys.executable, "-m", "kensa_vl.train.cli"], "one"), (launch, "two")):
        done = subprocess.run([*command, *arguments, "--out", str(tmp_path / out)], capture_output=True, text=True,
                              env=env, timeout=900, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = ((tmp_path / name / "records.jsonl").read_text().splitlines() for name in ("one", "two"))
    assert len(one) == 2 * 2 * 3 * 7  # shots x seeds x categories x queries
    for a, b in zip(one, two, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a.pop("p_defective") == pytest.approx(b.pop("p_defective"), abs=1e-5) and a == b
