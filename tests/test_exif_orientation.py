"""EXIF orientation: a photo stored rotated, with the tag that says so, is used upright
everywhere (decoded pixels, index sizes, stored sizes and keypoints)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.images import image_size, read_image
from pipeline.local_store import FeatureStore
from pipeline.extract_local import extract_local

from .conftest import SHARED, need_shared, vg_name

PHOTO = SHARED / "fixtures" / "pairs" / "montmartre_close.jpg"
# stored pixels per tag, such that applying the tag gives the upright image back
STORED = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1),
          2: lambda a: a[:, ::-1]}


def rotated_copy(upright: np.ndarray, path, tag: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = tag
    Image.fromarray(np.ascontiguousarray(STORED[tag](upright))).save(path, exif=exif)  # PNG: lossless


@pytest.fixture(scope="module")
def upright():
    with Image.open(need_shared(PHOTO)) as im:
        return np.array(im.convert("RGB"))[400:640, 480:800]  # textured centre


@pytest.mark.parametrize("tag", sorted(STORED))
def test_rotated_copy_reads_upright(tmp_path, upright, tag):
    rotated_copy(upright, tmp_path / "r.png", tag)
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == ((240, 320) if tag in (6, 8) else (320, 240))  # as stored
    np.testing.assert_array_equal(read_image(tmp_path / "r.png"), upright)
    assert image_size(tmp_path / "r.png")[:2] == (320, 240)


def test_index_and_features_are_upright(tmp_path, upright):
    from pipeline.datasets.index import index_dataset

    root = tmp_path / "ds"
    (root / "database").mkdir(parents=True)
    (root / "queries").mkdir()
    up = vg_name(550000.0, 4180000.0, pano_id="up").replace(".jpg", ".png")
    rot = vg_name(550001.0, 4180000.0, pano_id="rot").replace(".jpg", ".png")
    Image.fromarray(upright).save(root / "database" / up)
    rotated_copy(upright, root / "database" / rot, 6)
    Image.fromarray(upright).save(root / "queries" / up)
    index_dataset(root, tmp_path / "index")
    db = pd.read_csv(tmp_path / "index" / "database.csv")
    assert db.width.tolist() == [320, 320] and db.height.tolist() == [240, 240]

    names = [f"database/{up}", f"database/{rot}"]
    info = extract_local({"name": "sift", "max_keypoints": 500}, root, names, tmp_path / "local", device="cpu")
    (tmp_path / "f.json").write_text(json.dumps(info))
    store = FeatureStore(tmp_path / "f.json")
    a, b = store.get(names[0]), store.get(names[1])
    assert tuple(b["original_size"]) == tuple(b["image_size"]) == (320, 240)
    assert len(a["keypoints"]) > 50
    np.testing.assert_array_equal(a["keypoints"], b["keypoints"])  # the same upright pixels
    store.close()
