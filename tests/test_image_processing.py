import io

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from kensa_vl.processing.image_processing_kensa_vl import (
    KensaVLImageProcessor,
    rescale_uint8,
    select_tile_grid,
    tile_image,
    to_rgb,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1344, 1344), (3, 3)),  # square and big enough: the largest square grid within 12 tiles
        ((300, 300), (1, 1)),  # small square: 2x2 would upscale it, so 1x1 wins the tie
        ((448 * 2, 448), (1, 2)),
        ((1920, 1080), (2, 4)),  # 16:9: 2:1 is the closest ratio within 12 tiles; 2x4 beats 1x2 on the tie
        ((100, 1200), (12, 1)),  # very tall
    ],
)
def test_select_tile_grid(size, expected):
    assert select_tile_grid(*size, tile_size=448, max_tiles=12) == expected


def test_tie_break_needs_enough_pixels():
    # 1x1, 2x2 and 3x3 have the same aspect ratio: a grid wins only with more than half its pixels
    assert select_tile_grid(448, 448, 448, 12) == (1, 1)
    assert select_tile_grid(640, 640, 448, 12) == (2, 2)  # 409,600 > 0.5 * 4 * 448^2
    assert select_tile_grid(1000, 1000, 448, 12) == (3, 3)
    assert select_tile_grid(1000, 1000, 448, 4) == (2, 2)


def test_tiles_are_crops_of_the_resized_image_and_thumbnail_last():
    image = random_image(300, 140)
    tiles, (rows, cols) = tile_image(image, 64, 6, use_thumbnail=True)
    assert (rows, cols) == (1, 2)
    assert tiles.shape == (3, 3, 64, 64) and tiles.dtype == np.uint8
    resized = np.asarray(image.resize((128, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiles[1].transpose(1, 2, 0), resized[:, 64:])
    thumb = np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiles[2].transpose(1, 2, 0), thumb)
    one, _ = tile_image(random_image(50, 50), 64, 6, use_thumbnail=True)
    assert one.shape[0] == 1  # a single tile gets no thumbnail


@pytest.mark.parametrize("factor", [1 / 255, 0.7 / 255, 2.0])
def test_rescale_table_gives_the_float64_products_bits(factor):
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    expected = (every.astype(np.float64) * factor).astype(np.float32)
    np.testing.assert_array_equal(rescale_uint8(every, factor), expected)
    floats = every.astype(np.float64) + 0.25  # not 8-bit: the product itself
    np.testing.assert_array_equal(rescale_uint8(floats, factor), (floats * factor).astype(np.float32))
    pixels = KensaVLImageProcessor(tile_size=16, max_tiles=1, rescale_factor=factor)(random_image(16, 16))
    tiles, _ = tile_image(random_image(16, 16), 16, 1, use_thumbnail=True)
    np.testing.assert_array_equal(pixels["pixel_values"], (tiles.astype(np.float64) * factor).astype(np.float32))


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16") and to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("P", (4, 4))).mode == "RGB"
    chw = np.zeros((3, 5, 7), dtype=np.float32)
    assert to_rgb(chw).size == (7, 5)


def test_exif_orientation_is_applied():
    image = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert to_rgb(Image.open(io.BytesIO(buffer.getvalue()))).size == (20, 40)


def test_per_image_max_tiles_and_layout():
    processor = KensaVLImageProcessor(tile_size=64, max_tiles=6)
    images = [random_image(256, 128), random_image(256, 128)]
    out = processor(images, max_tiles=[1, 6])
    assert out["image_grid"].tolist() == [[1, 1, 1], [1, 2, 3]]
    assert out["pixel_values"].shape == (4, 3, 64, 64)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN"),
        (b"not an image", "Could not read"),
    ],
)
def test_bad_images_raise(image, message, tmp_path):
    if isinstance(image, bytes):
        path = tmp_path / "corrupt.png"
        path.write_bytes(image)
        image = str(path)
    with pytest.raises(ValueError, match=message):
        KensaVLImageProcessor(tile_size=64)([image])


def test_pixel_limit():
    processor = KensaVLImageProcessor(tile_size=64, max_image_pixels=100 * 100)
    with pytest.raises(ValueError, match=r"101x100 = 10100 pixels, more than max_image_pixels=10000"):
        processor([random_image(101, 100)])


def test_max_tiles_list_must_match():
    with pytest.raises(ValueError, match="max_tiles has 1 entries but 2 images"):
        KensaVLImageProcessor(tile_size=64)([random_image(8, 8), random_image(8, 8)], max_tiles=[1])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixel data: what a decompression bomb shows before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_one_loader_opens_paths_bytes_and_dataset_dicts_and_refuses_bombs_from_the_header(tmp_path):
    from kensa_vl.processing.image_processing_kensa_vl import ImageTooLarge

    buffer = io.BytesIO()
    Image.new("L", (6, 4), 9).save(buffer, "PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    for source in (buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}, str(tmp_path / "a.png")):
        image = to_rgb(source)
        assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == (9, 9, 9)
    # 10000 x 9000 declared, nothing behind it: refused on the header's numbers, never decoded
    with pytest.raises(ImageTooLarge, match=r"10000x9000 = 90000000 pixels, more than max_image_pixels=64000000"):
        to_rgb(_png_header(10000, 9000), max_pixels=64_000_000)
    with pytest.raises(ValueError, match="Could not read image"):  # PIL's own guard, far past its limit
        to_rgb(_png_header(30000, 30000))
    with pytest.raises(ValueError, match="Could not read image '<bytes>'"):  # within the limit: truncated
        to_rgb(_png_header(40, 30), max_pixels=64_000_000)
    with pytest.raises(ValueError, match="neither bytes nor a path"):
        to_rgb({"bytes": None, "path": None})
    processor = KensaVLImageProcessor(tile_size=64, max_image_pixels=100 * 100)
    with pytest.raises(ValueError, match=r"Image 0: .*200x100 = 20000 pixels"):
        processor([_png_header(200, 100)])
