"""Dedupe stage of the night query set: near-identical shots of the same scene.

Two photos are *duplicates* when both

- their global descriptors are close: cosine similarity >= ``sim_threshold``, and
- their geotags are close: great-circle distance <= ``max_distance_m``;

or, as an optional extra rule (``burst_seconds``, off by default), when the same
``owner`` took them at most ``burst_seconds`` apart (``datetaken``) and their
similarity is >= ``burst_sim_threshold`` (0.7: bursts and re-framed re-takes, even
with scattered geotags; unrelated night views score about 0.5).
Duplicates form groups (connected components of the duplicate pairs: A~B and
B~C put A, B, C in one group even when A and C are less alike; the output gives
every removed photo's similarity and distance *to the photo kept*, so such chains
are visible). One photo per group is kept: by default the one with the most
pixels (more detail for relabelling and matching), ties going to the earliest
``datetaken``, then the smallest ``photo_id``; ``prefer: earliest`` puts the date
first.

Only pairs within ``max_distance_m`` are ever compared: positions go into a grid of
``max_distance_m`` cells and each cell is compared with its neighbours, so the work
grows with the number of nearby pairs, not with n^2.

Descriptors are pluggable (``descriptor`` conf, by name):

``thumb_grad`` (default, training-free)
    A 16x16 grey thumbnail (zero mean, unit norm) concatenated with a 4x4-cell
    histogram of 8 gradient orientations of a 64x64 grey image (square-rooted,
    unit norm); the cosine of two such descriptors is the mean of the cosines of the
    two parts. Robust to re-compression, rescaling, small shifts and crops and
    brightness changes; not to viewpoint changes, which is intended: two shots of
    the same facade from a few metres apart are *different* queries. Measured on
    synthetic night street views (tests/test_nightset_dedupe.py and the numbers in
    ``DEFAULT_CONF``): copies shifted by a few pixels, zoomed by up to 8%, rescaled
    0.6-1.2x and re-encoded at JPEG 40-85 score >= 0.939; distinct views within
    12 m score <= 0.901. On repetitive day facades the two ranges overlap (distinct
    views 5 m apart up to 0.92): it is a near-*identical* detector, not a place
    recogniser.
``global``
    Any model of :mod:`pipeline.global_features` (e.g. CosPlace with its weights;
    ``fit_state`` for VLAD): ``{"name": "global", "model": {...}, "fit_state": null}``.
    Its similarities are on another scale: set ``sim_threshold`` accordingly.

Input: ``<build>/collected/photos.csv`` (positions, owner, datetaken, image files)
and, if given, ``<build>/filtered.csv`` (only its ``keep`` rows are deduplicated).
Output ``<build>/dedup.csv``, one row per candidate photo::

    photo_id, file, keep, duplicate_of, similarity, distance_m, group, group_size, reason

``duplicate_of`` is the kept photo of the group (empty for kept photos),
``similarity``/``distance_m`` are to that photo, ``group`` numbers the groups (a
photo without duplicates is a group of one), ``reason`` says why a photo was
dropped (``duplicate``, ``unreadable: ...``). Photos without a valid position are
compared by the burst rule only. ``file`` is copied from photos.csv (relative to
``<build>/collected/``).

CLI::

    python -m pipeline.nightset.dedupe --src BUILD/collected --filtered BUILD/filtered.csv --out BUILD/dedup.csv
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..conf import merge_conf
from ..images import ImageReadError
from ..io import atomic_path
from ..registry import Registry
from .photos import read_photo, read_photos_table

logger = logging.getLogger(__name__)

EARTH_RADIUS_M = 6371008.8

DEFAULT_CONF = {
    "descriptor": {"name": "thumb_grad"},
    # cosine of thumb_grad descriptors. Measured on synthetic night street views: re-encoded,
    # shifted, 0-8% zoomed, rescaled copies >= 0.939; distinct views within 12 m <= 0.901
    "sim_threshold": 0.92,
    "max_distance_m": 50.0,
    "burst_seconds": None,  # e.g. 5: same owner within 5 s is a duplicate (if similar enough)
    "burst_sim_threshold": 0.7,
    "prefer": "resolution",  # or "earliest"
}

# --------------------------------------------------------------------------- descriptors


class ThumbGrad:
    """Training-free near-duplicate descriptor: grey thumbnail + gradient orientation histograms."""

    default_conf: ClassVar[dict] = {"name": "thumb_grad", "thumb": 16, "grad_size": 64, "cells": 4, "bins": 8,
                                    "thumb_weight": 1.0, "grad_weight": 1.0}

    def __init__(self, conf: dict | None = None):
        self.conf = merge_conf(self.default_conf, conf, "thumb_grad")
        c = self.conf
        if c["grad_size"] % c["cells"]:
            raise ValueError("thumb_grad: grad_size must be a multiple of cells")
        self.dim = c["thumb"] ** 2 + c["cells"] ** 2 * c["bins"]

    def describe_one(self, image: np.ndarray) -> np.ndarray:
        c = self.conf
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        t = cv2.resize(grey, (c["thumb"], c["thumb"]), interpolation=cv2.INTER_AREA).ravel()
        t = t - t.mean()
        t /= np.linalg.norm(t) + 1e-6
        g = cv2.resize(grey, (c["grad_size"], c["grad_size"]), interpolation=cv2.INTER_AREA)
        gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
        mag = np.hypot(gx, gy)
        ang = np.arctan2(gy, gx) % (2 * np.pi)
        b = np.minimum((ang / (2 * np.pi) * c["bins"]).astype(np.int64), c["bins"] - 1)
        cell = c["grad_size"] // c["cells"]
        yy, xx = np.mgrid[0:c["grad_size"], 0:c["grad_size"]]
        idx = ((yy // cell) * c["cells"] + (xx // cell)) * c["bins"] + b
        h = np.bincount(idx.ravel(), weights=mag.ravel(), minlength=c["cells"] ** 2 * c["bins"])
        h = np.sqrt(h)
        h /= np.linalg.norm(h) + 1e-6
        wt, wg = float(c["thumb_weight"]), float(c["grad_weight"])
        return (np.concatenate([wt * t, wg * h]) / math.sqrt(wt * wt + wg * wg)).astype(np.float32)

    def describe(self, images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.describe_one(im) for im in images])


class GlobalDescriptor:
    """A :mod:`pipeline.global_features` model as the dedupe descriptor (weights as its conf says)."""

    default_conf: ClassVar[dict] = {"name": "global", "model": None, "fit_state": None, "device": "auto",
                                    "batch_size": 16}

    def __init__(self, conf: dict):
        import torch

        from ..global_features import build_model
        from ..gpus import pick_device

        self.conf = merge_conf(self.default_conf, conf, "global descriptor")
        if not isinstance(self.conf["model"], dict):
            raise ValueError("global descriptor: conf needs 'model' (a pipeline.global_features conf)")  # noqa: TRY004
        self.model = build_model(self.conf["model"])
        if self.model.needs_fit:
            if not self.conf["fit_state"]:
                raise ValueError(f"global descriptor: {self.conf['model']['name']} needs a fit_state file "
                                 f"(python -m pipeline fit-global)")
            self.model.load_fit(torch.load(self.conf["fit_state"], map_location="cpu", weights_only=True))
        self.device = pick_device(str(self.conf["device"]))
        self.model.eval().to(self.device)
        self.dim = self.model.dim

    def describe(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        from ..images import target_size

        out = []
        resize = self.model.conf.get("resize")
        with torch.inference_mode():
            for im in images:  # one at a time: sizes differ
                h, w = im.shape[:2]
                tw, th = target_size(w, h, resize)
                if (tw, th) != (w, h):
                    im = cv2.resize(im, (tw, th), interpolation=cv2.INTER_AREA)
                x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float().div_(255)
                out.append(self.model(x.to(self.device)).float().cpu().numpy()[0])
        return np.stack(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


DESCRIPTORS = Registry("dedupe descriptor", {
    "thumb_grad": (__name__, "ThumbGrad"),
    "global": (__name__, "GlobalDescriptor"),
})


def build_descriptor(conf: dict):
    return DESCRIPTORS.build(conf)


# --------------------------------------------------------------------------- geometry


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres (vectorised)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def near_pairs(lat: np.ndarray, lon: np.ndarray, max_distance_m: float, block: int = 2048):
    """Yield ``(i, j, distance_m)`` arrays of all pairs ``i < j`` within ``max_distance_m`` (each once).

    Points go into a grid of ``max_distance_m`` cells on a local equirectangular
    projection (around the median latitude, longitudes unwrapped around the median);
    each cell is compared with itself and four of its eight neighbours (so every
    pair is seen once), distances are exact great-circle ones. NaN positions are
    left out.
    """
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64)
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90))
    if len(ok) < 2:
        return
    lat0, lon0 = np.median(lat[ok]), np.median(lon[ok])
    dlon = (lon[ok] - lon0 + 180) % 360 - 180
    x = np.radians(dlon) * EARTH_RADIUS_M * max(math.cos(math.radians(lat0)), 1e-3)
    y = np.radians(lat[ok] - lat0) * EARTH_RADIUS_M
    # 2% margin: the projection's scale varies slightly with latitude over an area
    size = max(float(max_distance_m), 1e-3) * 1.02
    cx, cy = np.floor(x / size).astype(np.int64), np.floor(y / size).astype(np.int64)
    cells: dict[tuple[int, int], list[int]] = {}
    for k, key in enumerate(zip(cx.tolist(), cy.tolist())):
        cells.setdefault(key, []).append(int(ok[k]))
    cells_np = {k: np.array(v, np.int64) for k, v in cells.items()}
    for (gx, gy), a in cells_np.items():
        for dx, dy in ((0, 0), (1, -1), (1, 0), (1, 1), (0, 1)):
            b = cells_np.get((gx + dx, gy + dy))
            if b is None:
                continue
            same = dx == 0 and dy == 0
            for s in range(0, len(a), block):
                aa = a[s:s + block]
                d = haversine_m(lat[aa][:, None], lon[aa][:, None], lat[b][None, :], lon[b][None, :])
                close = d <= max_distance_m
                if same:
                    close &= aa[:, None] < b[None, :]
                ii, jj = np.nonzero(close)
                if len(ii):
                    i, j = aa[ii], b[jj]
                    yield np.minimum(i, j), np.maximum(i, j), d[ii, jj]


def burst_pairs(owner: list, times: np.ndarray, seconds: float):
    """Yield ``(i, j)`` arrays of pairs with the same non-empty owner taken <= ``seconds`` apart."""
    groups: dict[str, list[int]] = {}
    for i, (o, t) in enumerate(zip(owner, times)):
        if o and np.isfinite(t):
            groups.setdefault(o, []).append(i)
    for idx in groups.values():
        idx = np.array(sorted(idx, key=lambda k: times[k]), np.int64)
        t = times[idx]
        for lag in range(1, len(idx)):
            close = (t[lag:] - t[:-lag]) <= seconds
            if not close.any():
                break  # sorted: larger lags are further apart
            yield idx[:-lag][close], idx[lag:][close]


class _UnionFind:
    def __init__(self, n):
        self.parent = np.arange(n)

    def find(self, i):
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, i, j):
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


# --------------------------------------------------------------------------- stage


def _merge_conf(conf: dict | None) -> dict:
    conf = dict(conf or {})
    # a descriptor conf replaces the default one as a whole (another descriptor has other
    # options), so it is not merged key by key
    has_descriptor = "descriptor" in conf
    descriptor = conf.pop("descriptor", None)
    out = merge_conf(DEFAULT_CONF, conf, "dedupe")
    if has_descriptor:
        out["descriptor"] = copy.deepcopy(descriptor)
    if out["prefer"] not in ("resolution", "earliest"):
        raise ValueError(f"dedupe: prefer must be 'resolution' or 'earliest', got {out['prefer']!r}")
    if not out["max_distance_m"] >= 0:
        raise ValueError("dedupe: max_distance_m must be >= 0")
    return out


def _bool_column(values, csv, col) -> np.ndarray:
    s = pd.Series(values).astype(str).str.strip().str.lower()
    bad = sorted(set(s) - {"true", "false", "1", "0"})
    if bad:
        raise ValueError(f"{csv}: column {col} must be true/false, found {bad[:5]}")
    return s.isin(["true", "1"]).to_numpy()


def dedupe(src, out_csv, filtered_csv=None, conf: dict | None = None, workers: int = 2,
           max_side: int = 256) -> dict:
    """The dedupe stage: group near-identical photos and write ``out_csv`` (dedup.csv).

    ``src``: ``<build>/collected`` or its photos.csv (needs photo_id, file, lat, lon;
    owner and datetaken for the burst rule and the choice of the photo kept).
    ``filtered_csv``: ``<build>/filtered.csv``; only its ``keep`` rows are candidates
    (all photos when None). ``conf``: see :data:`DEFAULT_CONF` and the module doc.
    Returns a summary (counts, conf, seconds).
    """
    t0 = time.perf_counter()
    conf = _merge_conf(conf)
    df, csv, base = read_photos_table(src)
    missing = {"lat", "lon"} - set(df.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)}")
    if filtered_csv is not None:
        fcsv = Path(filtered_csv)
        if not fcsv.is_file():
            raise FileNotFoundError(f"filtered table not found: {fcsv}")
        filt = pd.read_csv(fcsv, dtype={"photo_id": str}, keep_default_na=False)
        if not {"photo_id", "keep"} <= set(filt.columns):
            raise ValueError(f"{fcsv}: needs columns photo_id and keep")
        unknown = sorted(set(filt.photo_id) - set(df.photo_id))
        if unknown:
            raise ValueError(f"{fcsv}: photo_id(s) {unknown[:5]} are not in {csv} (tables of different builds?)")
        keep_ids = set(filt.photo_id[_bool_column(filt.keep, fcsv, "keep")])
        df = df[df.photo_id.isin(keep_ids)].reset_index(drop=True)
    n = len(df)
    lat = pd.to_numeric(df["lat"], errors="coerce").to_numpy(np.float64, copy=True)
    lon = pd.to_numeric(df["lon"], errors="coerce").to_numpy(np.float64, copy=True)
    bad_pos = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180))
    if bad_pos.any():
        logger.warning("%d photo(s) without a valid position: only the burst rule applies to them",
                       int(bad_pos.sum()))
        lat[bad_pos] = np.nan
        lon[bad_pos] = np.nan
    times = (pd.to_datetime(df["datetaken"], errors="coerce", format="mixed")
             if "datetaken" in df.columns else pd.Series([pd.NaT] * n))
    tsec = np.array([t.timestamp() if not pd.isna(t) else np.nan for t in times], np.float64)
    owner = df["owner"].fillna("").astype(str).tolist() if "owner" in df.columns else [""] * n

    # descriptors
    desc_model = build_descriptor(conf["descriptor"])
    D = np.zeros((n, desc_model.dim), np.float32)
    pixels = np.zeros(n, np.int64)
    reasons = [""] * n

    def load(i):
        try:
            return read_photo(base / df["file"].iloc[i], max_side), ""
        except ImageReadError as e:
            return None, f"unreadable: {e}"

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=n, desc="dedupe: describe", unit="img") as bar:
        for start in range(0, n, 64):
            idx = list(range(start, min(n, start + 64)))
            loaded = list(pool.map(load, idx))
            good = [(i, ph) for i, (ph, _) in zip(idx, loaded) if ph is not None]
            for i, (_, err) in zip(idx, loaded):
                if err:
                    reasons[i] = err
                    logger.warning("%s", err)
            if good:
                D[[i for i, _ in good]] = desc_model.describe([ph.image for _, ph in good])
                for i, ph in good:
                    pixels[i] = ph.width * ph.height
            bar.update(len(idx))
    readable = np.array([not r for r in reasons], bool)
    lat_r, lon_r = np.where(readable, lat, np.nan), np.where(readable, lon, np.nan)

    # duplicate pairs
    uf = _UnionFind(n)
    n_near, n_edges, n_burst = 0, 0, 0
    for i, j, _ in near_pairs(lat_r, lon_r, conf["max_distance_m"]):
        n_near += len(i)
        sim = np.einsum("ij,ij->i", D[i], D[j])
        hit = sim >= conf["sim_threshold"]
        n_edges += int(hit.sum())
        for a, b in zip(i[hit].tolist(), j[hit].tolist()):
            uf.union(a, b)
    if conf["burst_seconds"]:
        ok_t = np.where(readable, tsec, np.nan)
        for i, j in burst_pairs(owner, ok_t, float(conf["burst_seconds"])):
            sim = np.einsum("ij,ij->i", D[i], D[j])
            hit = sim >= conf["burst_sim_threshold"]
            n_burst += int(hit.sum())
            for a, b in zip(i[hit].tolist(), j[hit].tolist()):
                uf.union(a, b)

    # groups and the photo kept in each
    roots = np.array([uf.find(i) for i in range(n)], np.int64)
    t_key = np.where(np.isfinite(tsec), tsec, np.inf)
    ids = df["photo_id"].tolist()
    if conf["prefer"] == "resolution":
        order = sorted(range(n), key=lambda k: (-pixels[k], t_key[k], ids[k]))
    else:
        order = sorted(range(n), key=lambda k: (t_key[k], -pixels[k], ids[k]))
    keeper: dict[int, int] = {}
    for k in order:
        if readable[k]:
            keeper.setdefault(int(roots[k]), k)
    group_ids = {r: g for g, r in enumerate(dict.fromkeys(roots.tolist()))}
    sizes = pd.Series(roots).map(pd.Series(roots).value_counts()).to_numpy()
    keep = np.zeros(n, bool)
    dup_of = [""] * n
    sim_out = np.full(n, np.nan)
    dist_out = np.full(n, np.nan)
    for i in range(n):
        if not readable[i]:
            continue
        k = keeper[int(roots[i])]
        if k == i:
            keep[i] = True
            continue
        dup_of[i] = ids[k]
        sim_out[i] = float(D[i] @ D[k])
        dist_out[i] = float(haversine_m(lat[i], lon[i], lat[k], lon[k]))
        reasons[i] = "duplicate"
    out = pd.DataFrame({
        "photo_id": df["photo_id"], "file": df["file"], "keep": keep, "duplicate_of": dup_of,
        "similarity": np.round(sim_out, 4), "distance_m": np.round(dist_out, 2),
        "group": [group_ids[int(r)] for r in roots], "group_size": sizes, "reason": reasons,
    })
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False)
    summary = {
        "candidates": n, "unreadable": int((~readable).sum()), "no_position": int(bad_pos.sum()),
        "pairs_within_distance": n_near, "duplicate_pairs": n_edges, "burst_pairs": n_burst,
        "groups_with_duplicates": int((np.unique(roots, return_counts=True)[1] > 1).sum()),
        "removed": int((np.array(reasons) == "duplicate").sum()), "kept": int(keep.sum()),
        "conf": conf, "src": str(csv), "filtered": str(filtered_csv) if filtered_csv else None,
        "out": str(out_csv), "seconds": round(time.perf_counter() - t0, 2),
    }
    logger.info("dedupe: %s", {k: v for k, v in summary.items() if k != "conf"})
    return summary


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.nightset.dedupe", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="<build>/collected (or its photos.csv)")
    p.add_argument("--filtered", help="<build>/filtered.csv (only its keep rows are deduplicated)")
    p.add_argument("--out", required=True, help="<build>/dedup.csv")
    p.add_argument("--conf", type=json.loads, default={}, help="JSON object overriding DEFAULT_CONF keys")
    p.add_argument("--sim-threshold", type=float)
    p.add_argument("--max-distance", type=float, help="metres")
    p.add_argument("--burst-seconds", type=float)
    p.add_argument("--prefer", choices=["resolution", "earliest"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conf = dict(a.conf)
    for key, val in (("sim_threshold", a.sim_threshold), ("max_distance_m", a.max_distance),
                     ("burst_seconds", a.burst_seconds), ("prefer", a.prefer)):
        if val is not None:
            conf[key] = val
    try:
        summary = dedupe(a.src, a.out, a.filtered, conf, a.workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`); :func:`main` parses its own arguments
COMMANDS = {"nightset-dedupe": main}


if __name__ == "__main__":
    sys.exit(main())
