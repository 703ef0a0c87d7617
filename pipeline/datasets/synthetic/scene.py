"""One street ready to render: its facades, ground and sky in a mip-mapped texture atlas.

:func:`_build_scene` makes the two facades and the lamps of a street, the ground
textures (asphalt, sidewalks, markings; night: pools of lamp light) and a sky strip,
and stacks them into one atlas per appearance (day and ``_NIGHT_VARIANTS`` night
variants), so that a view needs one ``cv2.remap`` per mip level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .facades import _make_facade, _night_facade, _smooth_noise
from .world import _HMAX, _SIDEWALK, Street, _lamp_positions

_NIGHT_VARIANTS = 2  # lit-window patterns per street (queries pick one)
_GROUND_PPM = 10
_PAD = 8  # rows between the blocks of the atlas
_SKY_ROWS = 64
_MIP_LEVELS = 3


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
