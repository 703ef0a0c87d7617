"""Shared test helpers: small datasets in the VG layout, paths to ../shared."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import utm

from pipeline.datasets.names import format_name

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE_TOPK = SHARED / "fixtures" / "cosplace_50_sf_xl_queries_occlusion.h5"
WEIGHTS = SHARED / "weights"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is not beside the repo)")
    return path


def vg_name(east, north, zone=10, letter="S", **kw) -> str:
    lat, lon = utm.to_latlon(east, north, zone, letter, strict=False)
    return format_name(east, north, zone, letter, lat, lon, **kw)


def textured_image(seed: int, size=(96, 128)) -> np.ndarray:
    """A random image with blobs and lines, so local features find keypoints."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
    for _ in range(12):
        c = tuple(int(x) for x in rng.integers(0, 255, 3))
        p1 = tuple(int(x) for x in rng.integers(0, [w, h]))
        p2 = tuple(int(x) for x in rng.integers(0, [w, h]))
        cv2.line(img, p1, p2, c, int(rng.integers(1, 4)))
    return img


def make_dataset(root: Path, n_db: int = 12, n_q: int = 4, spacing: float = 10.0, size=(96, 128)) -> Path:
    """A tiny VG dataset: database images every ``spacing`` m along a line, queries
    as slightly changed copies of some of them."""
    root = Path(root)
    (root / "database").mkdir(parents=True)
    (root / "queries").mkdir(parents=True)
    e0, n0 = 550000.0, 4180000.0
    for i in range(n_db):
        img = textured_image(i, size)
        cv2.imwrite(str(root / "database" / vg_name(e0 + spacing * i, n0, pano_id=f"db{i}")), img[..., ::-1])
    for j in range(n_q):
        i = (j * 3) % n_db
        img = textured_image(i, size).astype(np.float32) * 0.7  # darker copy
        cv2.imwrite(str(root / "queries" / vg_name(e0 + spacing * i + 2.0, n0 + 1.0, pano_id=f"q{j}")), img.astype(np.uint8)[..., ::-1])
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "tiny")
