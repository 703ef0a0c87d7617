"""Giant images and decompression bombs are skipped and listed, never decoded.

The files are PNG headers that claim huge sizes (a real 14000 x 13000 image would take
550 MB to decode, which is the point): PIL reads the size from the header, and the
pixel limit refuses them before any decoding.
"""

from __future__ import annotations

import struct
import zlib

import pandas as pd
import pytest

from pipeline import images
from pipeline.datasets.index import index_dataset
from pipeline.images import DEFAULT_MAX_PIXELS, ImageReadError, image_size, read_image

from .conftest import vg_name


def png_header(path, width: int, height: int) -> None:
    """A PNG whose header says ``width x height`` (8-bit grey) with one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def no_limit_env(monkeypatch):
    monkeypatch.delenv(images.ENV_MAX_PIXELS, raising=False)


def test_bomb_and_oversized_images_are_listed_and_the_index_goes_on(tiny_dataset, tmp_path, no_limit_env):
    bomb = vg_name(550003.0, 4180000.0, pano_id="bomb").replace(".jpg", ".png")
    big = vg_name(550006.0, 4180000.0, pano_id="big").replace(".jpg", ".png")
    png_header(tiny_dataset / "database" / bomb, 14000, 13000)  # 182 MP: PIL's own guard too
    png_header(tiny_dataset / "database" / big, 12000, 9000)  # 108 MP: over the 100 MP default
    summary = index_dataset(tiny_dataset, tmp_path / "index")
    skipped = pd.read_csv(tmp_path / "index" / "skipped.csv")
    reasons = dict(zip(skipped.name.str.split("/").str[-1], skipped.reason))
    assert "too large" in reasons[bomb] and "decompression bomb" in reasons[bomb]
    assert "too large" in reasons[big] and "12000 x 9000" in reasons[big] and "max_pixels" in reasons[big]
    assert summary["counts"]["database"] == 12  # every real image indexed


def test_the_limit_is_configurable(tiny_dataset, tmp_path, monkeypatch):
    name = vg_name(550006.0, 4180000.0, pano_id="big").replace(".jpg", ".png")
    png_header(tiny_dataset / "database" / name, 12000, 9000)
    monkeypatch.setenv(images.ENV_MAX_PIXELS, "1")  # restored after the test
    images.set_max_pixels(120_000_000)  # through the environment: worker processes see it too
    assert images.max_pixels() == 120_000_000
    assert image_size(tiny_dataset / "database" / name) == (12000, 9000, "PNG")
    monkeypatch.setenv(images.ENV_MAX_PIXELS, "10000")
    with pytest.raises(ImageReadError, match=r"128 x 96 = 12,288 pixels, more than max_pixels 10,000"):
        image_size(tiny_dataset / "database" / vg_name(550000.0, 4180000.0, pano_id="db0"))
    with pytest.raises(ValueError, match="positive integer"):
        images.set_max_pixels(0)


def test_read_image_refuses_before_decoding_and_names_the_file(tmp_path, no_limit_env):
    png_header(tmp_path / "bomb.png", 14000, 13000)
    with pytest.raises(ImageReadError, match=r"bomb\.png: image too large"):
        read_image(tmp_path / "bomb.png")
    png_header(tmp_path / "big.png", 11000, 10000)
    assert 11000 * 10000 > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageReadError, match=r"big\.png: image too large \(11000 x 10000"):
        read_image(tmp_path / "big.png")


def test_cli_flag_sets_the_limit(monkeypatch, tmp_path):
    from pipeline.cli import main

    monkeypatch.setenv(images.ENV_MAX_PIXELS, "1")  # restored after the test
    main(["--max-pixels", "1234", "evaluate", str(tmp_path / "missing.h5")])  # fails later; the flag is set first
    assert images.max_pixels() == 1234
