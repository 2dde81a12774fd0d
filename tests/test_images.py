"""pipeline/images.py: every kind of awkward input decodes to RGB correctly or fails clearly."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from ovdistill.pipeline.images import (
    BACKGROUND,
    ImageError,
    decode_rgb,
    load_rgb,
    to_float_tensor,
    to_uint8_tensor,
)
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = RED
    arr[:, w // 2 :] = BLUE
    return Image.fromarray(arr)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims `width` x `height`; no pixel data follows."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_rgb_jpeg_roundtrip(tmp_path):
    p = tmp_path / "a.jpg"
    two_halves(64, 32).save(p, quality=95)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (64, 32)
    px = np.asarray(im)
    assert np.abs(px[16, 8].astype(int) - RED).max() < 8
    assert np.abs(px[16, 56].astype(int) - BLUE).max() < 8


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg: file not found"):
        load_rgb(p)


def test_corrupt_bytes(tmp_path):
    p = tmp_path / "garbage.jpg"
    p.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ImageError, match=r"garbage\.jpg: not a recognised image format"):
        load_rgb(p)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated image") as e:
        load_rgb(p)
    assert "\n" not in str(e.value)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="cannot open"):
        load_rgb(tmp_path)


def test_grayscale(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (5, 4), 77).save(p)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (5, 4)
    assert np.asarray(im)[2, 2].tolist() == [77, 77, 77]


def test_one_bit(tmp_path):
    p = tmp_path / "b.png"
    Image.new("1", (3, 3), 1).save(p)
    assert np.asarray(load_rgb(p))[1, 1].tolist() == [255, 255, 255]


def test_rgba_composited_over_background(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)      # opaque: kept
    arr[0, 1] = (250, 250, 250, 0)     # transparent: background
    arr[1, 0] = (255, 255, 255, 128)   # half: blend
    p = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(p)
    px = np.asarray(load_rgb(p)).astype(int)
    assert px[0, 0].tolist() == [10, 20, 30]
    assert px[0, 1].tolist() == list(BACKGROUND)
    expect = [round(255 * 128 / 255 + b * (1 - 128 / 255)) for b in BACKGROUND]
    assert np.abs(px[1, 0] - expect).max() <= 1


def test_la_and_palette_transparency(tmp_path):
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], np.uint8), "LA")
    la.save(tmp_path / "la.png")
    px = np.asarray(load_rgb(tmp_path / "la.png"))
    assert px[0, 0].tolist() == [200, 200, 200] and px[0, 1].tolist() == list(BACKGROUND)

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=1)
    px = np.asarray(load_rgb(tmp_path / "p.png"))
    assert px[0, 0].tolist() == list(RED) and px[0, 1].tolist() == list(BACKGROUND)


def test_sixteen_bit_scaled(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], np.uint16)
    p = tmp_path / "d.png"
    Image.fromarray(arr).save(p)
    with Image.open(p) as raw:
        assert raw.mode in ("I;16", "I")  # really stored as 16-bit
    px = np.asarray(load_rgb(p))[0, :, 0]
    assert px.tolist() == [0, 1, 128, 255]

    p32 = tmp_path / "i.tif"
    Image.fromarray(arr.astype(np.int32), "I").save(p32)
    assert np.asarray(load_rgb(p32))[0, :, 1].tolist() == [0, 1, 128, 255]


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tif")
    assert np.asarray(load_rgb(tmp_path / "c.tif"))[4, 4].tolist() == [0, 255, 255]
    px = np.asarray(load_rgb(tmp_path / "c.jpg"))[4, 4].astype(int)
    assert np.abs(px - [0, 255, 255]).max() < 10


def test_exif_orientation_6(tmp_path):
    # Stored 40x20, left red / right blue; orientation 6 = show rotated 90 degrees clockwise,
    # so the viewer sees 20x40 with red on top and blue below.
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    two_halves(40, 20).save(p, quality=95, exif=exif.tobytes())
    im = load_rgb(p)
    assert im.size == (20, 40)
    px = np.asarray(im).astype(int)
    assert np.abs(px[5, 10] - RED).max() < 10
    assert np.abs(px[35, 10] - BLUE).max() < 10


def test_one_by_one(tmp_path):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    im = load_rgb(p)
    assert im.size == (1, 1) and np.asarray(im)[0, 0].tolist() == [1, 2, 3]


def test_pixel_cap(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 60)).save(p)
    with pytest.raises(ImageError, match=r"big\.png: 100x60 = 6000 pixels exceeds the cap of 5000"):
        load_rgb(p, max_pixels=5000)
    assert load_rgb(p, max_pixels=6000).size == (100, 60)


def test_decompression_bomb_header(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_header_only(60_000, 60_000))
    with pytest.raises(ImageError, match=r"bomb\.png: .*pixels"):
        load_rgb(p)
    # under PIL's own limit but over ours: rejected from the header, nothing decoded
    p.write_bytes(png_header_only(12_000, 10_000))
    with pytest.raises(ImageError, match="exceeds the cap of 100000000"):
        load_rgb(p)


def test_decode_bytes_and_tensors():
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (255, 0, 51)).save(buf, "PNG")
    im = decode_rgb(buf.getvalue(), "mem")
    u8 = to_uint8_tensor(im)
    assert u8.shape == (3, 2, 3) and u8.dtype == torch.uint8
    f = to_float_tensor(im)
    assert f.dtype == torch.float32
    assert torch.allclose(f[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    with pytest.raises(ImageError, match="^mem: "):
        decode_rgb(b"not an image", "mem")
