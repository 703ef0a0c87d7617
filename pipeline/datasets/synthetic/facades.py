"""Procedural facade textures of the synthetic streets, by day and by night.

A facade is a texture atlas of a row of buildings with their own colours, materials,
window grids, doors, shop fronts, signs with random text, graffiti, pipes, murals.
Window styles are shared between buildings and streets (perceptual aliasing) while
signs, murals and shop fronts make places distinctive. The night appearance is
rendered from the *same* layout: dark walls, lamp light, some windows, shops and
signs lit (their glass/sign labels are kept with the atlas).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .world import _HMAX, Street

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
