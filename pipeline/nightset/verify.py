"""Verify: keep the queries with a database image within the threshold, write the query set.

The last stage of the night-set build (the thesis kept an SF-XL night photo only
where a database image lies within 25 m of its relabelled position):

- reads the final labels (``relabel/labels.csv``; or, without a relabelling pass, the
  positions of the de-duplicated photos), drops rejected photos and those whose
  nearest database image is farther than ``threshold_m``;
- copies each kept photo to ``<out>/queries/`` under its VG benchmark name
  (``@east@north@zone@letter@lat@lon@flickr_<id>@...@.jpg``, UTM in the database's
  zone) and links the database (``<out>/database`` -> the dataset's ``database``
  folder), so ``<out>`` is a dataset root the main pipeline indexes and evaluates;
- writes ``<out>/verified.csv`` (every photo: position, nearest database image and its
  distance, kept or the reason it was dropped) and ``counts.json`` with the number of
  photos at each step of the build.

Re-running replaces the query folder atomically (a killed run leaves the previous
one in place).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import utm

from .. import geodesy
from ..datasets.index import read_table
from ..datasets.names import format_name
from ..io import atomic_path, read_json, write_json

logger = logging.getLogger(__name__)

DROPPED_STATUSES = ("rejected",)


def _read_csv(path, required) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    df = pd.read_csv(path, dtype={"photo_id": str})
    missing = [c for c in required if c not in df]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {list(df.columns)})")
    return df


def nearest_database(lat, lon, db: pd.DataFrame, zone: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query position: UTM ``[Q, 2]`` in the database's zone (what the verified names
    carry, like the database's), index of the nearest database image and its distance in
    metres (:mod:`pipeline.geodesy`: right across zones, unlike UTM forced into one)."""
    number, letter = int(zone[:-1]), zone[-1]
    q = np.array([utm.from_latlon(a, b, force_zone_number=number, force_zone_letter=letter)[:2]
                  for a, b in zip(lat, lon)], dtype=np.float64).reshape(-1, 2)
    if not len(q):
        return q, np.zeros(0, np.int64), np.zeros(0)
    queries = geodesy.from_latlon(lat, lon)
    # the index table's east/north are in its common zone; lat/lon place the others
    database = geodesy.from_utm(db.east.to_numpy(np.float64), db.north.to_numpy(np.float64), [zone] * len(db),
                                db.lat.to_numpy(np.float64), db.lon.to_numpy(np.float64))
    idx, dist = geodesy.nearest(queries, database)  # exact, in chunks (memory bounded)
    return q, idx, dist


def verify(labels_csv, photos_dir, db_root, db_index_dir, out_dir, threshold_m: float = 25.0,
           counts: dict | None = None) -> dict:
    """Write the verified query set under ``out_dir``; return the counts."""
    labels = _read_csv(labels_csv, ["photo_id", "file", "lat", "lon"])
    if "status" not in labels:
        labels["status"] = "unreviewed"
    db_index_dir = Path(db_index_dir)
    db = read_table(db_index_dir / "database.csv")
    zone = read_json(db_index_dir / "summary.json")["zone"]
    photos_dir, db_root, out_dir = Path(photos_dir), Path(db_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok_pos = labels.lat.notna() & labels.lon.notna()
    q, idx, dist = nearest_database(labels.lat[ok_pos].to_numpy(), labels.lon[ok_pos].to_numpy(), db, zone)
    labels["east"] = np.nan
    labels["north"] = np.nan
    labels["nearest_db"] = ""
    labels["nearest_db_m"] = np.nan
    labels.loc[ok_pos, "east"] = q[:, 0]
    labels.loc[ok_pos, "north"] = q[:, 1]
    labels.loc[ok_pos, "nearest_db"] = [db.name.iloc[i] if i >= 0 else "" for i in idx]
    labels.loc[ok_pos, "nearest_db_m"] = dist
    reason = np.where(labels.status.isin(DROPPED_STATUSES), "rejected", "")
    reason = np.where((reason == "") & ~ok_pos, "no position", reason)
    reason = np.where((reason == "") & ~(labels.nearest_db_m <= threshold_m),
                      f"no database image within {threshold_m:g} m", reason)
    labels["kept"] = reason == ""
    labels["reason"] = reason
    number, letter = int(zone[:-1]), zone[-1]
    queries = out_dir / "queries"
    names = []
    with atomic_path(queries) as tmp:
        tmp.mkdir()
        for _, r in labels.iterrows():
            if not r.kept:
                names.append("")
                continue
            src = photos_dir / r.file
            if not src.is_file():
                raise FileNotFoundError(f"{src}: photo {r.photo_id} of {labels_csv} is missing")
            name = format_name(float(r.east), float(r.north), number, letter, float(r.lat), float(r.lon),
                               pano_id=f"flickr_{r.photo_id}", note="night", extension=src.suffix.lower() or ".jpg")
            shutil.copyfile(src, tmp / name)
            names.append(f"queries/{name}")
    labels["query_name"] = names
    link = out_dir / "database"
    if link.is_symlink() or link.exists():
        if not link.is_symlink():
            raise FileExistsError(f"{link}: exists and is not the link to the database this stage makes")
        link.unlink()
    os.symlink(os.path.abspath(db_root / "database"), link, target_is_directory=True)
    with atomic_path(out_dir / "verified.csv") as tmp:
        labels.to_csv(tmp, index=False)
    all_counts = {**(counts or {}), "labelled": int(len(labels)),
                  "rejected": int((labels.reason == "rejected").sum()),
                  "no_database_within_threshold": int(labels.reason.str.startswith("no database").sum()),
                  "verified_queries": int(labels.kept.sum()), "threshold_m": threshold_m}
    write_json(out_dir / "counts.json", all_counts)
    logger.info("verified %d of %d queries (database within %g m) -> %s", all_counts["verified_queries"],
                len(labels), threshold_m, queries)
    return all_counts


def stage_counts(build_dir) -> dict:
    """Counts of the earlier stages of a build folder (those whose tables exist)."""
    build = Path(build_dir)
    out = {}
    tables = {"collected": ("collected/photos.csv", None), "filtered_outdoor": ("filtered.csv", "is_outdoor"),
              "filtered_night": ("filtered.csv", "is_night"), "filtered_kept": ("filtered.csv", "keep"),
              "deduplicated_kept": ("dedup.csv", "keep")}
    for key, (rel, col) in tables.items():
        p = build / rel
        if p.is_file():
            df = pd.read_csv(p)
            out[key] = int(len(df)) if col is None else int(df[col].astype(bool).sum())
    labels = build / "relabel" / "labels.csv"
    if labels.is_file():
        out["relabel_status"] = {k: int(v) for k, v in pd.read_csv(labels).status.value_counts().items()}
    state = build / "collected" / "summary.json"
    if state.is_file():
        out["collect_summary"] = json.loads(state.read_text())
    return out


def _arguments(p):
    p.add_argument("--labels", required=True, help="relabel/labels.csv (or dedup.csv: photo_id, file, lat, lon)")
    p.add_argument("--photos", required=True, help="folder the labels' 'file' column is relative to")
    p.add_argument("--db-root", required=True, help="the database's dataset root (holds database/)")
    p.add_argument("--db-index", required=True, help="its index tables (work/<dataset>/index)")
    p.add_argument("--build", required=True, help="the build folder (for the counts of earlier stages)")
    p.add_argument("--out", required=True, help="output dataset root (queries/, database link, counts.json)")
    p.add_argument("--threshold", type=float, default=25.0)


def _run(a):
    counts = verify(a.labels, a.photos, a.db_root, a.db_index, a.out, a.threshold, stage_counts(a.build))
    print(json.dumps(counts, indent=2))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"nightset-verify": (_arguments, _run)}
