"""A small synthetic visual geo-localization dataset (day database, night queries).

The world is a handful of straight streets placed in real UTM coordinates (around
San Francisco by default). Each street is a corridor in a local frame (``x``
lateral, to the right when looking along the street; ``y`` along the street; ``z``
up) with two planar facade walls at ``x = -w/2`` (left) and ``x = +w/2`` (right),
a ground plane and a sky. Facades are procedural texture atlases: a row of
buildings with their own colours, materials, window grids, doors, shop fronts,
signs with random text, graffiti, pipes, murals. Window styles are shared between
buildings and streets (perceptual aliasing) while signs, murals and shop fronts
make places distinctive.

Views are rendered by ray casting every pixel against the walls and the ground
(vectorised numpy) and sampling the atlases with ``cv2.remap``. The database is
a grid of day views every ``db_spacing`` metres along each street, at the
``db_headings`` (yaw relative to the street axis; negative looks left). Queries
are taken at random positions between the grid points, off the centre line,
with perturbed yaw/pitch/roll, another focal length, a lower camera, and a night
appearance rendered from the *same* facade layout (dark walls, some windows lit,
lamp light, tint, noise, blur, JPEG), sometimes with parked cars or pedestrians
in front. Every query has a database image within ``positive_radius`` metres.

Output (the VG benchmark layout)::

    <root>/database/@east@north@zone@letter@lat@lon@pano@@heading@...@.jpg
    <root>/queries/...
    <root>/README.txt        # how it was made: conf and seed
    <root>/synthetic.json    # conf + counts (+ street geometry)

``generate`` is atomic (it writes ``<root>.partial-<pid>`` and renames it) and
idempotent (a complete root made with the same conf is left alone).

CLI::

    python3 -m pipeline.datasets.synthetic --root data/demo [--seed 0] [--n-queries 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import utm

from ..args import json_arg
from ..conf import merge_conf
from .names import format_name

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

DEFAULT_CONF: dict = {
    "seed": 0,
    # world
    "n_streets": 3,
    "street_length": 300.0,  # metres; each street gets 0.9-1.1x this
    "street_width": [12.0, 16.0],  # wall-to-wall, metres (range)
    "building_height": [12.0, 20.0],  # metres (range)
    "building_width": [6.0, 25.0],  # metres (range)
    "pixels_per_metre": 20,  # facade texture resolution
    "utm_origin": [550000.0, 4180000.0],  # east, north of the first street
    "utm_zone": 10,
    "utm_letter": "S",
    # database cameras
    "db_spacing": 5.0,  # metres along the street
    "db_headings": [-50.0, 50.0],  # yaw w.r.t. the street axis (degrees; <0 = left)
    "db_hfov": 70.0,  # degrees
    "db_camera_height": 2.5,  # metres
    "db_jpeg_quality": 92,
    # queries
    "n_queries": 50,
    "query_lateral": 2.0,  # +- metres off the centre line
    "query_yaw_jitter": 15.0,  # +- degrees around a database heading
    "query_pitch_jitter": 3.0,  # +- degrees
    "query_roll_jitter": 2.0,  # +- degrees
    "query_hfov": [50.0, 62.0],  # degrees (range)
    "query_camera_height": [1.5, 1.8],  # metres (range)
    "query_jpeg_quality": [60, 85],  # range
    "occluder_prob": 0.3,  # probability that a query has a car/pedestrian in view
    # images
    "image_size": [320, 240],  # width, height
    "supersample": 2,  # render at this factor and downsample (anti-aliasing)
    "positive_radius": 25.0,  # every query has a database image this close (asserted)
}

_NIGHT_VARIANTS = 2  # lit-window patterns per street (queries pick one)
_ATLAS_MARGIN = 100.0  # metres of facade beyond each end of a street
_HMAX = 20.0  # facade atlas height (metres); buildings are at most this tall
_GROUND_PPM = 10
_LAMP_SPACING = 28.0
_LAMP_HEIGHT = 6.0
_SIDEWALK = 2.5


# --------------------------------------------------------------------------- conf


def _merge_conf(conf: dict | None) -> dict:
    # the model range checks do not apply: this conf's options are checked by _check_conf
    out = merge_conf(DEFAULT_CONF, conf, "synthetic dataset", check=False)
    # JSON round trip: tuples become lists, so a conf compares equal to its stored copy
    out = json.loads(json.dumps(out))
    _check_conf(out)
    return out


def _check_conf(c: dict) -> None:
    def rng2(key, lo=None):
        v = c[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and v[0] <= v[1]):
            raise ValueError(f"synthetic dataset: {key} must be a [min, max] pair, got {v!r}")
        if lo is not None and v[0] < lo:
            raise ValueError(f"synthetic dataset: {key} must be >= {lo}, got {v!r}")

    if int(c["n_streets"]) < 1:
        raise ValueError("synthetic dataset: n_streets must be >= 1")
    if not c["street_length"] >= 2 * c["db_spacing"] > 0:
        raise ValueError("synthetic dataset: need street_length >= 2 * db_spacing > 0")
    if int(c["n_queries"]) < 0:
        raise ValueError("synthetic dataset: n_queries must be >= 0")
    for key in ("street_width", "building_width", "query_hfov", "query_camera_height",
                "query_jpeg_quality"):
        rng2(key, 0)
    rng2("building_height", 4.0)
    if c["building_height"][1] > _HMAX:
        raise ValueError(f"synthetic dataset: building_height must be <= {_HMAX}")
    if c["street_width"][0] < 2 * _SIDEWALK + 3:
        raise ValueError("synthetic dataset: street_width must be >= 8 m")
    if c["building_width"][0] < 3:
        raise ValueError("synthetic dataset: building_width must be >= 3 m")
    if not c["db_headings"]:
        raise ValueError("synthetic dataset: db_headings is empty")
    w, h = c["image_size"]
    if not (16 <= int(w) <= 4096 and 16 <= int(h) <= 4096):
        raise ValueError(f"synthetic dataset: bad image_size {c['image_size']!r}")
    if not 8 <= int(c["pixels_per_metre"]) <= 40:
        raise ValueError("synthetic dataset: pixels_per_metre must be in 8..40")
    if int(c["supersample"]) < 1:
        raise ValueError("synthetic dataset: supersample must be >= 1")
    if c["db_spacing"] / 2 + c["query_lateral"] >= c["positive_radius"]:
        raise ValueError("synthetic dataset: db_spacing/query_lateral too large for positive_radius")
    if int(c["utm_zone"]) not in range(1, 61) or str(c["utm_letter"]).upper() not in "CDEFGHJKLMNPQRSTUVWX":
        raise ValueError("synthetic dataset: bad utm_zone/utm_letter")


# --------------------------------------------------------------------------- world


@dataclass
class Street:
    index: int
    origin: tuple[float, float]  # UTM east, north of y = 0, x = 0
    bearing: float  # compass bearing (degrees) of the +y axis
    length: float
    width: float

    def to_utm(self, x: float, y: float) -> tuple[float, float]:
        b = math.radians(self.bearing)
        east = self.origin[0] + y * math.sin(b) + x * math.cos(b)
        north = self.origin[1] + y * math.cos(b) - x * math.sin(b)
        return east, north

    @property
    def ymin(self) -> float:
        return -_ATLAS_MARGIN

    @property
    def ymax(self) -> float:
        return self.length + _ATLAS_MARGIN


@dataclass
class Camera:
    x: float
    y: float
    z: float
    yaw: float  # degrees, relative to +y, positive turns right (+x)
    pitch: float = 0.0
    roll: float = 0.0
    hfov: float = 70.0

    def basis(self):
        ps, th, ph = (math.radians(v) for v in (self.yaw, self.pitch, self.roll))
        f = np.array([math.sin(ps) * math.cos(th), math.cos(ps) * math.cos(th), math.sin(th)])
        r = np.array([math.cos(ps), -math.sin(ps), 0.0])
        u = np.cross(r, f)
        r2 = r * math.cos(ph) + u * math.sin(ph)
        u2 = u * math.cos(ph) - r * math.sin(ph)
        return f, r2, u2


def _make_streets(conf: dict, rng: np.random.Generator) -> list[Street]:
    streets = []
    e0, n0 = conf["utm_origin"]
    east = float(e0)
    for i in range(int(conf["n_streets"])):
        length = float(conf["street_length"]) * rng.uniform(0.9, 1.1)
        length = max(2 * conf["db_spacing"], round(length / conf["db_spacing"]) * conf["db_spacing"])
        # never axis-aligned: 15-75 or 105-165 degrees
        bearing = float(rng.uniform(15, 75) + 90 * rng.integers(0, 2))
        width = float(rng.uniform(*conf["street_width"]))
        north = float(n0) + float(rng.uniform(-150, 150))
        # all streets run eastwards (bearing in (0, 180)); origins are spaced so that
        # their east extents are >= 250 m apart
        streets.append(Street(i, (east, north), bearing, float(length), width))
        east += length + 250.0
    return streets


# --------------------------------------------------------------------------- textures

_PALETTE = [  # RGB facade base colours
    (222, 205, 170), (236, 226, 200), (190, 186, 178), (200, 120, 90), (226, 200, 120),
    (160, 80, 60), (240, 238, 230), (170, 190, 200), (150, 170, 140), (210, 170, 140),
    (120, 110, 105), (230, 180, 160), (185, 150, 110), (100, 120, 140),
]
_FRAME_COLOURS = [(245, 245, 240), (60, 55, 50), (120, 80, 50), (200, 200, 195), (40, 70, 60)]
_SHUTTER_COLOURS = [(60, 100, 70), (120, 80, 50), (90, 110, 130), (230, 230, 220), (150, 60, 50)]
_VIVID = [(230, 40, 40), (40, 160, 230), (250, 200, 30), (40, 180, 90), (200, 60, 200),
          (250, 120, 20), (20, 20, 20), (250, 250, 250), (30, 60, 200)]
_WORDS = ["CAFE", "BAR", "PIZZA", "HOTEL", "BANK", "BOOKS", "DELI", "SUSHI", "TACOS", "FLORIST",
          "PHARMACY", "BAKERY", "TATTOO", "LAUNDRY", "SHOES", "MARKET", "OPTICS", "GYM", "NAILS",
          "RAMEN", "WINE", "MUSIC", "TOYS", "DINER", "VINTAGE", "CYCLES", "PHOTO", "NOODLES"]
_FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX,
          cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_PLAIN]
_EMISSIVE = [(255, 214, 150), (255, 190, 110), (255, 236, 200), (255, 170, 90), (190, 215, 255),
             (255, 225, 170)]

KIND_WINDOW, KIND_SHOP, KIND_SIGN = 1, 2, 3


def _col(c, rng, jitter=10):
    return tuple(int(np.clip(v + rng.integers(-jitter, jitter + 1), 0, 255)) for v in c)


def _smooth_noise(rng, h, w, cell, octaves=2):
    """Roughly unit-std smooth noise of shape (h, w), feature size ~cell pixels."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = max(2.0, cell / (2 ** o))
        small = rng.standard_normal((max(2, int(h / c) + 2), max(2, int(w / c) + 2))).astype(np.float32)
        out += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.5
    return out / total


def _random_word(rng):
    if rng.random() < 0.6:
        return str(rng.choice(_WORDS))
    letters = "ABCDEFGHIJKLMNOPRSTUVWZ"
    return "".join(rng.choice(list(letters), size=int(rng.integers(3, 8))))


def _put_text_fit(img, text, x0, y0, x1, y1, colour, rng, font=None, thick=None):
    """Draw ``text`` centred in the box (x0, y0)-(x1, y1)."""
    font = _FONTS[int(rng.integers(len(_FONTS)))] if font is None else font
    bw, bh = x1 - x0, y1 - y0
    if bw < 6 or bh < 5:
        return
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min(0.8 * bw / max(tw, 1), 0.7 * bh / max(th, 1))
    if scale <= 0.15:
        return
    thick = max(1, int(round(scale * 1.6))) if thick is None else thick
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    org = (int(x0 + (bw - tw) / 2), int(y0 + (bh + th) / 2))
    cv2.putText(img, text, org, font, scale, colour, thick, cv2.LINE_AA)


def _window_styles(rng, n=6):
    styles = []
    for _ in range(n):
        ww = rng.uniform(0.9, 1.8)
        styles.append({
            "ww": ww,
            "wh": rng.uniform(1.3, 2.1),
            "bay": ww + rng.uniform(0.9, 2.4),
            "frame": float(rng.uniform(0.06, 0.16)),
            "frame_col": _FRAME_COLOURS[int(rng.integers(len(_FRAME_COLOURS)))],
            "mullion": int(rng.integers(0, 4)),  # 0 none, 1 vertical, 2 cross, 3 grid
            "shutters": bool(rng.random() < 0.35),
            "shutter_col": _SHUTTER_COLOURS[int(rng.integers(len(_SHUTTER_COLOURS)))],
            "sill": bool(rng.random() < 0.6),
            "lintel": bool(rng.random() < 0.4),
            "arch": bool(rng.random() < 0.2),
            "balcony": bool(rng.random() < 0.25),
        })
    return styles


def _block_pattern(h, w, course, block, mortar, stagger, rng, tone=0.08):
    """Multiplicative masonry pattern: per-block tone jitter and mortar joints."""
    yy = np.arange(h)[:, None]
    xx = np.arange(w)[None, :]
    row = yy // course
    shift = (row % 2) * (block // 2) if stagger else 0
    col = (xx + shift) // block
    tones = 1.0 + tone * rng.standard_normal((int(h // course) + 2, int((w + block) // block) + 2))
    pat = tones[row, col].astype(np.float32)
    joint = ((yy % course) < mortar) | (((xx + shift) % block) < mortar)
    pat[joint] = 1.12
    return pat


@dataclass
class Facade:
    day: np.ndarray  # (H, W, 3) uint8 RGB
    roof: np.ndarray  # (W,) float32 building height (m) per atlas column
    labels: np.ndarray  # (H, W) uint16 glass/sign label (0 = none)
    kinds: np.ndarray  # (n_labels + 1,) kind of each label
    buildings: list = field(default_factory=list)


def _draw_window(img, labels, lab, x0, y0, x1, y1, st, ppm, rng):
    ft = max(1, int(round(st["frame"] * ppm)))
    fc = st["frame_col"]
    if st["sill"]:
        cv2.rectangle(img, (x0 - 2 * ft, y1 + ft), (x1 + 2 * ft, y1 + 3 * ft), (215, 210, 200), -1)
    if st["lintel"]:
        cv2.rectangle(img, (x0 - 2 * ft, y0 - 4 * ft), (x1 + 2 * ft, y0 - ft), (200, 195, 185), -1)
    if st["shutters"]:
        sw = (x1 - x0) // 2
        sc = st["shutter_col"]
        for sx0 in (x0 - ft - sw, x1 + ft):
            cv2.rectangle(img, (sx0, y0 - ft), (sx0 + sw, y1 + ft), sc, -1)
            for yy in range(y0, y1, 3):
                cv2.line(img, (sx0, yy), (sx0 + sw, yy), tuple(int(v * 0.75) for v in sc), 1)
    cv2.rectangle(img, (x0 - ft, y0 - ft), (x1 + ft, y1 + ft), fc, -1)
    if st["arch"]:
        rad = (x1 - x0) // 2
        cv2.ellipse(img, ((x0 + x1) // 2, y0), (rad + ft, rad // 2 + ft), 0, 180, 360, fc, -1)
    # glass: dark with a vertical sky reflection gradient
    gh = y1 - y0
    if gh <= 0 or x1 <= x0:
        return
    base = np.array([55, 65, 80], np.float32) + rng.uniform(-12, 12)
    grad = np.linspace(1.5, 0.8, gh, dtype=np.float32)[:, None, None]
    glass = base[None, None, :] * grad
    if rng.random() < 0.35:  # curtains
        cw = max(1, int((x1 - x0) * rng.uniform(0.2, 0.5)))
        cc = np.array(_col((200, 190, 170), rng, 40), np.float32)
        glass = np.repeat(glass, x1 - x0, axis=1)
        if rng.random() < 0.5:
            glass[:, :cw] = cc
        else:
            glass[:, -cw:] = cc
    img[y0:y1, x0:x1] = np.clip(glass, 0, 255).astype(np.uint8)
    labels[y0:y1, x0:x1] = lab
    if st["arch"]:
        rad = (x1 - x0) // 2
        cv2.ellipse(img, ((x0 + x1) // 2, y0), (rad, rad // 2), 0, 180, 360, tuple(int(v) for v in base * 1.5), -1)
        cv2.ellipse(labels, ((x0 + x1) // 2, y0), (rad, rad // 2), 0, 180, 360, int(lab), -1)
    m = st["mullion"]
    mt = max(1, ft // 2 + 1)
    lines = []
    if m in (1, 2, 3):
        lines.append(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1))
    if m in (2, 3):
        yy = y0 + gh // 3
        lines.append((x0, yy, x1, yy))
    if m == 3:
        yy = y0 + 2 * gh // 3
        lines.append((x0, yy, x1, yy))
        for xx in (x0 + (x1 - x0) // 4, x0 + 3 * (x1 - x0) // 4):
            lines.append((xx, y0, xx, y1))
    for a, b, c, d in lines:
        cv2.line(img, (a, b), (c, d), fc, mt)
        cv2.line(labels, (a, b), (c, d), 0, mt)
    if st["balcony"]:
        by0 = y1 - int(0.25 * gh)
        dark = (40, 40, 45)
        cv2.rectangle(img, (x0 - 3 * ft, by0), (x1 + 3 * ft, by0 + max(1, ft)), dark, -1)
        cv2.line(img, (x0 - 3 * ft, y1 + ft), (x1 + 3 * ft, y1 + ft), dark, max(1, ft))
        for xx in range(x0 - 3 * ft, x1 + 3 * ft, max(3, ppm // 6)):
            cv2.line(img, (xx, by0), (xx, y1 + ft), dark, 1)


def _make_facade(rng, length_m, conf, styles) -> Facade:
    ppm = int(conf["pixels_per_metre"])
    H, W = int(_HMAX * ppm), int(round(length_m * ppm))
    base = np.zeros((H, W, 3), np.float32)
    low = _smooth_noise(rng, H, W, 3 * ppm)
    streak = cv2.resize(rng.standard_normal((6, max(2, W // 4))).astype(np.float32), (W, H),
                        interpolation=cv2.INTER_CUBIC)
    fine = rng.standard_normal((H, W)).astype(np.float32)
    roof = np.zeros(W, np.float32)
    buildings = []
    x = 0
    while x < W:
        bw = int(rng.uniform(*conf["building_width"]) * ppm)
        x1 = min(W, x + bw)
        if W - x1 < conf["building_width"][0] * ppm:
            x1 = W
        h = float(rng.uniform(*conf["building_height"]))
        colour = np.array(_col(_PALETTE[int(rng.integers(len(_PALETTE)))], rng, 14), np.float32)
        material = str(rng.choice(["plaster", "plaster", "brick", "stone", "panel", "concrete"]))
        buildings.append({"x0": x, "x1": x1, "h": h, "colour": colour, "material": material})
        roof[x:x1] = h
        x = x1
    for b in buildings:
        x0, x1 = b["x0"], b["x1"]
        top = int((_HMAX - b["h"]) * ppm)
        hh, ww = H - top, x1 - x0
        reg = np.ones((hh, ww), np.float32)
        mat = b["material"]
        if mat == "brick":
            reg *= _block_pattern(hh, ww, max(3, ppm // 4), max(6, ppm // 2), 1, True, rng, 0.1)
        elif mat == "stone":
            reg *= _block_pattern(hh, ww, int(0.6 * ppm), int(1.2 * ppm), 1, True, rng, 0.06)
        elif mat == "panel":
            step = int(rng.uniform(0.3, 0.8) * ppm)
            if rng.random() < 0.5:
                reg[:, (np.arange(ww) % step) == 0] *= 0.8
            else:
                reg[(np.arange(hh) % step) == 0, :] *= 0.8
        elif mat == "concrete":
            reg *= _block_pattern(hh, ww, int(2.4 * ppm), int(1.2 * ppm), 1, False, rng, 0.04)
        amp_low = rng.uniform(0.03, 0.09)
        amp_fine = {"concrete": 0.06, "plaster": 0.025}.get(mat, 0.035)
        reg *= 1 + amp_low * low[top:, x0:x1] + amp_fine * fine[top:, x0:x1] + 0.04 * streak[top:, x0:x1]
        base[top:, x0:x1] = reg[:, :, None] * b["colour"][None, None, :]
        # ground level grime, slightly darker
        g = int(0.6 * ppm)
        base[H - g:, x0:x1] *= 0.85
    img = np.clip(base, 0, 255).astype(np.uint8)
    labels = np.zeros((H, W), np.uint16)
    kinds = [0]

    def new_label(kind):
        kinds.append(kind)
        return len(kinds) - 1

    def m2y(z):  # height above ground (m) -> atlas row
        return int(round((_HMAX - z) * ppm))

    for b in buildings:
        x0, x1, h = b["x0"], b["x1"], b["h"]
        ww_m = (x1 - x0) / ppm
        st = styles[int(rng.integers(len(styles)))] if rng.random() < 0.75 else _window_styles(rng, 1)[0]
        gfloor = rng.uniform(3.5, 4.5)
        fh = rng.uniform(2.9, 3.5)
        n_up = max(0, int((h - gfloor - 0.8) / fh))
        blank = rng.random() < 0.08
        # cornice and string courses
        shade = rng.choice([0.75, 1.2])
        cc = tuple(int(min(255, v * shade)) for v in b["colour"])
        cv2.rectangle(img, (x0, m2y(h)), (x1 - 1, m2y(h - rng.uniform(0.3, 0.7))), cc, -1)
        if rng.random() < 0.4:
            cv2.rectangle(img, (x0, m2y(gfloor)), (x1 - 1, m2y(gfloor - 0.25)), cc, -1)
        # upper floors
        n_bays = max(1, int((ww_m - 1.0) / st["bay"]))
        margin = (ww_m - n_bays * st["bay"]) / 2
        if not blank:
            for f in range(n_up):
                zb = gfloor + f * fh + 0.9
                for k in range(n_bays):
                    cx = margin + (k + 0.5) * st["bay"]
                    wx0 = x0 + int((cx - st["ww"] / 2) * ppm)
                    wx1 = x0 + int((cx + st["ww"] / 2) * ppm)
                    wy1, wy0 = m2y(zb), m2y(zb + min(st["wh"], fh - 1.0))
                    if rng.random() < 0.06:
                        continue  # bricked-up window
                    if st["shutters"] and rng.random() < 0.15:  # closed shutters
                        cv2.rectangle(img, (wx0, wy0), (wx1, wy1), st["shutter_col"], -1)
                        for yy in range(wy0, wy1, 3):
                            cv2.line(img, (wx0, yy), (wx1, yy),
                                     tuple(int(v * 0.7) for v in st["shutter_col"]), 1)
                        continue
                    _draw_window(img, labels, new_label(KIND_WINDOW), wx0, wy0, wx1, wy1, st, ppm, rng)
                    if rng.random() < 0.05:  # air conditioner
                        ax = wx1 + int(0.3 * ppm)
                        cv2.rectangle(img, (ax, wy1 - int(0.6 * ppm)), (ax + int(0.8 * ppm), wy1),
                                      (180, 180, 175), -1)
                        for yy in range(wy1 - int(0.55 * ppm), wy1, 2):
                            cv2.line(img, (ax + 2, yy), (ax + int(0.8 * ppm) - 2, yy), (120, 120, 120), 1)
        else:  # a blank wall: mural landmark
            mz0, mz1 = gfloor + 0.5, min(h - 1.0, gfloor + 0.5 + rng.uniform(5, 9))
            if mz1 > mz0 + 2:
                my0, my1 = m2y(mz1), m2y(mz0)
                mx0, mx1 = x0 + ppm, x1 - ppm
                # drawn on a copy of the mural area so that nothing spills outside it
                mural = np.empty((my1 - my0, mx1 - mx0, 3), np.uint8)
                mural[:] = _VIVID[int(rng.integers(len(_VIVID)))]
                mh, mw = mural.shape[:2]
                for _ in range(int(rng.integers(4, 9))):
                    col = _VIVID[int(rng.integers(len(_VIVID)))]
                    c0 = (int(rng.integers(0, max(1, mw))), int(rng.integers(0, max(1, mh))))
                    if rng.random() < 0.5:
                        cv2.circle(mural, c0, int(rng.uniform(0.5, 2.5) * ppm), col, -1, cv2.LINE_AA)
                    else:
                        pts = np.array([c0] + [(c0[0] + int(rng.uniform(-3, 3) * ppm),
                                                c0[1] + int(rng.uniform(-3, 3) * ppm)) for _ in range(2)],
                                       np.int32)
                        cv2.fillPoly(mural, [pts], col, cv2.LINE_AA)
                img[my0:my1, mx0:mx1] = mural
        # ground floor
        gy1 = m2y(0.0)
        if rng.random() < 0.5 and ww_m > 5:  # shop front
            sx0, sx1 = x0 + int(0.5 * ppm), x1 - int(0.5 * ppm)
            sign_h = rng.uniform(0.6, 1.0)
            sign_col = _col(_VIVID[int(rng.integers(len(_VIVID)))], rng, 20)
            sy0, sy1 = m2y(gfloor - 0.2), m2y(gfloor - 0.2 - sign_h)
            glass_top = m2y(gfloor - 0.3 - sign_h)
            cv2.rectangle(img, (sx0, sy0), (sx1, sy1), sign_col, -1)
            lab = new_label(KIND_SIGN)
            labels[sy0:sy1, sx0:sx1] = lab
            tcol = (250, 250, 250) if sum(sign_col) < 380 else (20, 20, 20)
            _put_text_fit(img, _random_word(rng), sx0, sy0, sx1, sy1, tcol, rng)
            frame = _FRAME_COLOURS[int(rng.integers(len(_FRAME_COLOURS)))]
            cv2.rectangle(img, (sx0, glass_top), (sx1, gy1 - int(0.3 * ppm)), frame, -1)
            # panes and a door
            n_p = max(1, int((sx1 - sx0) / (rng.uniform(1.5, 3.0) * ppm)))
            pw = (sx1 - sx0) / n_p
            door = int(rng.integers(n_p))
            for k in range(n_p):
                px0, px1 = int(sx0 + k * pw + 3), int(sx0 + (k + 1) * pw - 3)
                py0, py1 = glass_top + 3, gy1 - int(0.3 * ppm) - (0 if k == door else int(0.5 * ppm))
                if k == door:
                    py1 = gy1 - 1
                if px1 <= px0 or py1 <= py0:
                    continue
                g = np.array([70, 80, 90], np.float32) + rng.uniform(-15, 15)
                grad = np.linspace(1.4, 0.7, py1 - py0, dtype=np.float32)[:, None, None]
                pane = np.clip(g * grad + 8 * rng.standard_normal((py1 - py0, px1 - px0, 1)), 0, 255)
                img[py0:py1, px0:px1] = pane.astype(np.uint8)
                labels[py0:py1, px0:px1] = new_label(KIND_SHOP)
                if rng.random() < 0.4:  # shelves/goods behind the glass
                    for _ in range(int(rng.integers(2, 6))):
                        gx = int(rng.integers(px0, px1))
                        gy = int(rng.integers(py0, py1))
                        cv2.rectangle(img, (gx, gy), (gx + int(rng.integers(3, 15)), gy + int(rng.integers(3, 12))),
                                      _col((150, 140, 120), rng, 60), -1)
            if rng.random() < 0.4:  # striped awning
                ay0, ay1 = glass_top, glass_top + int(0.6 * ppm)
                c1, c2 = _col(_VIVID[int(rng.integers(len(_VIVID)))], rng), (245, 245, 240)
                step = max(4, int(0.4 * ppm))
                for k, xx in enumerate(range(sx0, sx1, step)):
                    cv2.rectangle(img, (xx, ay0), (min(sx1, xx + step), ay1), c1 if k % 2 else c2, -1)
        else:  # residential: doors and barred windows
            n_d = 1 if ww_m < 12 else 2
            for k in range(n_d):
                dx = x0 + int(((k + 0.5) * ww_m / n_d + rng.uniform(-1.5, 1.5)) * ppm)
                dw = int(rng.uniform(1.0, 1.6) * ppm)
                dh = rng.uniform(2.2, 2.8)
                dcol = _col(rng.choice([(110, 70, 40), (40, 40, 45), (150, 40, 40), (40, 80, 60), (200, 200, 195)]), rng)
                cv2.rectangle(img, (dx - dw // 2 - 3, m2y(dh + 0.15)), (dx + dw // 2 + 3, m2y(0)), (200, 195, 185), -1)
                cv2.rectangle(img, (dx - dw // 2, m2y(dh)), (dx + dw // 2, m2y(0)), dcol, -1)
                for py in (m2y(dh * 0.8), m2y(dh * 0.4)):
                    cv2.rectangle(img, (dx - dw // 2 + 3, py), (dx + dw // 2 - 3, py + int(0.6 * ppm)),
                                  tuple(int(v * 0.8) for v in dcol), 1)
                _put_text_fit(img, str(int(rng.integers(1, 999))), dx - dw // 2, m2y(dh + 0.6),
                              dx + dw // 2, m2y(dh + 0.2), (30, 30, 30), rng, cv2.FONT_HERSHEY_SIMPLEX)
            gst = dict(st, shutters=False, balcony=False, arch=False)
            for k in range(n_bays):
                cx = margin + (k + 0.5) * st["bay"]
                if any(abs(x0 + cx * ppm - (x0 + ((j + 0.5) * ww_m / n_d) * ppm)) < 2.2 * ppm for j in range(n_d)):
                    continue
                wx0, wx1 = x0 + int((cx - st["ww"] / 2) * ppm), x0 + int((cx + st["ww"] / 2) * ppm)
                wy0, wy1 = m2y(min(gfloor - 0.6, 2.9)), m2y(1.0)
                _draw_window(img, labels, new_label(KIND_WINDOW), wx0, wy0, wx1, wy1, gst, ppm, rng)
                for xx in range(wx0, wx1, max(3, ppm // 5)):  # bars
                    cv2.line(img, (xx, wy0), (xx, wy1), (35, 35, 35), 1)
        # extras
        if rng.random() < 0.5:  # drain pipe
            px = x0 + 3 if rng.random() < 0.5 else x1 - 4
            cv2.line(img, (px, m2y(h)), (px, m2y(0)), _col((90, 90, 90), rng, 30), max(2, ppm // 10))
        if rng.random() < 0.3:  # graffiti
            for _ in range(int(rng.integers(2, 6))):
                col = _VIVID[int(rng.integers(len(_VIVID)))]
                n = int(rng.integers(3, 7))
                gx = rng.uniform(x0, x1)
                pts = np.stack([gx + np.cumsum(rng.uniform(-0.8, 0.8, n)) * ppm,
                                m2y(0) - rng.uniform(0.3, 2.4, n) * ppm], 1).astype(np.int32)
                cv2.polylines(img, [pts], False, col, int(rng.integers(2, 5)), cv2.LINE_AA)
            if rng.random() < 0.6:
                gx = int(rng.uniform(x0, max(x0 + 1, x1 - 3 * ppm)))
                cv2.putText(img, _random_word(rng).lower(), (gx, m2y(rng.uniform(0.6, 1.6))),
                            cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, rng.uniform(0.8, 1.6),
                            _VIVID[int(rng.integers(len(_VIVID)))], 2, cv2.LINE_AA)
        if rng.random() < 0.3:  # posters
            for _ in range(int(rng.integers(1, 4))):
                px = int(rng.uniform(x0 + 5, max(x0 + 6, x1 - 0.8 * ppm)))
                py = m2y(rng.uniform(1.2, 2.0))
                pcol = _col((230, 220, 200), rng, 30)
                cv2.rectangle(img, (px, py), (px + int(0.6 * ppm), py + int(0.9 * ppm)), pcol, -1)
                cv2.rectangle(img, (px + 2, py + 2), (px + int(0.6 * ppm) - 2, py + int(0.4 * ppm)),
                              _VIVID[int(rng.integers(len(_VIVID)))], -1)
                for yy in range(py + int(0.5 * ppm), py + int(0.85 * ppm), 3):
                    cv2.line(img, (px + 2, yy), (px + int(rng.uniform(0.2, 0.55) * ppm), yy), (40, 40, 40), 1)
        if rng.random() < 0.15:  # a hanging blade sign (landmark)
            bx = int(rng.uniform(x0 + ppm, max(x0 + ppm + 1, x1 - 2 * ppm)))
            by = m2y(rng.uniform(4.5, 8.0))
            col = _VIVID[int(rng.integers(len(_VIVID)))]
            cv2.rectangle(img, (bx, by), (bx + int(0.9 * ppm), by + int(2.5 * ppm)), col, -1)
            lab = new_label(KIND_SIGN)
            labels[by:by + int(2.5 * ppm), bx:bx + int(0.9 * ppm)] = lab
            word = _random_word(rng)[:4]
            for k, ch in enumerate(word):
                _put_text_fit(img, ch, bx, by + k * int(0.6 * ppm), bx + int(0.9 * ppm),
                              by + (k + 1) * int(0.6 * ppm), (250, 250, 250) if sum(col) < 380 else (10, 10, 10), rng)
        # party wall line
        cv2.line(img, (x0, m2y(b["h"])), (x0, H - 1), (70, 65, 60), 1)
    # sky above the roofs stays black (it is never sampled: the roof profile masks it)
    return Facade(img, roof, labels, np.asarray(kinds, np.uint8), buildings)


def _lamp_positions(street: Street, rng) -> list[tuple[float, float]]:
    """Street lamps (x of the pole, y): staggered on both sidewalks."""
    out = []
    off = rng.uniform(0, _LAMP_SPACING)
    half = street.width / 2 - _SIDEWALK + 0.4
    y = street.ymin + off
    k = 0
    while y < street.ymax:
        out.append(((half if k % 2 else -half), y))
        y += _LAMP_SPACING / 2
        k += 1
    return out


def _night_facade(fac: Facade, side_sign: float, street: Street, lamps, rng, ppm) -> np.ndarray:
    """The night appearance of a facade: same layout, dark walls, lamp light, lit windows."""
    H, W = fac.day.shape[:2]
    day = fac.day.astype(np.float32) * np.float32(1 / 255)
    amb = np.array([0.10, 0.11, 0.16], np.float32) * np.float32(rng.uniform(0.8, 1.2))
    lamp_col = np.array([1.0, 0.72, 0.42] if rng.random() < 0.7 else [0.85, 0.9, 1.0], np.float32)
    # light = ambient + (vertical profile x horizontal profile of the lamps) * lamp colour
    u = np.arange(W, dtype=np.float32) / ppm  # metres along the atlas
    prof = np.zeros(W, np.float32)
    for lx, ly in lamps:
        ua = (ly - street.ymin) if side_sign < 0 else (street.ymax - ly)
        near = (lx * side_sign) > 0
        sig, amp = (3.5, 0.8) if near else (6.0, 0.2)
        lo, hi = int(max(0, (ua - 4 * sig) * ppm)), int(min(W, (ua + 4 * sig) * ppm))
        prof[lo:hi] += amp * np.exp(-0.5 * ((u[lo:hi] - ua) / sig) ** 2)
    z = _HMAX - (np.arange(H, dtype=np.float32) + 0.5) / ppm
    vprof = np.exp(-0.5 * ((z - 4.0) / 3.5) ** 2) * 0.85 + 0.15
    light = np.outer(vprof, prof).astype(np.float32)
    night = np.empty_like(day)
    for c in range(3):
        night[:, :, c] = day[:, :, c] * (amb[c] + lamp_col[c] * light)
    # lit windows / shops / signs
    n = len(fac.kinds)
    lit = np.zeros(n, bool)
    for kind, p in ((KIND_WINDOW, rng.uniform(0.25, 0.45)), (KIND_SHOP, 0.55), (KIND_SIGN, 0.6)):
        sel = fac.kinds == kind
        lit[sel] = rng.random(int(sel.sum())) < p
    lit[0] = False
    emis = np.array(_EMISSIVE, np.float32)[rng.integers(len(_EMISSIVE), size=n)] / 255.0
    emis *= rng.uniform(0.6, 1.0, size=(n, 1)).astype(np.float32)
    idx = np.flatnonzero(lit[fac.labels])
    if idx.size:
        lab = fac.labels.reshape(-1)[idx]
        d = day.reshape(-1, 3)[idx]
        lum = d.mean(axis=1, keepdims=True)
        val = emis[lab] * (0.45 + 0.9 * lum)
        sign = fac.kinds[lab] == KIND_SIGN
        val[sign] = np.minimum(1.0, d[sign] * 1.15 + 0.08)
        night.reshape(-1, 3)[idx] = val
        # glow of the lit panes onto the wall around them (blurred at quarter resolution)
        emit = np.zeros((H, W, 3), np.float32)
        emit.reshape(-1, 3)[idx] = val
        small = cv2.resize(emit, (max(1, W // 4), max(1, H // 4)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), 0.1 * ppm)
        night += 0.35 * cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    return np.clip(night * 255.0, 0, 255).astype(np.uint8)


def _make_ground(street: Street, rng, lamps):
    """Day and night ground textures (rows: far end first, v = (ymax - y) * ppm; cols: x + w/2)."""
    ppm = _GROUND_PPM
    W = int(round(street.width * ppm))
    H = int(round((street.ymax - street.ymin) * ppm))
    asphalt = 75 + 10 * _smooth_noise(rng, H, W, 4 * ppm) + 9 * rng.standard_normal((H, W)).astype(np.float32)
    img = np.repeat(asphalt[:, :, None], 3, axis=2) * np.array([1.0, 1.0, 1.03], np.float32)
    sw = int(_SIDEWALK * ppm)
    pave = 150 + 8 * _smooth_noise(rng, H, sw, 2 * ppm) + 6 * rng.standard_normal((H, sw)).astype(np.float32)
    tile = int(0.6 * ppm)
    for c0 in (0, W - sw):
        img[:, c0:c0 + sw] = pave[:, :, None] * np.array([1.0, 0.98, 0.95], np.float32)
        img[(np.arange(H) % tile) == 0, c0:c0 + sw] *= 0.85
        cols = np.arange(c0, c0 + sw)
        img[:, cols[(cols % tile) == 0]] *= 0.85
    img[:, sw - 1:sw + 1] = 190  # curbs
    img[:, W - sw - 1:W - sw + 1] = 190
    # dashed centre line, crossings, patches, manholes
    cx = W // 2
    period, dash = int(9 * ppm), int(3 * ppm)
    phase = int(rng.integers(period))
    for v0 in range(-phase, H, period):
        img[max(0, v0):max(0, v0 + dash), cx - 1:cx + 1] = (225, 215, 180)
    for _ in range(int(rng.integers(1, 4))):
        v0 = int(rng.integers(0, H - 4 * ppm))
        for xx in range(sw + 3, W - sw - 3, int(1.0 * ppm)):
            img[v0:v0 + 3 * ppm, xx:xx + int(0.5 * ppm)] = 215
    for _ in range(int(H / ppm / 25)):
        pv, pu = int(rng.integers(0, H)), int(rng.integers(sw, max(sw + 1, W - sw - 3 * ppm)))
        img[pv:pv + int(rng.uniform(1, 4) * ppm), pu:pu + int(rng.uniform(1, 3) * ppm)] *= 0.8
    day = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(H / ppm / 15)):
        pv, pu = int(rng.integers(0, H)), int(rng.integers(sw, W - sw))
        cv2.circle(day, (pu, pv), int(0.35 * ppm), (55, 55, 55), -1)
        cv2.circle(day, (pu, pv), int(0.35 * ppm), (100, 100, 100), 1)
    # night: ambient plus pools of lamp light
    xs = (np.arange(W, dtype=np.float32) + 0.5) / ppm - street.width / 2
    ys = street.ymax - (np.arange(H, dtype=np.float32) + 0.5) / ppm
    light = np.zeros((H, W), np.float32)
    for lx, ly in lamps:
        sel = np.abs(ys - ly) < 15
        if sel.any():
            hx = lx - math.copysign(1.0, lx)
            light[sel] += 1.1 * np.exp(-0.5 * (((xs[None, :] - hx) / 3.5) ** 2 + ((ys[sel, None] - ly) / 3.5) ** 2))
    f = day.astype(np.float32) / 255.0
    night = f * (np.array([0.05, 0.06, 0.10], np.float32) + light[:, :, None] * np.array([1.0, 0.75, 0.45], np.float32))
    return day, np.clip(night * 255, 0, 255).astype(np.uint8)


_PAD = 8  # rows between the blocks of the atlas
_SKY_ROWS = 64
_MIP_LEVELS = 3


@dataclass
class StreetScene:
    """Everything needed to render views of one street.

    ``atlas[variant]`` is a mip pyramid of one image stacking, top to bottom, the
    left facade, the right facade, the ground (rows: x across the street; columns:
    y along it, at the facade resolution) and a sky gradient strip, each block
    separated by ``_PAD`` rows, so that a view needs one ``cv2.remap`` per level.
    """

    street: Street
    ppm: int
    rows: dict  # block name -> first row
    roof_l: np.ndarray
    roof_r: np.ndarray
    atlas: dict  # variant -> [level0, level1, ...] uint8 RGB
    lamps: list


def _sky_strip(width, night):
    if night:
        hor, zen = np.array([45, 35, 40], np.float32), np.array([6, 9, 22], np.float32)
    else:
        hor, zen = np.array([225, 230, 235], np.float32), np.array([95, 145, 215], np.float32)
    t = np.linspace(0, 1, _SKY_ROWS, dtype=np.float32)[:, None] ** 0.7
    col = hor[None, :] * (1 - t) + zen[None, :] * t
    return np.ascontiguousarray(np.broadcast_to(col[:, None, :], (_SKY_ROWS, width, 3)).astype(np.uint8))


def _stack(blocks):
    out = []
    for k, b in enumerate(blocks):
        out.append(b)
        if k + 1 < len(blocks):  # padding: replicate the edges of both neighbours
            out.append(np.repeat(b[-1:], _PAD // 2, axis=0))
            out.append(np.repeat(blocks[k + 1][:1], _PAD // 2, axis=0))
    return np.ascontiguousarray(np.concatenate(out, axis=0))


def _pyramid(img):
    levels = [img]
    for _ in range(_MIP_LEVELS - 1):
        levels.append(cv2.pyrDown(levels[-1]))
    return levels


def _fill_sky(img, roof, ppm, colour):
    """Paint the atlas above the roof line with a sky colour (avoids dark halos at mip levels)."""
    z = _HMAX - (np.arange(img.shape[0], dtype=np.float32) + 0.5) / ppm
    img[z[:, None] > roof[None, :] + 0.5 / ppm] = colour
    return img


def _build_scene(street: Street, conf: dict, styles, seed: int) -> StreetScene:
    rng = np.random.default_rng([seed, 1, street.index])
    ppm = int(conf["pixels_per_metre"])
    length_m = street.ymax - street.ymin
    left = _make_facade(rng, length_m, conf, styles)
    right = _make_facade(rng, length_m, conf, styles)
    lamps = _lamp_positions(street, rng)
    Hf, Wf = left.day.shape[:2]
    g_day, g_night = _make_ground(street, rng, lamps)

    def ground_block(g):  # -> rows: (x + w/2) * gppm, cols: (y - ymin) * ppm
        g = np.ascontiguousarray(g.transpose(1, 0, 2)[:, ::-1])
        return cv2.resize(g, (Wf, g.shape[0]), interpolation=cv2.INTER_LINEAR)

    rows = {"left": 0, "right": Hf + _PAD}
    rows["ground"] = rows["right"] + Hf + _PAD
    rows["sky"] = rows["ground"] + g_day.shape[1] + _PAD
    atlas = {}
    day_sky = (200, 210, 225)
    atlas["day"] = _pyramid(_stack([_fill_sky(left.day, left.roof, ppm, day_sky),
                                    _fill_sky(right.day, right.roof, ppm, day_sky),
                                    ground_block(g_day), _sky_strip(Wf, False)]))
    gn = ground_block(g_night)
    sky_n = _sky_strip(Wf, True)
    for v in range(_NIGHT_VARIANTS):
        nrng = np.random.default_rng([seed, 2, street.index, v])
        nl = _fill_sky(_night_facade(left, -1.0, street, lamps, nrng, ppm), left.roof, ppm, (20, 18, 26))
        nr = _fill_sky(_night_facade(right, +1.0, street, lamps, nrng, ppm), right.roof, ppm, (20, 18, 26))
        atlas[f"night{v}"] = _pyramid(_stack([nl, nr, gn, sky_n]))
    return StreetScene(street, ppm, rows, left.roof, right.roof, atlas, lamps)


# --------------------------------------------------------------------------- rendering


def _project(points, cam: Camera, fpx, Ws, Hs):
    f, r, u = cam.basis()
    d = np.asarray(points, np.float64) - np.array([cam.x, cam.y, cam.z])
    zc = d @ f
    xs = Ws / 2 - 0.5 + fpx * (d @ r) / np.maximum(zc, 1e-6)
    ys = Hs / 2 - 0.5 - fpx * (d @ u) / np.maximum(zc, 1e-6)
    return np.stack([xs, ys], 1), zc


def _render(scene: StreetScene, cam: Camera, variant: str, size, ss: int, rng,
            occluders: bool = False) -> np.ndarray:
    """Render one view; returns a uint8 RGB image of ``size`` (W, H)."""
    st = scene.street
    night = variant != "day"
    W, H = size
    Ws, Hs = int(W * ss), int(H * ss)
    fpx = (Ws / 2) / math.tan(math.radians(cam.hfov) / 2)
    f, r, u = (v.astype(np.float32) for v in cam.basis())
    a = (((np.arange(Ws, dtype=np.float32) + 0.5) - Ws / 2) / fpx)[None, :]
    b = (((np.arange(Hs, dtype=np.float32) + 0.5) - Hs / 2) / fpx)[:, None]
    dx = (f[0] - b * u[0]) + a * r[0]
    dy = (f[1] - b * u[1]) + a * r[1]
    dz = (f[2] - b * u[2]) + a * r[2]
    inv_dn = 1.0 / np.sqrt(dx * dx + dy * dy + dz * dz)
    half = st.width / 2
    ppm = scene.ppm
    right = dx > 0
    inf = np.float32(np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tw = np.where(right, np.float32(half - cam.x), np.float32(-half - cam.x)) / dx
        tw = np.where(tw > 0, tw, inf)
        tg = np.where(dz < 0, np.float32(-cam.z) / dz, inf)
        yw = cam.y + tw * dy
        zw = cam.z + tw * dz
        uw = np.where(right, (st.ymax - yw) * ppm, (yw - st.ymin) * ppm)
        inside = (yw > st.ymin) & (yw < st.ymax) & (tw < tg)
    nu = scene.roof_l.shape[0]
    ui = np.clip(np.where(inside, uw, 0), 0, nu - 1).astype(np.int32)
    roof = np.where(right, scene.roof_r[ui], scene.roof_l[ui])
    wall = inside & (zw <= roof)
    ground = ~wall & (tg < inf)
    sky = ~(wall | ground)
    tgf = np.where(ground, tg, 0)
    gx = cam.x + tgf * dx
    gy = cam.y + tgf * dy
    rows = scene.rows
    mx = np.where(wall, uw, (gy - st.ymin) * ppm)
    my = np.where(wall, (_HMAX - zw) * ppm + np.where(right, np.float32(rows["right"]), 0),
                  rows["ground"] + (gx + half) * _GROUND_PPM)
    # sky: a row of the gradient strip chosen by the elevation of the ray
    t = np.clip(dz * inv_dn / 0.6, 0, 1)
    mx[sky] = 8.0
    my[sky] = rows["sky"] + 1 + t[sky] * (_SKY_ROWS - 3)
    mx = mx.astype(np.float32)
    my = my.astype(np.float32)
    dist = np.where(wall, tw, tgf) / inv_dn
    cos_i = np.where(wall, np.abs(dx), np.abs(dz)) * inv_dn
    texels = dist * np.float32(ppm / fpx) / np.sqrt(np.maximum(cos_i, 0.03))
    lod = np.clip(np.log2(np.maximum(texels, 1e-3)), 0, _MIP_LEVELS - 1)
    lod[sky] = 0
    # trilinear-ish mip sampling: one remap per level, blended by level of detail
    img = None
    for k, lvl in enumerate(scene.atlas[variant]):
        s = 0.5 ** k
        smp = cv2.remap(lvl, (mx + 0.5) * s - 0.5, (my + 0.5) * s - 0.5, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
        if img is None:
            img = smp
        else:
            wk = np.clip(lod - (k - 1), 0, 1).astype(np.float32)
            img = cv2.blendLinear(img, smp, 1 - wk, wk)
    # distance haze (day) / darkness (night)
    fog_col = (225, 230, 235) if not night else (10, 10, 14)
    fog = (1 - np.exp(-np.where(sky, 0, dist) / (260.0 if not night else 120.0))).astype(np.float32)
    img = cv2.blendLinear(img, np.full_like(img, fog_col), 1 - fog, fog)

    # street lamps: poles (day and night), glows (night)
    glows = []
    for lx, ly in scene.lamps:
        if not (cam.y - 5 < ly < cam.y + 200):
            continue
        hx = lx - math.copysign(1.0, lx)
        pts = [(lx, ly, 0.0), (lx, ly, _LAMP_HEIGHT + 0.2), (hx, ly, _LAMP_HEIGHT + 0.2), (hx, ly, _LAMP_HEIGHT)]
        p, zc = _project(pts, cam, fpx, Ws, Hs)
        if (zc < 0.8).any():
            continue
        p = np.clip(p, -1e5, 1e5)
        th = max(1, int(round(fpx * 0.14 / zc[0])))
        col = (35, 35, 38) if not night else (12, 12, 14)
        for k in range(3):
            cv2.line(img, tuple(int(v) for v in p[k]), tuple(int(v) for v in p[k + 1]), col, th, cv2.LINE_AA)
        if night:
            glows.append((p[3], zc[3]))
    if occluders:
        _draw_occluders(img, cam, st, fpx, Ws, Hs, rng, night)
    if night and glows:
        img = img.astype(np.float32)
        for (px, py), zc in glows:
            s = fpx * 0.9 / zc
            rad = 9 * s
            x0, x1 = int(max(0, px - rad)), int(min(Ws, px + rad + 1))
            y0, y1 = int(max(0, py - rad)), int(min(Hs, py + rad + 1))
            if x1 <= x0 or y1 <= y0:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            d2 = ((xx - px) ** 2 + (yy - py) ** 2) / (s * s)
            img[y0:y1, x0:x1] += (np.exp(-0.5 * d2)[:, :, None] * np.array([300, 240, 160], np.float32)
                                  + np.exp(-0.5 * d2 / 9)[:, :, None] * np.array([55, 36, 20], np.float32))
        img = np.clip(img, 0, 255).astype(np.uint8)
    if (Ws, Hs) != (W, H):
        img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
    return img


def _draw_occluders(img, cam, st, fpx, Ws, Hs, rng, night):
    look_right = cam.yaw > 0
    sgn = 1.0 if look_right else -1.0
    for _ in range(int(rng.integers(1, 3))):
        if rng.random() < 0.6:  # a parked car next to the curb, on the side we look at
            cx = sgn * (st.width / 2 - _SIDEWALK - 1.1)
            cy = cam.y + rng.uniform(5, 14)
            L, Wd, Hc = rng.uniform(3.8, 4.8), 1.8, rng.uniform(1.4, 1.6)
            corners = [(cx + sx * Wd / 2, cy + sy * L / 2, sz)
                       for sx in (-1, 1) for sy in (-1, 1) for sz in (0.25, Hc * 0.6)]
            cabin = [(cx + sx * Wd / 2 * 0.85, cy + sy * L / 2 * 0.55 - 0.2, sz)
                     for sx in (-1, 1) for sy in (-1, 1) for sz in (Hc * 0.6, Hc)]
            p1, z1 = _project(corners, cam, fpx, Ws, Hs)
            p2, z2 = _project(cabin, cam, fpx, Ws, Hs)
            if (z1 < 0.5).any() or (z2 < 0.5).any():
                continue
            body = np.array(_col(_VIVID[int(rng.integers(len(_VIVID)))], rng, 30), np.float64)
            if night:
                body *= 0.15
            cv2.fillConvexPoly(img, cv2.convexHull(p2.astype(np.int32)), tuple(body * 0.4 + 10), cv2.LINE_AA)
            cv2.fillConvexPoly(img, cv2.convexHull(p1.astype(np.int32)), tuple(body), cv2.LINE_AA)
            # wheels
            for sy in (-1, 1):
                wp, wz = _project([(cx - sgn * Wd / 2, cy + sy * L * 0.32, 0.33)], cam, fpx, Ws, Hs)
                rad = max(1, int(fpx * 0.33 / wz[0]))
                cv2.circle(img, tuple(int(v) for v in wp[0]), rad, (15, 15, 15), -1, cv2.LINE_AA)
        else:  # a pedestrian on the sidewalk
            px_ = sgn * (st.width / 2 - rng.uniform(0.8, 2.0))
            py_ = cam.y + rng.uniform(3, 10)
            hgt = rng.uniform(1.6, 1.9)
            p, zc = _project([(px_, py_, 0.0), (px_, py_, hgt * 0.45), (px_, py_, hgt * 0.93)], cam, fpx, Ws, Hs)
            if (zc < 0.8).any():
                continue
            s = fpx / zc[1]
            col = _col((60, 50, 55), rng, 40) if not night else (8, 8, 10)
            body_c = tuple(int(v) for v in (p[0] + p[2]) / 2)
            cv2.ellipse(img, body_c, (max(1, int(0.25 * s)), max(1, int(abs(p[0][1] - p[2][1]) / 2))), 0, 0, 360,
                        col, -1, cv2.LINE_AA)
            cv2.circle(img, tuple(int(v) for v in p[2]), max(1, int(0.12 * s)), col, -1, cv2.LINE_AA)


def _post_day(img, rng):
    img = img.astype(np.float32)
    gain = rng.uniform(0.85, 1.15)
    gamma = rng.uniform(0.9, 1.1)
    out = 255.0 * np.clip(img * gain / 255.0, 0, 1) ** gamma
    out += 1.5 * rng.standard_normal(out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _post_night(img, rng):
    if rng.random() < 0.5:
        tint = np.array([0.85, 0.95, 1.25], np.float32)  # blue
    else:
        tint = np.array([1.2, 0.95, 0.75], np.float32)  # orange
    img = img.astype(np.float32) * tint * rng.uniform(0.8, 1.2)
    out = 255.0 * np.clip(img / 255.0, 0, 1) ** rng.uniform(0.75, 0.95)
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 0.8))
    sig = rng.uniform(1.5, 4)
    noise = sig * rng.standard_normal(out.shape[:2] + (1,)).astype(np.float32)
    noise = noise + 0.5 * sig * rng.standard_normal(out.shape).astype(np.float32)
    return np.clip(out + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- dataset


@dataclass
class _Shot:
    street: int
    cam: Camera
    variant: str
    kind: str  # "db" or "query"
    index: int
    occluders: bool = False
    quality: int = 90


def _plan(conf: dict, streets: list[Street], seed: int) -> tuple[list[_Shot], list[_Shot]]:
    db, queries = [], []
    sp = float(conf["db_spacing"])
    for st in streets:
        n_pos = int(round(st.length / sp)) + 1
        for k in range(n_pos):
            for yaw in conf["db_headings"]:
                db.append(_Shot(st.index, Camera(0.0, k * sp, float(conf["db_camera_height"]), float(yaw),
                                                 0.0, 0.0, float(conf["db_hfov"])), "day", "db", len(db),
                                quality=int(conf["db_jpeg_quality"])))
    rng = np.random.default_rng([seed, 3])
    lengths = np.array([s.length for s in streets])
    for q in range(int(conf["n_queries"])):
        st = streets[int(rng.choice(len(streets), p=lengths / lengths.sum()))]
        n_gaps = int(round(st.length / sp))
        y = int(rng.integers(n_gaps)) * sp + rng.uniform(0.15, 0.85) * sp  # never on the grid
        cam = Camera(
            float(rng.uniform(-1, 1) * conf["query_lateral"]), float(y),
            float(rng.uniform(*conf["query_camera_height"])),
            float(conf["db_headings"][int(rng.integers(len(conf["db_headings"])))]
                  + rng.uniform(-1, 1) * conf["query_yaw_jitter"]),
            float(rng.uniform(-1, 1) * conf["query_pitch_jitter"] + 1.0),
            float(rng.uniform(-1, 1) * conf["query_roll_jitter"]),
            float(rng.uniform(*conf["query_hfov"])),
        )
        queries.append(_Shot(st.index, cam, f"night{int(rng.integers(_NIGHT_VARIANTS))}", "query", q,
                             occluders=bool(rng.random() < conf["occluder_prob"]),
                             quality=int(rng.integers(conf["query_jpeg_quality"][0],
                                                      conf["query_jpeg_quality"][1] + 1))))
    return db, queries


def _shot_name(shot: _Shot, st: Street, conf: dict) -> tuple[str, float, float]:
    east, north = st.to_utm(shot.cam.x, shot.cam.y)
    east, north = round(east, 2), round(north, 2)
    zone, letter = int(conf["utm_zone"]), str(conf["utm_letter"]).upper()
    lat, lon = utm.to_latlon(east, north, zone, letter)
    heading = round((st.bearing + shot.cam.yaw) % 360.0, 2)
    if shot.kind == "db":
        pano = f"s{st.index}p{int(round(shot.cam.y / conf['db_spacing'])):03d}"
        name = format_name(east, north, zone, letter, lat, lon, pano_id=pano, heading=heading,
                           pitch=0.0, timestamp="20230614T1030", note="day")
    else:
        name = format_name(east, north, zone, letter, lat, lon, pano_id=f"q{shot.index:04d}",
                           heading=heading, pitch=round(shot.cam.pitch, 2),
                           roll=f"{shot.cam.roll:.2f}", timestamp="20231121T2215", note="night")
    return name, east, north


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", leave=False,
                    disable=not logger.isEnabledFor(logging.INFO) or None)
    except Exception:  # pragma: no cover - tqdm missing
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()


def _stored_summary(root: str) -> dict | None:
    try:
        with open(os.path.join(root, "synthetic.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _readme(conf, summary) -> str:
    return (
        "Synthetic visual geo-localization dataset (pipeline.datasets.synthetic)\n"
        "=======================================================================\n\n"
        f"seed: {conf['seed']}\n"
        f"database images: {summary['counts']['database']} (day, {len(conf['db_headings'])} headings "
        f"every {conf['db_spacing']} m)\n"
        f"queries: {summary['counts']['queries']} (night, random positions)\n"
        f"streets: {summary['counts']['streets']}\n\n"
        "Layout: database/*.jpg and queries/*.jpg, named in the VG benchmark format\n"
        "@UTM_east@UTM_north@zone@letter@lat@lon@pano_id@@heading@pitch@roll@@timestamp@note@.jpg\n"
        f"Every query has a database image within {conf['positive_radius']} m.\n\n"
        "Regenerate with:\n"
        "  python3 -c 'import json,sys; from pipeline.datasets.synthetic import generate; "
        "generate(sys.argv[1], json.load(open(sys.argv[2]))[\"conf\"])' NEW_ROOT synthetic.json\n\n"
        "Generation conf:\n" + json.dumps(conf, indent=2, sort_keys=True) + "\n"
    )


def _remove_stale_partials(root: str) -> None:
    """Remove ``<root>.partial-<pid>`` folders left by generator processes that died."""
    parent, base = os.path.split(root)
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(base + ".partial-"):
            continue
        pid = entry[len(base) + len(".partial-"):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("removing stale partial output %s", entry)
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except OSError:
            pass  # exists but not ours to signal: leave it


def generate(root: str | os.PathLike, conf: dict | None = None) -> dict:
    """Generate the dataset under ``root`` (atomically); return a summary dict.

    A complete ``root`` made with the same conf is left as it is (its summary is
    returned with ``"created": False``); an existing ``root`` with another conf, or
    an incomplete one, is an error.
    """
    conf = _merge_conf(conf)
    root = os.path.abspath(os.fspath(root))
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)  # an empty folder (e.g. made by Snakemake for the output) is no dataset yet
    if os.path.exists(root):
        stored = _stored_summary(root)
        if stored is not None and stored.get("conf") == conf:
            logger.info("synthetic dataset already complete at %s", root)
            return dict(stored, root=root, created=False)
        why = "was made with a different conf" if stored is not None else "is not a complete synthetic dataset"
        raise FileExistsError(
            f"{root} already exists and {why}; remove it (rm -r {root}) or choose another --root"
        )
    t0 = time.perf_counter()
    seed = int(conf["seed"])
    streets = _make_streets(conf, np.random.default_rng([seed, 0]))
    styles = _window_styles(np.random.default_rng([seed, 4]), 6)
    db, queries = _plan(conf, streets, seed)
    size = (int(conf["image_size"][0]), int(conf["image_size"][1]))
    ss = int(conf["supersample"])

    _remove_stale_partials(root)
    tmp = f"{root}.partial-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "database"))
    os.makedirs(os.path.join(tmp, "queries"))
    db_pos, q_pos = [], []
    try:
        bar = _progress(len(db) + len(queries), "synthetic")
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:  # numpy and cv2 release the GIL
            for st in streets:
                scene = _build_scene(st, conf, styles, seed)
                shots = [s for s in db + queries if s.street == st.index]

                def work(shot, scene=scene):
                    rng = np.random.default_rng([seed, 5 if shot.kind == "db" else 6, shot.index])
                    img = _render(scene, shot.cam, shot.variant, size, ss, rng, shot.occluders)
                    img = _post_day(img, rng) if shot.kind == "db" else _post_night(img, rng)
                    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, shot.quality])
                    if not ok:
                        raise RuntimeError("JPEG encoding failed")
                    return buf

                for shot, buf in zip(shots, pool.map(work, shots)):
                    name, east, north = _shot_name(shot, st, conf)
                    path = os.path.join(tmp, "database" if shot.kind == "db" else "queries", name)
                    if os.path.exists(path):
                        raise RuntimeError(f"duplicate image name {name}")
                    with open(path, "wb") as fh:
                        fh.write(buf.tobytes())
                    (db_pos if shot.kind == "db" else q_pos).append((east, north))
                    bar.update(1)
                del scene
        bar.close()
        # every query has a database image within the positive radius
        if q_pos:
            d = np.linalg.norm(np.asarray(q_pos)[:, None, :] - np.asarray(db_pos)[None, :, :], axis=2).min(1)
            if not (d <= conf["positive_radius"]).all():
                raise AssertionError(f"a query is {d.max():.1f} m from the database (> positive_radius)")
        else:
            d = np.zeros(0)
        summary = {
            "generator": "pipeline.datasets.synthetic",
            "format_version": FORMAT_VERSION,
            "conf": conf,
            "counts": {"database": len(db), "queries": len(queries), "streets": len(streets)},
            "max_query_to_db_m": round(float(d.max()), 3) if len(d) else None,
            "streets": [{"index": s.index, "origin_utm": [round(s.origin[0], 2), round(s.origin[1], 2)],
                         "bearing_deg": round(s.bearing, 3), "length_m": s.length,
                         "width_m": round(s.width, 3)} for s in streets],
        }
        with open(os.path.join(tmp, "README.txt"), "w") as fh:
            fh.write(_readme(conf, summary))
        # synthetic.json last: its presence marks a complete dataset
        with open(os.path.join(tmp, "synthetic.json"), "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
        try:
            os.rename(tmp, root)
        except OSError:
            stored = _stored_summary(root)
            if stored is not None and stored.get("conf") == conf:  # a concurrent run won
                shutil.rmtree(tmp, ignore_errors=True)
                return dict(stored, root=root, created=False)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    logger.info("wrote %d database images and %d queries to %s in %.1f s",
                len(db), len(queries), root, secs)
    return dict(summary, root=root, created=True, seconds=round(secs, 2))


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m pipeline.datasets.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="output folder (created atomically)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-queries", type=int)
    p.add_argument("--n-streets", type=int)
    p.add_argument("--street-length", type=float, help="metres")
    p.add_argument("--db-spacing", type=float, help="metres between database positions")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"))
    p.add_argument("--conf", help="JSON object with further conf keys (see DEFAULT_CONF)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conf = json.loads(args.conf) if args.conf else {}
    for key in ("seed", "n_queries", "n_streets", "street_length", "db_spacing", "image_size"):
        val = getattr(args, key)
        if val is not None:
            conf[key] = list(val) if isinstance(val, (list, tuple)) else val
    try:
        summary = generate(args.root, conf)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {k: summary[k] for k in ("root", "created", "counts", "max_query_to_db_m", "seconds") if k in summary}
    out["conf"] = summary["conf"]
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _synthetic_arguments(p):
    p.add_argument("--root", required=True)
    p.add_argument("--conf", type=json_arg, default={})


def _synthetic(a):
    print(json.dumps(generate(a.root, a.conf), indent=2, default=str))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"synthetic": (_synthetic_arguments, _synthetic)}


if __name__ == "__main__":
    sys.exit(main())
