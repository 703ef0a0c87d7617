"""Labelled synthetic images for the night-set filter tests (and benchmarks/daynight_baseline.py).

    from .nightset_images import make_labelled_images, render_room

    labels = make_labelled_images(tmp_path, n_day=20, n_night=20, n_rooms=20)  # -> labels.csv

:func:`make_labelled_images` writes day and night street views
(:mod:`pipeline.datasets.synthetic`) and rooms (:func:`render_room`) with a labels.csv
(``file``, ``night``, ``outdoor``, ``kind``).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.datasets.synthetic import generate
from pipeline.io import atomic_path


def render_room(rng: np.random.Generator, size=(160, 120), night: bool = False) -> np.ndarray:
    """A synthetic indoor view (RGB uint8): a box room in one-point perspective.

    Uniform painted walls, a ceiling with a lamp, a wooden/carpet/tiled floor,
    a door, pictures, furniture, sometimes a window (showing sky by day, dark by
    night), under artificial light falling off from the lamp, plus sensor noise.
    Used to measure ``outdoor_stats`` against the synthetic streets; it is a
    crude stand-in for real interiors.
    """
    W, H = size
    ss = 2
    Ws, Hs = W * ss, H * ss
    img = np.zeros((Hs, Ws, 3), np.float32)
    bw, bh = rng.uniform(0.3, 0.6) * Ws, rng.uniform(0.3, 0.6) * Hs
    cx, cy = rng.uniform(0.35, 0.65) * Ws, rng.uniform(0.4, 0.6) * Hs
    x0, x1, y0, y1 = cx - bw / 2, cx + bw / 2, cy - bh / 2, cy + bh / 2
    palette = [(235, 230, 215), (220, 225, 230), (240, 220, 200), (200, 215, 200), (230, 210, 215),
               (245, 245, 240), (215, 200, 175), (190, 200, 215)]
    wall = np.array(palette[int(rng.integers(len(palette)))], np.float32) + rng.uniform(-15, 15, 3)
    ceiling = np.array([240, 238, 232], np.float32) * rng.uniform(0.85, 1.0)

    def poly(pts, colour):
        cv2.fillPoly(img, [np.round(np.array(pts)).astype(np.int32)], tuple(float(c) for c in colour),
                     cv2.LINE_AA)

    poly([(0, 0), (Ws, 0), (x1, y0), (x0, y0)], ceiling)
    poly([(0, 0), (x0, y0), (x0, y1), (0, Hs)], wall * 0.85)
    poly([(Ws, 0), (x1, y0), (x1, y1), (Ws, Hs)], wall * 0.92)
    poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], wall)
    # floor
    floor_mask = np.zeros((Hs, Ws), np.uint8)
    cv2.fillPoly(floor_mask, [np.round(np.array([(0, Hs), (Ws, Hs), (x1, y1), (x0, y1)])).astype(np.int32)], 1)
    kind = int(rng.integers(3))
    if kind == 0:  # wooden boards converging to the vanishing point
        base = np.array([150, 105, 65], np.float32) * rng.uniform(0.8, 1.2)
        fl = np.tile(base, (Hs, Ws, 1))
        for k in range(-8, 9):
            xb = Ws / 2 + k * Ws / 8
            cv2.line(fl, (int(xb), Hs), (int(cx + k * bw / 16), int(y1)), tuple(float(v) for v in base * 0.7), 1)
    elif kind == 1:  # carpet
        base = np.array(palette[int(rng.integers(len(palette)))], np.float32) * rng.uniform(0.4, 0.7)
        fl = base + 6 * rng.standard_normal((Hs, Ws, 1)).astype(np.float32)
    else:  # tiles: horizontal lines getting denser towards the back
        base = np.array([205, 200, 190], np.float32)
        fl = np.tile(base, (Hs, Ws, 1))
        for t in np.linspace(0, 1, 7) ** 2:
            yy = int(y1 + (Hs - y1) * t)
            cv2.line(fl, (0, yy), (Ws, yy), (150, 150, 145), 1)
    img[floor_mask > 0] = fl[floor_mask > 0]
    # door on a side wall
    left = rng.random() < 0.5
    a, b = rng.uniform(0.2, 0.5), rng.uniform(0.55, 0.8)  # along the wall, 0 = image edge, 1 = back wall

    def side(t, v):  # t along the side wall, v in [0, 1] from floor up
        xo = 0 if left else Ws
        xb = x0 if left else x1
        x = xo + (xb - xo) * t
        ybot = Hs + (y1 - Hs) * t
        ytop = 0 + (y0 - 0) * t
        return x, ybot + (ytop - ybot) * v

    poly([side(a, 0), side(b, 0), side(b, 0.7), side(a, 0.7)],
         np.array([120, 80, 50], np.float32) * rng.uniform(0.7, 1.3))
    # pictures and an optional window on the back wall
    for _ in range(int(rng.integers(0, 3))):
        pw, ph_ = rng.uniform(0.1, 0.25) * bw, rng.uniform(0.1, 0.25) * bh
        px, py = rng.uniform(x0 + 4, x1 - pw - 4), rng.uniform(y0 + 4, y0 + bh * 0.5)
        poly([(px - 3, py - 3), (px + pw + 3, py - 3), (px + pw + 3, py + ph_ + 3), (px - 3, py + ph_ + 3)],
             (60, 45, 35))
        poly([(px, py), (px + pw, py), (px + pw, py + ph_), (px, py + ph_)], rng.uniform(40, 230, 3))
    has_window = rng.random() < 0.35
    if has_window:
        ww, wh = rng.uniform(0.2, 0.35) * bw, rng.uniform(0.25, 0.45) * bh
        wx, wy = rng.uniform(x0 + 6, x1 - ww - 6), y0 + bh * rng.uniform(0.1, 0.25)
        sky = np.array([200, 210, 228]) if not night else np.array([18, 18, 30])
        poly([(wx - 4, wy - 4), (wx + ww + 4, wy - 4), (wx + ww + 4, wy + wh + 4), (wx - 4, wy + wh + 4)],
             (245, 245, 240))
        poly([(wx, wy), (wx + ww, wy), (wx + ww, wy + wh), (wx, wy + wh)], sky)
        cv2.line(img, (int(wx + ww / 2), int(wy)), (int(wx + ww / 2), int(wy + wh)), (245, 245, 240), 3)
    # furniture: boxes standing on the floor
    for _ in range(int(rng.integers(1, 4))):
        fw = rng.uniform(0.15, 0.35) * Ws
        fx = rng.uniform(0, Ws - fw)
        fb = rng.uniform(y1 + 0.2 * (Hs - y1), Hs)
        fh = rng.uniform(0.1, 0.3) * Hs
        col = np.array(palette[int(rng.integers(len(palette)))], np.float32) * rng.uniform(0.3, 0.8)
        poly([(fx, fb - fh), (fx + fw, fb - fh), (fx + fw, fb), (fx, fb)], col)
        poly([(fx + 6, fb - fh - 8), (fx + fw + 6, fb - fh - 8), (fx + fw, fb - fh), (fx, fb - fh)], col * 1.2)
    # lighting: lamp on the ceiling, light falling off from it
    lx, ly = cx + rng.uniform(-0.2, 0.2) * bw, y0 * rng.uniform(0.3, 0.7)
    yy, xx = np.mgrid[0:Hs, 0:Ws].astype(np.float32)
    d2 = ((xx - lx) ** 2 + (yy - ly) ** 2) / (0.6 * max(Ws, Hs)) ** 2
    if night:
        amb, gain = rng.uniform(0.15, 0.35), rng.uniform(0.6, 0.9)
        tint = np.array([1.1, 0.95, 0.75], np.float32) if rng.random() < 0.7 else np.array([0.95, 1.0, 1.1], np.float32)
    else:
        amb, gain = rng.uniform(0.55, 0.8), rng.uniform(0.25, 0.4)
        tint = np.array([1.0, 1.0, 1.02], np.float32) * rng.uniform(0.95, 1.05)
    light = amb + gain * np.exp(-d2 * 2.0)
    img = img * light[..., None] * tint
    cv2.ellipse(img, (int(lx), int(ly)), (int(0.05 * Ws), int(0.02 * Hs)), 0, 0, 360, (255, 245, 215), -1,
                cv2.LINE_AA)
    glow = np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (0.05 * Ws) ** 2)
    img = img + 120 * glow[..., None]
    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
    img = img + rng.uniform(1, 4) * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_labelled_images(folder, n_day: int = 20, n_night: int = 20, n_rooms: int = 0, size=(160, 120),
                         seed: int = 0) -> Path:
    """Labelled synthetic images for tests and benchmarks; returns ``<folder>/labels.csv``.

    Street views from :mod:`pipeline.datasets.synthetic` (database = day, queries =
    night; the generated dataset is kept in ``<folder>/streets``) and
    ``n_rooms`` rooms (:func:`render_room`, half by day, half by night, in
    ``<folder>/rooms``). labels.csv columns: ``file`` (relative to ``folder``),
    ``night`` (0/1), ``outdoor`` (0/1), ``kind`` (street/room).
    """
    folder = Path(folder)
    rows = []
    if n_day or n_night:
        spacing = 5.0
        n_streets = 2
        length = max(2 * spacing, math.ceil(n_day / (2 * n_streets)) * spacing * 1.15)
        generate(folder / "streets", {"seed": seed, "n_streets": n_streets, "street_length": length,
                                      "db_spacing": spacing, "n_queries": n_night,
                                      "image_size": list(size), "supersample": 1})
        db = sorted((folder / "streets" / "database").glob("*.jpg"))
        pick = np.random.default_rng(seed).permutation(len(db))[:n_day] if n_day < len(db) else range(len(db))
        rows += [(f"streets/database/{db[i].name}", 0, 1, "street") for i in sorted(pick)]
        rows += [(f"streets/queries/{p.name}", 1, 1, "street")
                 for p in sorted((folder / "streets" / "queries").glob("*.jpg"))]
    if n_rooms:
        (folder / "rooms").mkdir(parents=True, exist_ok=True)
        for k in range(n_rooms):
            night = k % 2 == 1
            img = render_room(np.random.default_rng([seed, 7, k]), size, night)
            name = f"rooms/room_{k:04d}_{'night' if night else 'day'}.jpg"
            cv2.imwrite(str(folder / name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
            rows.append((name, int(night), 0, "room"))
    labels = folder / "labels.csv"
    with atomic_path(labels) as tmp:
        pd.DataFrame(rows, columns=["file", "night", "outdoor", "kind"]).to_csv(tmp, index=False)
    return labels
