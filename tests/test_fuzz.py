"""Hundreds of mangled image files (a seeded generator: cut, bit-flipped, emptied, mislabelled, decompression bombs,
odd modes, animations, extreme aspect ratios) through the shipped processor, `Inspector.judge` and `kensa-vl inspect`:
no traceback, no lost record, every failure named."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

COUNT = 240  # mangled files per run


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` (a decompression bomb's header) with one tiny compressed row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def mangled(rng: np.random.Generator, i: int) -> tuple[str, bytes]:
    """(file name, bytes) of the i-th mangled file; some are valid images of unusual kinds."""
    base = Image.fromarray(rng.integers(0, 256, (int(rng.integers(8, 96)), int(rng.integers(8, 96)), 3), np.uint8))
    fmt = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"][i % 6]
    good = encoded(base, fmt)
    kind = i % 12
    if kind == 0:
        return f"{i}_empty.png", b""
    if kind == 1:
        return f"{i}_cut.{fmt.lower()}", good[: int(rng.integers(1, max(2, len(good) - 1)))]
    if kind == 2:  # bits flipped anywhere
        data = bytearray(good)
        for at in rng.integers(0, len(data), int(rng.integers(1, 20))):
            data[at] ^= 1 << int(rng.integers(8))
        return f"{i}_flipped.{fmt.lower()}", bytes(data)
    if kind == 3:
        return f"{i}_text.png", b"this is not an image\n" * int(rng.integers(1, 50))
    if kind == 4:
        return f"{i}_random.jpg", rng.integers(0, 256, int(rng.integers(1, 4000)), np.uint8).tobytes()
    if kind == 5:  # a decompression bomb: the header claims far more pixels than the limit
        side = int(rng.integers(20_000, 60_000))
        return f"{i}_bomb.png", png_header(side, side)
    if kind == 6:
        mode = ["L", "LA", "P", "CMYK", "I;16", "I", "F", "1", "RGBA"][int(rng.integers(9))]
        image = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
            rng.integers(0, 60000, base.size[::-1]).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        )  # fmt: skip
        return f"{i}_mode.{'tiff' if mode in ('CMYK', 'I', 'F') else 'png'}", encoded(
            image, "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
        )
    if kind == 7:  # animated
        frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        return f"{i}_animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    if kind == 8:  # extreme aspect ratios
        w, h = (int(rng.integers(1, 4)), int(rng.integers(2000, 8000)))[:: 1 if rng.random() < 0.5 else -1]
        return f"{i}_thin.png", encoded(Image.new("RGB", (w, h), (120, 90, 60)), "PNG")
    if kind == 9:  # the wrong suffix for its content
        return f"{i}_misnamed.jpg", encoded(base, "PNG")
    if kind == 10:  # a valid image after a junk prefix
        return f"{i}_prefixed.png", rng.integers(0, 256, 16, np.uint8).tobytes() + good
    return f"{i}_fine.{fmt.lower()}", good


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(1234)
    paths = []
    for i in range(COUNT):
        name, data = mangled(rng, i)
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    paths.append(str(folder / "missing.png"))  # never written
    return folder, paths


def test_the_processor_accepts_or_names_the_problem(tiny, files):
    _, paths = files
    _, processor = tiny
    refused = 0
    for path in paths:
        try:
            out = processor.image_processor([path], return_tensors="pt")
            assert out["pixel_values"].ndim == 4 and out["pixel_values"].isfinite().all()
        except ValueError as err:  # the only way it may fail: a ValueError that names the file or the reason
            refused += 1
            assert str(err), path
    assert 0 < refused < len(paths)


def test_judge_gives_one_record_per_file_and_names_each_failure(tiny, files):
    from kensa_vl.eval.inspector import Inspector, support_item
    from tests.conftest import random_image

    _, paths = files
    model, processor = tiny
    inspector = Inspector(model, processor, max_new_tokens=0)
    inspector.set_support([support_item(random_image(64, 64))])
    results = inspector.judge(paths)
    assert len(results) == len(paths)
    errors = [(p, r) for p, r in zip(paths, results, strict=True) if r.verdict == "error"]
    for path, result in errors:
        assert np.isnan(result.p_defective) and result.text, path
    judged = [r for r in results if r.verdict != "error"]
    assert all(0 <= r.p_defective <= 1 for r in judged)
    names = {p.rsplit("/", 1)[1].split("_", 1)[-1].split(".")[0] for p, _ in errors}
    assert {"empty", "text", "bomb"} <= names and "fine" not in names and len(judged) >= COUNT // 12


def test_the_cli_loses_no_record(tiny_dir, files, tmp_path, capsys):
    from kensa_vl.train.cli import main
    from tests.conftest import random_image

    folder, paths = files
    random_image(64, 64).save(tmp_path / "good.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--model", str(tiny_dir), "--good", str(tmp_path / "good.png"), "--query-dir", str(folder),
              "--query", paths[-1], "--out", str(tmp_path / "r.jsonl")])  # fmt: skip
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in captured.err
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    listed = sorted(str(p) for p in folder.iterdir())  # every file the generator wrote has an image suffix
    assert sorted(r["file"] for r in records) == sorted([*listed, paths[-1]])  # every file, once
    errors = [r for r in records if r["verdict"] == "error"]
    assert f"{len(errors)} of {len(records)} queries could not be read" in captured.err
    assert all(r["text"] for r in errors) and any(r["file"] == paths[-1] for r in errors)
