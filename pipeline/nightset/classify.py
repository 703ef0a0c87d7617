"""Filter stage of the night query set: outdoor/indoor and day/night classifiers.

The stage reads the collected photos (``<build>/collected/photos.csv``), runs an
*outdoor* model and a *night* model on every image and writes
``<build>/filtered.csv`` with one row per photo::

    photo_id, file, outdoor_prob, is_outdoor, night_prob, is_night, keep,
    outdoor_model, night_model, reason

``file`` is copied from photos.csv (relative to ``<build>/collected/``), ``keep`` is
``is_outdoor & is_night``, ``reason`` is empty for classified photos and says why
otherwise (``unreadable: ...``: such photos get ``keep = False``; they are
reported, never fatal).

Models are chosen by name plus a conf dict (like :mod:`pipeline.registry`):

``daynight_stats``
    A transparent baseline for day vs night: a logistic model over a handful of
    image statistics (:data:`DAYNIGHT_FEATURES`), with documented default
    coefficients and :func:`fit_stats` to fit them on labelled images.
``outdoor_stats``
    The same for outdoor vs indoor (:data:`OUTDOOR_FEATURES`). It is weak: it knows
    sky, texture and line statistics, not semantics. It separates synthetic rooms
    from synthetic streets; on real photos (bars, concerts, stations, tunnels,
    close-ups at night) expect many mistakes, so prefer ``mobilenet`` trained on a
    few hundred labelled photos of the area.
``mobilenet``
    A small CNN (torchvision ``mobilenet_v2(weights=None)``, 2-class head) trained
    by :func:`train` on a CSV of labelled images; it loads only the checkpoint
    file named in its conf (nothing is downloaded).

All models return the probability of the *positive* class: ``night`` for the
night model, ``outdoor`` for the outdoor model.

CLI (the lead wires these into ``python -m pipeline``)::

    python -m pipeline.nightset.classify filter --src BUILD/collected --out BUILD/filtered.csv
    python -m pipeline.nightset.classify train --csv labels.csv --out night.pt --epochs 10
    python -m pipeline.nightset.classify fit --model daynight_stats --csv labels.csv --out night.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..images import ImageReadError
from ..io import atomic_path, write_json
from ..registry import Registry

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pipeline.nightset.mobilenet"
CHECKPOINT_VERSION = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# --------------------------------------------------------------------------- images


@dataclass
class Photo:
    """A decoded photo for the classifiers.

    ``image``: RGB ``uint8 [H, W, 3]`` (at most ``max_side`` pixels on its longer side);
    ``exif_hour``: the hour of day (0-24, fractional) of EXIF ``DateTimeOriginal``
    (or ``DateTimeDigitized``) if the file has one; ``table_hour``: the hour of the
    ``datetaken`` column of photos.csv, if any (Flickr falls back to the upload time
    when a photo has no EXIF date, so it is not used unless a conf asks for it).
    """

    image: np.ndarray
    exif_hour: float | None = None
    table_hour: float | None = None
    width: int = 0  # of the original file
    height: int = 0


def parse_hour(value) -> float | None:
    """Hour of day (fractional) of an EXIF (``2023:11:21 22:15:03``) or ISO date-time string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip().rstrip("\x00").strip()
    if not s:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M",
                "%Y-%m-%dT%H:%M"):
        try:
            t = dt.datetime.strptime(s[:19] if "S" in fmt else s[:16], fmt)
            return t.hour + t.minute / 60 + t.second / 3600
        except ValueError:
            continue
    return None


_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x8769, 0x9003, 0x9004


def exif_hour(im: Image.Image) -> float | None:
    """The hour of EXIF DateTimeOriginal (else DateTimeDigitized) of an opened image, or None."""
    try:
        ifd = im.getexif().get_ifd(_EXIF_IFD)
    except Exception:  # broken EXIF blocks are common; the date is optional
        return None
    for tag in (_DATETIME_ORIGINAL, _DATETIME_DIGITIZED):
        hour = parse_hour(ifd.get(tag))
        if hour is not None:
            return hour
    return None


def read_photo(path: str | os.PathLike, max_side: int = 512, table_hour: float | None = None) -> Photo:
    """Decode ``path`` (downscaled to ``max_side``) with its EXIF hour; ImageReadError names the file."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            hour = exif_hour(im)
            if im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # DCT-domain downscaling: fast
            im.load()
            rgb = im.convert("RGB")
            if max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.BILINEAR)
            arr = np.array(rgb)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from None
    if arr.ndim != 3 or min(arr.shape[:2]) < 8:
        raise ImageReadError(f"{path}: image too small ({width}x{height})")
    return Photo(arr, hour, table_hour, width, height)


def _small(img: np.ndarray, side: int) -> np.ndarray:
    """Float RGB in [0, 1], longer side ``side`` (area interpolation)."""
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    return img.astype(np.float32) / 255.0


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


# --------------------------------------------------------------------------- statistics baselines

STATS_SIDE = 256  # statistics are computed on the image downscaled to this longer side
DARK_LEVEL = 0.20  # luma below this is "dark"
LIGHT_LEVEL = 0.85  # luma above this is "saturated bright"
LIGHT_SURROUND = 0.45  # ... and a light source when its 15x15 surround is darker than this

DAYNIGHT_FEATURES = {
    "luma_mean": "mean luma (BT.601 Y, 0-1) of the image",
    "sky_luma": "mean luma of the top third (sky at day; dark sky at night)",
    "dark_frac": f"fraction of pixels with luma < {DARK_LEVEL}",
    "light_frac": f"fraction of pixels brighter than {LIGHT_LEVEL} whose 15x15 surround is darker than "
                  f"{LIGHT_SURROUND} (street lights, lit windows: bright spots in the dark)",
    "log_rb": "log(mean R / mean B): colour temperature proxy (sodium light > 0, daylight sky < 0)",
    "hour_night": "cos(2 pi hour / 24) of the capture hour (+1 midnight, -1 noon), 0 when unknown. "
                  "Optional: from EXIF DateTimeOriginal (conf hour_sources); sunset depends on season "
                  "and latitude, so its weight is modest",
}

OUTDOOR_FEATURES = {
    "edge_density": "fraction of pixels with gradient magnitude > 0.08 (facades, signs, foliage are "
                    "busy; painted walls are not)",
    "top_smooth": "fraction of the top third with gradient magnitude < 0.02 (open sky is smooth)",
    "top_blue": "mean (B - R) of the top third (blue sky)",
    "sky_frac": "fraction of the top third that is smooth and either bright and bluish (luma > 0.45, "
                "B - R > 0.04: day sky) or very dark (luma < 0.08: night sky)",
    "vertical_frac": "fraction of the edge pixels whose edge is near-vertical (|gx| > 2|gy|)",
    "colourfulness": "Hasler-Suesstrunk colourfulness / 100 (signs, cars, vegetation)",
    "top_minus_bottom": "mean luma of the top third minus the bottom third",
}


def daynight_features(photo: Photo, hour_sources=("exif",)) -> np.ndarray:
    """The :data:`DAYNIGHT_FEATURES` of a photo (in that order)."""
    rgb = _small(photo.image, STATS_SIDE)
    y = _luma(rgb)
    h = y.shape[0]
    surround = cv2.blur(y, (15, 15))
    lights = (y > LIGHT_LEVEL) & (surround < LIGHT_SURROUND)
    mean = rgb.reshape(-1, 3).mean(0)
    hour = None
    for src in hour_sources:
        hour = photo.exif_hour if src == "exif" else photo.table_hour if src == "datetaken" else None
        if hour is not None:
            break
    return np.array([
        y.mean(),
        y[: max(1, h // 3)].mean(),
        (y < DARK_LEVEL).mean(),
        lights.mean(),
        math.log((mean[0] + 1e-3) / (mean[2] + 1e-3)),
        math.cos(2 * math.pi * hour / 24) if hour is not None else 0.0,
    ], np.float64)


def outdoor_features(photo: Photo, hour_sources=()) -> np.ndarray:
    """The :data:`OUTDOOR_FEATURES` of a photo (in that order)."""
    rgb = _small(photo.image, STATS_SIDE)
    y = _luma(rgb)
    h = y.shape[0]
    gx = cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3) / 4
    gy = cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3) / 4
    mag = np.hypot(gx, gy)
    edges = mag > 0.08
    t = slice(0, max(1, h // 3))
    top = rgb[t]
    smooth_top = mag[t] < 0.02
    blue = top[..., 2] - top[..., 0]
    ytop = y[t]
    sky = smooth_top & (((ytop > 0.45) & (blue > 0.04)) | (ytop < 0.08))
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourful = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    n_edges = max(1, int(edges.sum()))
    return np.array([
        edges.mean(),
        smooth_top.mean(),
        blue.mean(),
        sky.mean(),
        float((edges & (np.abs(gx) > 2 * np.abs(gy))).sum()) / n_edges,
        colourful * 255 / 100,
        ytop.mean() - y[h - max(1, h // 3):].mean(),
    ], np.float64)


class StatsModel:
    """A logistic model ``p = sigmoid(bias + sum_f coef[f] * feature_f)`` over image statistics.

    conf: ``coef`` (dict feature -> weight; missing features weigh 0), ``bias``,
    ``threshold`` (the stage's decision threshold), ``hour_sources`` (day/night only).
    The coefficients act on the raw features (units of :data:`FEATURES`), so a
    conf reads directly: e.g. ``luma_mean: -14`` means each +0.1 of mean luma
    divides the night odds by e^1.4 = 4.
    """

    FEATURES: dict = {}
    positive = ""
    default_conf: dict = {}

    def __init__(self, conf: dict | None = None):
        conf = dict(conf or {})
        unknown = sorted(set(conf) - set(self.default_conf) - {"name"})
        if unknown:
            raise ValueError(f"{self.default_conf['name']}: unknown conf key(s) {unknown}; "
                             f"valid: {sorted(self.default_conf)}")
        self.conf = {**copy.deepcopy(self.default_conf), **conf}
        coef = self.conf["coef"]
        bad = sorted(set(coef) - set(self.FEATURES))
        if bad:
            raise ValueError(f"{self.conf['name']}: unknown feature(s) {bad} in coef; "
                             f"features: {list(self.FEATURES)}")
        self.w = np.array([float(coef.get(f, 0.0)) for f in self.FEATURES])
        self.b = float(self.conf["bias"])

    @property
    def label(self) -> str:
        fitted = self.conf["coef"] != self.default_conf["coef"] or self.conf["bias"] != self.default_conf["bias"]
        return self.conf["name"] + ("(fitted)" if fitted else "")

    def features(self, photo: Photo) -> np.ndarray:
        raise NotImplementedError

    def feature_matrix(self, photos: list[Photo]) -> np.ndarray:
        return np.stack([self.features(p) for p in photos]) if photos else np.zeros((0, len(self.FEATURES)))

    def predict(self, photos: list[Photo]) -> np.ndarray:
        return self.predict_features(self.feature_matrix(photos))

    def predict_features(self, X: np.ndarray) -> np.ndarray:
        return _sigmoid(X @ self.w + self.b)


class DayNightStats(StatsModel):
    FEATURES = DAYNIGHT_FEATURES
    positive = "night"
    # Default coefficients: rounded, hand-set priors, not a fit. Darkness carries the
    # decision (typical day photo: luma ~0.5, dark_frac < 0.05 -> logit about -4;
    # typical night photo: luma < 0.3, dark_frac > 0.4 -> logit > 0); light sources
    # and the EXIF hour add to it; the colour tint gets no weight (night light may be
    # orange or blue-white). They were checked, not tuned, against the per-feature
    # statistics of the synthetic streets (benchmarks/daynight_baseline.py prints
    # them). Known failure: under-exposed day photos with deep shadows. fit_stats
    # fits all of them on labelled photos of the area.
    default_conf = {
        "name": "daynight_stats",
        "coef": {"luma_mean": -10.0, "sky_luma": -3.0, "dark_frac": 10.0, "light_frac": 40.0,
                 "log_rb": 0.0, "hour_night": 1.5},
        "bias": 3.0,
        "threshold": 0.5,
        "hour_sources": ["exif"],
    }

    def features(self, photo: Photo) -> np.ndarray:
        return daynight_features(photo, self.conf["hour_sources"])


class OutdoorStats(StatsModel):
    FEATURES = OUTDOOR_FEATURES
    positive = "outdoor"
    # Default coefficients: rounded, hand-set priors for *night* photos (the stage keeps
    # outdoor & night, so the outdoor decision only matters on night photos): busy
    # texture, colourful signs and visible sky mean outdoor; a top brighter than the
    # bottom (a lit ceiling; outdoors at night the dark sky is above a lit street)
    # means indoor. top_smooth, top_blue and vertical_frac get no weight: their
    # meaning flips between day and night or between scenes. Checked, not tuned,
    # against synthetic rooms and streets (benchmarks/daynight_baseline.py).
    default_conf = {
        "name": "outdoor_stats",
        "coef": {"edge_density": 12.0, "top_smooth": 0.0, "top_blue": 0.0, "sky_frac": 3.0,
                 "vertical_frac": 0.0, "colourfulness": 2.0, "top_minus_bottom": -4.0},
        "bias": -0.5,
        "threshold": 0.5,
    }

    def features(self, photo: Photo) -> np.ndarray:
        return outdoor_features(photo)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (numpy only).

    Features are standardised for the fit (the penalty acts on standardised
    weights, not on the bias) and the result is returned on the raw features:
    ``(coef [d], bias)``. Constant features get weight 0.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    n, d = X.shape
    if n == 0 or len(np.unique(y)) < 2:
        raise ValueError("fit_logistic: needs labelled examples of both classes")
    mu, sd = X.mean(0), X.std(0)
    active = sd > 1e-12
    Z = np.zeros_like(X)
    Z[:, active] = (X[:, active] - mu[active]) / sd[active]
    A = np.hstack([np.ones((n, 1)), Z])
    reg = np.r_[0.0, np.full(d, float(l2))]
    reg[1:][~active] = 1e6  # pins constant features at 0
    w = np.zeros(d + 1)

    def loss(w):
        z = A @ w
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(reg * w * w))

    cur = loss(w)
    for _ in range(max_iter):
        p = _sigmoid(A @ w)
        g = A.T @ (p - y) + reg * w
        H = (A * (p * (1 - p))[:, None]).T @ A + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(H, g)
        t = 1.0
        while t > 1e-4:  # backtracking: Newton may overshoot on nearly separable data
            new = loss(w - t * step)
            if new <= cur:
                break
            t *= 0.5
        w = w - t * step
        done = abs(cur - new) < 1e-10 * max(1.0, abs(cur))
        cur = new
        if done:
            break
    coef = np.zeros(d)
    coef[active] = w[1:][active] / sd[active]
    bias = float(w[0] - np.sum(coef * mu))
    return coef, bias


# --------------------------------------------------------------------------- labels

_KNOWN_POSITIVE = {frozenset({"0", "1"}): "1", frozenset({"false", "true"}): "true",
                   frozenset({"day", "night"}): "night", frozenset({"indoor", "outdoor"}): "outdoor"}
_ROLE_POSITIVE = {"night": {"night", "1", "true"}, "outdoor": {"outdoor", "1", "true"}}


def _label_str(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip().lower()


def read_labels(csv: str | os.PathLike, positive: str | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Read a labelled-images CSV (columns ``file``, ``label``).

    ``file`` is absolute or relative to the CSV's folder. Labels are any two values;
    the positive one is ``positive`` or, for the pairs 0/1, false/true, day/night,
    indoor/outdoor, the second of the pair. Returns (paths, y in {0, 1}, [negative, positive]).
    """
    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(f"labelled images CSV not found: {csv}")
    df = pd.read_csv(csv, dtype={"file": str}, keep_default_na=False)
    missing = {"file", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)}; expected file,label")
    labels = [_label_str(v) for v in df["label"]]
    bad = [i for i, lab in enumerate(labels) if not lab or not df["file"].iloc[i]]
    if bad:
        raise ValueError(f"{csv}: empty file or label on data row(s) {[i + 1 for i in bad[:10]]}")
    classes = sorted(set(labels))
    if len(classes) != 2:
        raise ValueError(f"{csv}: needs exactly two label values, found {classes[:10]}")
    if positive is None:
        positive = _KNOWN_POSITIVE.get(frozenset(classes))
        if positive is None:
            raise ValueError(f"{csv}: labels {classes}: say which one is positive (positive=...)")
    positive = _label_str(positive)
    if positive not in classes:
        raise ValueError(f"{csv}: positive label {positive!r} is not one of {classes}")
    negative = classes[0] if classes[1] == positive else classes[1]
    paths = [Path(f) if os.path.isabs(f) else csv.parent / f for f in df["file"]]
    y = np.array([lab == positive for lab in labels], np.int64)
    return paths, y, [negative, positive]


def _read_many(paths, max_side, desc, workers=2) -> tuple[list[Photo | None], list[str]]:
    """Read photos in threads; unreadable ones give None and an error message."""
    def one(p):
        try:
            return read_photo(p, max_side), ""
        except ImageReadError as e:
            return None, str(e)

    photos, errors = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for ph, err in tqdm(pool.map(one, paths), total=len(paths), desc=desc, unit="img", leave=False):
            photos.append(ph)
            errors.append(err)
    return photos, errors


def fit_stats(model: str, photos: list[Photo], y, l2: float = 1.0, base_conf: dict | None = None,
              features: list[str] | None = None) -> dict:
    """Fit the coefficients of a statistics model (``daynight_stats``/``outdoor_stats``).

    ``y``: 1 = the model's positive class (night / outdoor). ``features``: fit only
    these (the others get weight 0), e.g. to leave out a statistic that the
    labelled set cannot exercise (no street lights in it) and that would otherwise
    get an arbitrary weight. Returns a conf to pass to :func:`build_classifier`,
    with ``fit`` info (n, training accuracy).
    """
    m = build_classifier({**(base_conf or {}), "name": model})
    if not isinstance(m, StatsModel):
        raise ValueError(f"fit_stats: {model!r} is not a statistics model")
    names = list(m.FEATURES)
    use = names if features is None else list(features)
    bad = sorted(set(use) - set(names))
    if bad or not use:
        raise ValueError(f"fit_stats: unknown or no features {bad or use}; {model} has {names}")
    X = m.feature_matrix(photos)
    y = np.asarray(y, np.int64)
    cols = [names.index(f) for f in use]
    coef = np.zeros(len(names))
    coef[cols], bias = fit_logistic(X[:, cols], y, l2)
    conf = dict(m.conf)
    conf["coef"] = {f: round(float(c), 6) for f, c in zip(m.FEATURES, coef)}
    conf["bias"] = round(bias, 6)
    fitted = build_classifier(conf)
    acc = float(((fitted.predict_features(X) >= 0.5) == (y == 1)).mean())
    conf["fit"] = {"n": int(len(y)), "n_positive": int(y.sum()), "l2": l2, "features": use,
                   "train_accuracy": round(acc, 4)}
    return conf


def fit_stats_csv(model: str, csv, out_json, positive: str | None = None, l2: float = 1.0,
                  max_side: int = 512, workers: int = 2, features: list[str] | None = None) -> dict:
    """:func:`fit_stats` on a labelled CSV (file,label); writes the fitted conf as JSON."""
    paths, y, classes = read_labels(csv, positive)
    photos, errors = _read_many(paths, max_side, f"fit {model}", workers)
    ok = [i for i, ph in enumerate(photos) if ph is not None]
    for e in (e for e in errors if e):
        logger.warning("skipped: %s", e)
    conf = fit_stats(model, [photos[i] for i in ok], y[ok], l2, features=features)
    conf["fit"].update({"csv": str(csv), "classes": classes, "skipped": len(paths) - len(ok)})
    write_json(out_json, conf)
    logger.info("%s: fitted on %d images, training accuracy %.3f -> %s", model, len(ok),
                conf["fit"]["train_accuracy"], out_json)
    return conf


# --------------------------------------------------------------------------- mobilenet


def pick_device(device: str = "auto"):
    from ..extract_global import pick_device as pick

    return pick(str(device))


def build_mobilenet(width_mult: float = 1.0, num_classes: int = 2):
    """torchvision ``mobilenet_v2`` with random weights (never downloads) and a 2-class head."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)


def _to_batch(images: list[np.ndarray], size: int):
    """uint8 RGB arrays -> normalised float tensor [n, 3, size, size] (squashed to a square)."""
    import torch

    arr = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_checkpoint(path: str | os.PathLike):
    """Load a checkpoint written by :func:`train`: returns (model in eval mode, its conf).

    Refuses, naming the file, anything else: a missing file, a file that is not a
    torch checkpoint, a plain state dict or another program's checkpoint, another
    format version, or weights that do not fit the stored architecture.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mobilenet checkpoint not found: {path} (train one with the "
                                f"nightset train command; nothing is downloaded)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"mobilenet checkpoint {path}: cannot be read as a torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"mobilenet checkpoint {path}: not a {CHECKPOINT_FORMAT} checkpoint written by "
                         f"pipeline.nightset.classify.train (found {keys})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"mobilenet checkpoint {path}: format version {ckpt.get('version')!r}, "
                         f"this code reads version {CHECKPOINT_VERSION}")
    conf = ckpt.get("conf") or {}
    if conf.get("arch") != "mobilenet_v2" or len(conf.get("classes", [])) != 2:
        raise ValueError(f"mobilenet checkpoint {path}: unexpected conf {conf!r}")
    model = build_mobilenet(float(conf.get("width_mult", 1.0)), 2)
    state = ckpt.get("state_dict")
    own = model.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"mobilenet checkpoint {path}: has no state_dict")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"mobilenet checkpoint {path}: weights do not fit mobilenet_v2(width_mult="
                         f"{conf.get('width_mult', 1.0)}): missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, mis-shaped {sorted(shapes)[:3]}")
    model.load_state_dict(state)
    model.eval()
    return model, conf


class MobileNetClassifier:
    """A trained ``mobilenet`` checkpoint as a classifier.

    conf: ``checkpoint`` (path, required), ``device`` (``auto``), ``batch_size``,
    ``threshold``, ``positive`` (the label the checkpoint must call positive; the
    stage sets it from the role: ``night`` or ``outdoor``, also accepting ``1``/``true``).
    """

    default_conf = {"name": "mobilenet", "checkpoint": None, "device": "auto", "batch_size": 32,
                    "threshold": 0.5, "positive": None}

    def __init__(self, conf: dict):
        unknown = sorted(set(conf) - set(self.default_conf))
        if unknown:
            raise ValueError(f"mobilenet: unknown conf key(s) {unknown}; valid: {sorted(self.default_conf)}")
        self.conf = {**self.default_conf, **conf}
        if not self.conf["checkpoint"]:
            raise ValueError("mobilenet: conf needs 'checkpoint' (a file written by the train command)")
        self.model, self.ckpt_conf = load_checkpoint(self.conf["checkpoint"])
        pos = self.ckpt_conf["classes"][1]
        want = self.conf["positive"]
        allowed = _ROLE_POSITIVE.get(want, {want}) if want else None
        if allowed is not None and pos not in allowed:
            raise ValueError(f"mobilenet checkpoint {self.conf['checkpoint']}: its positive class is {pos!r} "
                             f"(classes {self.ckpt_conf['classes']}), but this classifier needs "
                             f"{sorted(allowed)} - wrong checkpoint for this role?")
        self.device = pick_device(self.conf["device"])
        self.model.to(self.device)
        self.positive = pos

    @property
    def label(self) -> str:
        return f"mobilenet:{Path(self.conf['checkpoint']).name}"

    def predict(self, photos: list[Photo]) -> np.ndarray:
        import torch

        out = []
        size = int(self.ckpt_conf["image_size"])
        bs = int(self.conf["batch_size"])
        with torch.inference_mode():
            for i in range(0, len(photos), bs):
                x = _to_batch([p.image for p in photos[i:i + bs]], size).to(self.device)
                out.append(torch.softmax(self.model(x).float(), 1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _split(y: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val split of indices (at least one of each class in val when possible)."""
    tr, va = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(val_fraction * len(idx)))
        if val_fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return np.array(sorted(tr), np.int64), np.array(sorted(va), np.int64)


def train(images_csv, out_checkpoint, epochs: int = 10, lr: float = 1e-3, batch_size: int = 32,
          device: str = "auto", seed: int = 0, image_size: int = 224, val_fraction: float = 0.2,
          positive: str | None = None, width_mult: float = 1.0, weight_decay: float = 1e-4,
          workers: int = 2) -> dict:
    """Train ``mobilenet_v2`` (random init) on labelled images; save the best-validation checkpoint.

    ``images_csv``: columns ``file`` (absolute or relative to the CSV) and ``label``
    (two values; see :func:`read_labels`). The images are decoded once, squashed to
    ``image_size`` squares (plus 12% for random crops) and kept in memory
    (about 200 KB per image at 224). Stratified train/val split by ``seed``;
    augmentation: horizontal flips and random crops only (no colour jitter: colour
    and brightness are the signal). AdamW, cross-entropy. The checkpoint (written
    atomically) holds the weights, the conf (arch, width, image size, classes) and
    the history; after each epoch the BatchNorm statistics are recomputed over the
    training images (exact averages for the current weights), and the epoch with the
    lowest validation loss (or the last epoch without validation) is kept. Returns the summary (history, best epoch).
    """
    import torch
    from torch.nn import functional as F

    t0 = time.perf_counter()
    paths, y, classes = read_labels(images_csv, positive)
    big = int(round(image_size * 1.12))
    photos, errors = _read_many(paths, max(big * 2, 256), "train: decode", workers)
    ok = [i for i, ph in enumerate(photos) if ph is not None]
    for e in (e for e in errors if e):
        logger.warning("skipped: %s", e)
    if len(set(y[ok].tolist())) < 2:
        raise ValueError(f"{images_csv}: need readable images of both classes {classes}")
    cache = np.stack([cv2.resize(photos[i].image, (big, big), interpolation=cv2.INTER_AREA) for i in ok])
    del photos
    y = y[ok]
    rng = np.random.default_rng(seed)
    tr, va = _split(y, val_fraction, rng)
    torch.manual_seed(seed)
    dev = pick_device(device)
    model = build_mobilenet(width_mult).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    off = (big - image_size) // 2

    def batch(idx, augment):
        x = torch.from_numpy(cache[idx]).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
        if augment:
            crops = []
            for k in range(len(idx)):
                oy, ox = (int(v) for v in rng.integers(0, big - image_size + 1, 2))
                c = x[k:k + 1, :, oy:oy + image_size, ox:ox + image_size]
                crops.append(c.flip(3) if rng.random() < 0.5 else c)
            x = torch.cat(crops)
        else:
            x = x[:, :, off:off + image_size, off:off + image_size]
        return (x - mean) / std, torch.from_numpy(y[idx]).to(dev)

    def recalibrate_bn(idx):
        """Exact BatchNorm statistics of the current weights over the training images.

        The running averages lag far behind the weights of a randomly initialised
        network in its first epochs (eval-mode predictions then collapse to one
        class); one forward pass with cumulative averaging fixes that.
        """
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        model.train()
        with torch.no_grad():
            for i in range(0, len(idx), batch_size):
                if len(idx[i:i + batch_size]) >= 2:
                    model(batch(idx[i:i + batch_size], False)[0])
        for m, mom in zip(bns, saved):
            m.momentum = mom

    def evaluate(idx):
        model.eval()
        loss, correct = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(idx), batch_size):
                x, t = batch(idx[i:i + batch_size], False)
                logits = model(x).float()
                loss += float(F.cross_entropy(logits, t, reduction="sum"))
                correct += int((logits.argmax(1) == t).sum())
        return loss / len(idx), correct / len(idx)

    history, best, best_state = [], None, None
    bar = tqdm(range(epochs), desc="train mobilenet", unit="epoch")
    for epoch in bar:
        model.train()
        order = rng.permutation(tr)
        tot, n = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs 2+ samples
                continue
            x, t = batch(idx, True)
            loss = F.cross_entropy(model(x).float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            n += len(idx)
        sched.step()
        recalibrate_bn(tr)
        rec = {"epoch": epoch + 1, "train_loss": round(tot / max(n, 1), 5)}
        if len(va):
            rec["val_loss"], rec["val_accuracy"] = (round(v, 5) for v in evaluate(va))
        history.append(rec)
        bar.set_postfix({k: v for k, v in rec.items() if k != "epoch"})
        logger.info("epoch %s", rec)
        key = rec.get("val_loss", -epoch)
        if best is None or key <= best:
            best = key
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_epoch = epoch + 1
    conf = {"arch": "mobilenet_v2", "width_mult": float(width_mult), "image_size": int(image_size),
            "classes": classes, "normalize": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
    summary = {
        "checkpoint": str(out_checkpoint), "classes": classes, "n_train": int(len(tr)), "n_val": int(len(va)),
        "skipped": len(paths) - len(ok), "best_epoch": best_epoch, "history": history,
        "train_conf": {"images_csv": str(images_csv), "epochs": epochs, "lr": lr, "batch_size": batch_size,
                       "seed": seed, "val_fraction": val_fraction, "weight_decay": weight_decay,
                       "device": str(dev)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "conf": conf,
            "state_dict": best_state, "history": history, "train": summary["train_conf"],
            "best_epoch": best_epoch}
    with atomic_path(out_checkpoint) as tmp:
        torch.save(ckpt, tmp)
    logger.info("wrote %s (best epoch %d of %d)", out_checkpoint, best_epoch, epochs)
    return summary


# --------------------------------------------------------------------------- registry

CLASSIFIERS = Registry("nightset classifier", {
    "daynight_stats": (__name__, "DayNightStats"),
    "outdoor_stats": (__name__, "OutdoorStats"),
    "mobilenet": (__name__, "MobileNetClassifier"),
})

# named confs (hloc style): pick by name or pass a full conf dict
confs = {
    "daynight_stats": {"name": "daynight_stats"},
    "outdoor_stats": {"name": "outdoor_stats"},
}


def resolve_conf(conf: dict | str | os.PathLike) -> dict:
    """A conf dict from a conf dict, a named conf (:data:`confs`) or a JSON file path."""
    if isinstance(conf, (str, os.PathLike)):
        name = os.fspath(conf)
        if name in confs:
            conf = confs[name]
        elif os.path.isfile(name):
            try:
                conf = json.loads(Path(name).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: classifier conf is not valid JSON ({e})") from None
        else:
            raise ValueError(f"classifier {name!r}: neither a named conf {sorted(confs)} nor a JSON file")
    if not isinstance(conf, dict):
        raise ValueError(f"classifier conf must be a JSON object, got {conf!r}")
    return {k: v for k, v in conf.items() if k != "fit"}  # fit info travels with fitted confs


def build_classifier(conf: dict | str | os.PathLike):
    """A classifier from a conf dict (``{"name": ..., ...}``), a named conf or a JSON file path."""
    return CLASSIFIERS.build(resolve_conf(conf))


# --------------------------------------------------------------------------- stage


def read_photos_table(src: str | os.PathLike) -> tuple[pd.DataFrame, Path, Path]:
    """photos.csv of ``src`` (a collected folder or the CSV itself): (table, csv path, image base folder)."""
    src = Path(src)
    csv = src / "photos.csv" if src.is_dir() else src
    if not csv.is_file():
        raise FileNotFoundError(f"photos table not found: {csv}")
    try:
        df = pd.read_csv(csv, dtype={"photo_id": str, "file": str, "owner": str, "datetaken": str},
                         keep_default_na=False, na_values={"lat": [""], "lon": [""]})
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{csv}: cannot parse CSV ({e})") from None
    missing = {"photo_id", "file"} - set(df.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)} (columns: {list(df.columns)})")
    dup = df.photo_id[df.photo_id.duplicated()].tolist()
    if dup:
        raise ValueError(f"{csv}: duplicate photo_id(s) {dup[:5]}")
    return df, csv, csv.parent


def _role_conf(conf, role):
    if conf is None:
        return None
    conf = resolve_conf(conf)
    if conf.get("name") == "mobilenet" and not conf.get("positive"):
        conf["positive"] = role
    return conf


def classify(src, out_csv, outdoor_conf="outdoor_stats", night_conf="daynight_stats",
             outdoor_threshold: float | None = None, night_threshold: float | None = None,
             batch_size: int = 64, workers: int = 2, max_side: int = 512, features: bool = False) -> dict:
    """The filter stage: classify every photo of ``src`` and write ``out_csv`` (filtered.csv).

    ``src``: ``<build>/collected`` or its photos.csv. ``outdoor_conf``/``night_conf``:
    a conf dict, a named conf (``outdoor_stats``, ``daynight_stats``), a JSON file
    (e.g. from :func:`fit_stats_csv`), or None to skip that test (every photo passes
    it; the model column says ``none``). Thresholds default to the confs'
    ``threshold`` (0.5). ``features=True`` adds the statistics models' features as
    columns ``night.<feature>``/``outdoor.<feature>`` (to audit a threshold).
    Unreadable images get ``keep = False`` and a ``reason``. Returns a summary.
    """
    t0 = time.perf_counter()
    df, csv, base = read_photos_table(src)
    models = {}
    for role, conf, thr in (("outdoor", outdoor_conf, outdoor_threshold), ("night", night_conf, night_threshold)):
        conf = _role_conf(conf, role)
        if conf is None:
            models[role] = (None, "none", 0.0)
            continue
        m = build_classifier(conf)
        models[role] = (m, m.label, float(m.conf.get("threshold", 0.5) if thr is None else thr))
    n = len(df)
    probs = {r: np.full(n, np.nan) for r in models}
    feats: dict[str, np.ndarray] = {}
    reasons = [""] * n
    hours = [parse_hour(v) for v in df["datetaken"]] if "datetaken" in df.columns else [None] * n

    def load(i):
        try:
            return read_photo(base / df["file"].iloc[i], max_side, hours[i]), ""
        except ImageReadError as e:
            return None, f"unreadable: {e}"

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=n, desc="filter", unit="img") as bar:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            loaded = list(pool.map(load, idx))
            good = [i for i, (ph, _) in zip(idx, loaded) if ph is not None]
            photos = [ph for ph, _ in loaded if ph is not None]
            for i, (_, err) in zip(idx, loaded):
                if err:
                    reasons[i] = err
                    logger.warning("%s", err)
            if photos:
                for role, (m, _, _) in models.items():
                    if m is None:
                        continue
                    if isinstance(m, StatsModel):
                        X = m.feature_matrix(photos)
                        probs[role][good] = m.predict_features(X)
                        if features:
                            for j, f in enumerate(m.FEATURES):
                                feats.setdefault(f"{role}.{f}", np.full(n, np.nan))[good] = X[:, j]
                    else:
                        probs[role][good] = m.predict(photos)
            bar.update(len(idx))
    readable = np.array([not r for r in reasons], bool)
    out = pd.DataFrame({"photo_id": df["photo_id"], "file": df["file"]})
    for role in ("outdoor", "night"):
        m, _, thr = models[role]
        p = probs[role] if m is not None else np.where(readable, 1.0, np.nan)
        out[f"{role}_prob"] = np.round(p, 4)
        out[f"is_{role}"] = readable & (np.nan_to_num(p, nan=-1.0) >= thr)
    out["keep"] = out.is_outdoor & out.is_night
    out["outdoor_model"] = models["outdoor"][1]
    out["night_model"] = models["night"][1]
    out["reason"] = reasons
    for k, v in feats.items():
        out[k] = np.round(v, 5)
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    summary = {
        "photos": n, "unreadable": int((~readable).sum()), "outdoor": int(out.is_outdoor.sum()),
        "night": int(out.is_night.sum()), "kept": int(out.keep.sum()),
        "outdoor_model": models["outdoor"][1], "night_model": models["night"][1],
        "outdoor_threshold": models["outdoor"][2], "night_threshold": models["night"][2],
        "src": str(csv), "out": str(out_csv), "seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info("filter: %s", summary)
    return summary


# --------------------------------------------------------------------------- labelled test images


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
    from ..datasets.synthetic import generate

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


# --------------------------------------------------------------------------- CLI


def _conf_arg(s: str):
    """A named conf, a JSON file, 'none', or an inline JSON object."""
    if s.lower() == "none":
        return None
    if s.lstrip().startswith("{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s[:200]}") from None
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.nightset.classify", description=__doc__.splitlines()[0])
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("filter", help="classify collected photos -> filtered.csv")
    s.add_argument("--src", required=True, help="<build>/collected (or its photos.csv)")
    s.add_argument("--out", required=True, help="<build>/filtered.csv")
    s.add_argument("--outdoor", type=_conf_arg, default="outdoor_stats",
                   help="outdoor model: a named conf, a JSON conf file, inline JSON, or none")
    s.add_argument("--night", type=_conf_arg, default="daynight_stats", help="night model (same forms)")
    s.add_argument("--outdoor-threshold", type=float)
    s.add_argument("--night-threshold", type=float)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--features", action="store_true", help="also write the statistics models' features")
    s = sub.add_parser("train", help="train a mobilenet classifier on a file,label CSV")
    s.add_argument("--csv", required=True)
    s.add_argument("--out", required=True, help="checkpoint file to write")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument("--positive", help="the positive label (default: night/outdoor/1/true)")
    s.add_argument("--width-mult", type=float, default=1.0)
    s = sub.add_parser("fit", help="fit a statistics model's coefficients on a file,label CSV")
    s.add_argument("--model", required=True, choices=["daynight_stats", "outdoor_stats"])
    s.add_argument("--csv", required=True)
    s.add_argument("--out", required=True, help="JSON conf to write")
    s.add_argument("--positive")
    s.add_argument("--l2", type=float, default=1.0)
    s.add_argument("--features", nargs="+", help="fit only these features (the others get weight 0)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if a.command == "filter":
            out = classify(a.src, a.out, a.outdoor, a.night, a.outdoor_threshold, a.night_threshold,
                           a.batch_size, a.workers, features=a.features)
        elif a.command == "train":
            out = train(a.csv, a.out, a.epochs, a.lr, a.batch_size, a.device, a.seed, a.image_size,
                        a.val_fraction, a.positive, a.width_mult)
        else:
            out = fit_stats_csv(a.model, a.csv, a.out, a.positive, a.l2, features=a.features)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
