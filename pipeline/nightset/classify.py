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

Models are chosen by name plus a conf dict (like :mod:`pipeline.registry`;
:data:`CLASSIFIERS`, :func:`build_classifier`):

``daynight_stats``
    A transparent baseline for day vs night: a logistic model over a handful of
    image statistics, with documented default coefficients and a fit on labelled
    images (:mod:`pipeline.nightset.stats_models`).
``outdoor_stats``
    The same for outdoor vs indoor (:mod:`pipeline.nightset.stats_models`). It is
    weak: it knows sky, texture and line statistics, not semantics. It separates
    synthetic rooms from synthetic streets; on real photos (bars, concerts,
    stations, tunnels, close-ups at night) expect many mistakes, so prefer
    ``mobilenet`` trained on a few hundred labelled photos of the area.
``mobilenet``
    A small CNN (torchvision ``mobilenet_v2(weights=None)``, 2-class head) trained
    on a CSV of labelled images; it loads only the checkpoint file named in its
    conf (nothing is downloaded) (:mod:`pipeline.nightset.mobilenet`).

All models return the probability of the *positive* class: ``night`` for the
night model, ``outdoor`` for the outdoor model. Photos are read by
:mod:`pipeline.nightset.photos`.

This module holds the classifier registry, the stage (:func:`classify`) and its CLI
(``python -m pipeline nightset-filter`` runs the same)::

    python -m pipeline.nightset.classify filter --src BUILD/collected --out BUILD/filtered.csv
    python -m pipeline.nightset.classify train --csv labels.csv --out night.pt --epochs 10
    python -m pipeline.nightset.classify fit --model daynight_stats --csv labels.csv --out night.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..images import ImageReadError
from ..io import atomic_path
from ..registry import Registry
from .mobilenet import train
from .photos import parse_hour, read_photo, read_photos_table
from .stats_models import StatsModel, fit_stats_csv

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- registry

CLASSIFIERS = Registry("nightset classifier", {
    "daynight_stats": ("pipeline.nightset.stats_models", "DayNightStats"),
    "outdoor_stats": ("pipeline.nightset.stats_models", "OutdoorStats"),
    "mobilenet": ("pipeline.nightset.mobilenet", "MobileNetClassifier"),
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
        raise ValueError(f"classifier conf must be a JSON object, got {conf!r}")  # noqa: TRY004 - bad input
    return {k: v for k, v in conf.items() if k != "fit"}  # fit info travels with fitted confs


def build_classifier(conf: dict | str | os.PathLike):
    """A classifier from a conf dict (``{"name": ..., ...}``), a named conf or a JSON file path."""
    return CLASSIFIERS.build(resolve_conf(conf))


# --------------------------------------------------------------------------- stage


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
    (e.g. from :func:`pipeline.nightset.stats_models.fit_stats_csv`), or None to skip
    that test (every photo passes it; the model column says ``none``). Thresholds
    default to the confs' ``threshold`` (0.5). ``features=True`` adds the statistics models' features as
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


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`); :func:`main` parses its own arguments
COMMANDS = {"nightset-filter": main}


if __name__ == "__main__":
    sys.exit(main())
