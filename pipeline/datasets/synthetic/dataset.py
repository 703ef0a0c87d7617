"""The synthetic dataset's conf and writer: ``DEFAULT_CONF``, the shots, VG file names, ``generate``.

The database is a grid of day views every ``db_spacing`` metres along each street,
at the ``db_headings``; queries are night views at random positions between the
grid points (see the package docstring). ``generate`` renders them (two threads),
writes the JPEGs, README.txt and synthetic.json into ``<root>.partial-<pid>`` and
renames it to ``<root>`` (atomic); a complete root made with the same conf is left
alone (idempotent).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import utm

from ...conf import merge_conf
from ..names import format_name
from .facades import _window_styles
from .render import Camera, _post_day, _post_night, _render
from .scene import _NIGHT_VARIANTS, _build_scene
from .world import _HMAX, _SIDEWALK, Street, _make_streets

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


# --------------------------------------------------------------------------- shots and writing


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
