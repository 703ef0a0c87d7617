"""Camera and renderer of the synthetic street views.

Views are rendered by ray casting every pixel against the walls and the ground
(vectorised numpy) and sampling the scene's atlas with ``cv2.remap`` (mip levels
blended by level of detail), with distance haze, street lamps (poles; glows at
night) and, for some queries, parked cars or pedestrians in front; then a day or
night post-processing (gain/gamma/noise; tint, blur, noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .facades import _VIVID, _col
from .scene import _GROUND_PPM, _MIP_LEVELS, _SKY_ROWS, StreetScene
from .world import _HMAX, _LAMP_HEIGHT, _SIDEWALK


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
