"""The filter stage's statistics baselines: logistic models over a few image statistics.

``daynight_stats`` (:class:`DayNightStats`)
    Day vs night over :data:`DAYNIGHT_FEATURES` (darkness, sky brightness, light
    sources, tint, the EXIF hour), with documented default coefficients.
``outdoor_stats`` (:class:`OutdoorStats`)
    Outdoor vs indoor over :data:`OUTDOOR_FEATURES` (texture, sky, lines, colour).
    It is weak: it knows sky, texture and line statistics, not semantics; prefer
    ``mobilenet`` (:mod:`pipeline.nightset.mobilenet`) trained on labelled photos of
    the area.

Both are :class:`StatsModel`: ``p = sigmoid(bias + coef . features)`` with the
coefficients on the raw features, so a conf reads directly. :func:`fit_logistic`
(numpy only) fits them; :func:`fit_stats` / :func:`fit_stats_csv` fit a model's
coefficients on labelled photos and return / write a conf that
:func:`pipeline.nightset.classify.build_classifier` takes.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import cv2
import numpy as np

from ..conf import merge_conf
from ..io import write_json
from .photos import Photo, read_labels, read_many

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- statistics baselines

STATS_SIDE = 256  # statistics are computed on the image downscaled to this longer side
DARK_LEVEL = 0.20  # luma below this is "dark"
LIGHT_LEVEL = 0.85  # luma above this is "saturated bright"
LIGHT_SURROUND = 0.45  # ... and a light source when its 15x15 surround is darker than this


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

    FEATURES: ClassVar[dict] = {}
    positive = ""
    default_conf: ClassVar[dict] = {}

    def __init__(self, conf: dict | None = None):
        conf = dict(conf or {})
        name = self.default_conf["name"]
        # ``coef`` replaces the default weights as a whole (a feature it leaves out weighs
        # 0), so it is not merged key by key. check=False: ``threshold`` is a probability
        # (0 passes every photo), not one of conf_checks' thresholds that must be > 0.
        has_coef = "coef" in conf
        coef = conf.pop("coef", None)
        self.conf = merge_conf(self.default_conf, conf, name, check=False)
        if has_coef:
            if not isinstance(coef, dict):
                raise ValueError(f"{name}: coef must be a dict feature -> weight, not {coef!r}")
            self.conf["coef"] = dict(coef)
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
    default_conf: ClassVar[dict] = {
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
    default_conf: ClassVar[dict] = {
        "name": "outdoor_stats",
        "coef": {"edge_density": 12.0, "top_smooth": 0.0, "top_blue": 0.0, "sky_frac": 3.0,
                 "vertical_frac": 0.0, "colourfulness": 2.0, "top_minus_bottom": -4.0},
        "bias": -0.5,
        "threshold": 0.5,
    }

    def features(self, photo: Photo) -> np.ndarray:
        return outdoor_features(photo)


#: the statistics models by conf name (all of them are also in the classifier registry,
#: :data:`pipeline.nightset.classify.CLASSIFIERS`)
STATS_MODELS = {cls.default_conf["name"]: cls for cls in (DayNightStats, OutdoorStats)}


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


# --------------------------------------------------------------------------- fitting


def fit_stats(model: str, photos: list[Photo], y, l2: float = 1.0, base_conf: dict | None = None,
              features: list[str] | None = None) -> dict:
    """Fit the coefficients of a statistics model (``daynight_stats``/``outdoor_stats``).

    ``y``: 1 = the model's positive class (night / outdoor). ``features``: fit only
    these (the others get weight 0), e.g. to leave out a statistic that the
    labelled set cannot exercise (no street lights in it) and that would otherwise
    get an arbitrary weight. ``base_conf``: options other than the coefficients (e.g.
    ``hour_sources``). Returns a conf to pass to
    :func:`pipeline.nightset.classify.build_classifier`, with ``fit`` info (n, training
    accuracy).
    """
    cls = STATS_MODELS.get(model)
    if cls is None:
        raise ValueError(f"fit_stats: {model!r} is not a statistics model; known: {sorted(STATS_MODELS)}")
    m = cls({**{k: v for k, v in (base_conf or {}).items() if k != "fit"}, "name": model})
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
    fitted = cls(conf)
    acc = float(((fitted.predict_features(X) >= 0.5) == (y == 1)).mean())
    conf["fit"] = {"n": len(y), "n_positive": int(y.sum()), "l2": l2, "features": use,
                   "train_accuracy": round(acc, 4)}
    return conf


def fit_stats_csv(model: str, csv, out_json, positive: str | None = None, l2: float = 1.0,
                  max_side: int = 512, workers: int = 2, features: list[str] | None = None) -> dict:
    """:func:`fit_stats` on a labelled CSV (file,label); writes the fitted conf as JSON."""
    paths, y, classes = read_labels(csv, positive)
    photos, errors = read_many(paths, max_side, f"fit {model}", workers)
    ok = [i for i, ph in enumerate(photos) if ph is not None]
    for e in (e for e in errors if e):
        logger.warning("skipped: %s", e)
    conf = fit_stats(model, [photos[i] for i in ok], y[ok], l2, features=features)
    conf["fit"].update({"csv": str(csv), "classes": classes, "skipped": len(paths) - len(ok)})
    write_json(out_json, conf)
    logger.info("%s: fitted on %d images, training accuracy %.3f -> %s", model, len(ok),
                conf["fit"]["train_accuracy"], out_json)
    return conf

