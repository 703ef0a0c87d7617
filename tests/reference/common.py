"""Helpers shared by the reference scripts (plain numpy/PIL: no import of ``pipeline``,
so the scripts run beside the upstream code outside this repository)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image


def upstream_commit(path: str) -> str:
    """The git HEAD of an upstream checkout, or "unknown" for an extracted archive."""
    try:
        return subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # an extracted archive has no .git
        return "unknown"


def load_rgb(path, resize: int) -> np.ndarray:
    """``uint8 [H, W, 3]``, the longer side resized to ``resize`` px with PIL bilinear
    (the same pixels as ``pipeline.images.load_uint8(path, resize)``)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resize / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
        return np.array(im)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_fixture(path, arrays: dict) -> None:
    """Save a reference fixture (compressed .npz) and say where and how big."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
