"""Relabel: review the positions of the night photos in a small local web page.

Flickr positions are often tens of metres off. This stage shows each query photo beside
the database images nearest its current label (UTM distance, in metres under each) and
records what the reviewer decides:

- **pick** a database image (click it, or press its number ``1``-``9``): the label moves
  to that image's latitude/longitude, status ``moved``; or, when the picked image is
  already (one of) the nearest database images to the label and no farther than
  ``confirm_m`` (5 m by default), the label is kept as it is, status ``confirmed``.
  "One of the nearest": within :data:`TIE_M` (0.5 m) of the nearest distance, so the
  several crops of one panorama count alike;
- **enter** coordinates (latitude, longitude in decimal degrees, WGS84; a pasted
  ``"lat, lon"`` is split): status ``entered``. Coordinates are validated (numbers, in
  range, convertible to UTM); a bad value is refused with HTTP 400 and a message;
- **skip** (``s``): status ``skipped``, label unchanged ("next unreviewed" does not offer it
  again; browse back to it with the arrows);
- **reject** (``x``): status ``rejected``, label unchanged; verify drops the photo.

Other keys: ``n`` next unreviewed photo, ``←``/``→`` previous/next photo, ``e`` the
coordinate field, ``m`` more candidates. The page shows the progress (photos reviewed
of the total) and, after every decision, goes on to the next unreviewed photo.

Crash safety: every decision is POSTed to the server, which appends one JSON line to
``<build>/relabel/log.jsonl`` (``timestamp``, ``photo_id``, ``action``, ``old_lat``,
``old_lon``, ``new_lat``, ``new_lon``, ``db_name``, ``moved_m``) and flushes and fsyncs
it *before* replying, so an acknowledged decision is never lost. ``labels.csv`` is
derived from the log: :func:`replay` keeps the last decision of each photo (later
decisions override earlier ones) and :func:`write_labels` writes, atomically, one row per
query photo: ``photo_id, file, lat, lon, status, db_name, orig_lat, orig_lon`` (status
``unreviewed`` and the original position for photos without a decision). It is rebuilt
at every decision and at start-up, so a restarted server resumes where the reviewer
stopped. A crash in the middle of an append can leave a truncated last line: it was
never acknowledged, so it is ignored with a warning (and cut off at start-up); any other
bad line is an error naming the file and line.

Images are served only from the two configured folders and only under names listed in
the query table (``file``) or the database table (``name``); anything else, ``..``
included, is refused.

Usage (the server binds 127.0.0.1 on a free port and prints its URL; Ctrl-C stops it)::

    python -m pipeline.nightset.relabel --queries BUILD/dedup.csv \\
        --positions BUILD/collected/photos.csv --photos BUILD/collected \\
        --db-root data/sf --db-table work/sf/index/database.csv --build BUILD
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import mimetypes
import os
import posixpath
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
import pandas as pd

from .. import geodesy
from ..datasets.index import read_table
from ..io import atomic_path

logger = logging.getLogger(__name__)

CONFIRM_M = 5.0
TIE_M = 0.5
ACTIONS = ("confirmed", "moved", "entered", "rejected", "skipped")
STATUSES = ("unreviewed",) + ACTIONS
LABEL_COLUMNS = ["photo_id", "file", "lat", "lon", "status", "db_name", "orig_lat", "orig_lon"]
LOG_NAME = "log.jsonl"
LABELS_NAME = "labels.csv"
MAX_BODY = 64 * 1024
MAX_CANDIDATES = 60


class RelabelError(ValueError):
    """An input file (query table, positions, database table, log) that cannot be used."""


class DecisionError(ValueError):
    """A decision the server refuses (answered with HTTP 400 and this message)."""


# ----------------------------------------------------------------------------- inputs


def _as_bool(values: pd.Series, path: Path, column: str) -> pd.Series:
    if values.dtype == bool:
        return values
    text = values.astype(str).str.strip().str.lower()
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False, "nan": False}
    bad = sorted(set(text) - set(table))
    if bad:
        raise RelabelError(f"{path}: column {column!r} is not boolean (values {bad[:5]})")
    return text.map(table).astype(bool)


def _read_csv(path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, dtype={"photo_id": str, "file": str}, keep_default_na=False,
                           na_values={"lat": [""], "lon": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RelabelError(f"{path}: cannot read the {what} as CSV ({e})") from None


def load_queries(queries_csv, positions_csv=None) -> pd.DataFrame:
    """The photos to review: ``photo_id, file, lat, lon`` (rows with ``keep`` true only,
    where the table has a ``keep`` column, as ``filtered.csv`` and ``dedup.csv`` do).

    ``dedup.csv``/``filtered.csv`` carry no position: pass the collected
    ``photos.csv`` as ``positions_csv`` (its ``lat``/``lon`` are joined on ``photo_id``
    and replace any in ``queries_csv``)."""
    path = Path(queries_csv)
    df = _read_csv(path, "query table")
    missing = [c for c in ("photo_id", "file") if c not in df]
    if missing:
        raise RelabelError(f"{path}: missing columns {missing} (has {list(df.columns)})")
    if "keep" in df:
        df = df[_as_bool(df["keep"], path, "keep")]
    if positions_csv is not None:
        ppath = Path(positions_csv)
        pos = _read_csv(ppath, "positions table")
        miss = [c for c in ("photo_id", "lat", "lon") if c not in pos]
        if miss:
            raise RelabelError(f"{ppath}: missing columns {miss} (has {list(pos.columns)})")
        if pos.photo_id.duplicated().any():
            raise RelabelError(f"{ppath}: photo_id {pos.photo_id[pos.photo_id.duplicated()].iloc[0]!r} repeated")
        absent = sorted(set(df.photo_id) - set(pos.photo_id))
        if absent:
            raise RelabelError(f"{ppath}: no position for {len(absent)} photos of {path} (e.g. {absent[:3]})")
        df = df.drop(columns=[c for c in ("lat", "lon") if c in df]).merge(
            pos[["photo_id", "lat", "lon"]], on="photo_id", how="left")
    elif not {"lat", "lon"} <= set(df.columns):
        raise RelabelError(f"{path}: no lat/lon columns; pass the collected photos.csv as positions")
    if df.photo_id.duplicated().any():
        raise RelabelError(f"{path}: photo_id {df.photo_id[df.photo_id.duplicated()].iloc[0]!r} repeated")
    for c in ("lat", "lon"):
        try:
            df[c] = pd.to_numeric(df[c]).astype(float)
        except (ValueError, TypeError) as e:
            raise RelabelError(f"{positions_csv or path}: column {c!r} is not numeric ({e})") from None
    bad = ~df.lat.between(-90, 90) & df.lat.notna() | ~df.lon.between(-180, 180) & df.lon.notna()
    if bad.any():
        raise RelabelError(f"{positions_csv or path}: {int(bad.sum())} positions out of range "
                           f"(e.g. photo {df.photo_id[bad].iloc[0]})")
    if df.file.eq("").any():
        raise RelabelError(f"{path}: empty 'file' for photo {df.photo_id[df.file.eq('')].iloc[0]}")
    return df[["photo_id", "file", "lat", "lon"]].reset_index(drop=True)


def load_database(db_table) -> tuple[pd.DataFrame, str]:
    """The database index table (``name, east, north, zone, lat, lon, ...``) and the UTM
    zone of its ``east``/``north`` (from ``summary.json`` beside it, else the most
    frequent name zone, as the index stage chose it)."""
    path = Path(db_table)
    db = read_table(path)
    if not len(db):
        raise RelabelError(f"{path}: the database table is empty")
    summary = path.parent / "summary.json"
    zone = None
    if summary.is_file():
        try:
            zone = json.loads(summary.read_text()).get("zone")
        except json.JSONDecodeError:
            logger.warning("%s: not valid JSON; taking the zone from %s", summary, path)
    if not zone:
        zone = db.zone.astype(str).value_counts().index[0]
    zone = str(zone)
    if len(zone) < 2 or not zone[:-1].isdigit() or not zone[-1].isalpha():
        raise RelabelError(f"{path}: bad UTM zone {zone!r}")
    return db.reset_index(drop=True), zone


# ----------------------------------------------------------------------------- log


def _entry_ok(entry) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("photo_id"), str):
        return "no photo_id"
    if entry.get("action") not in ACTIONS:
        return f"action {entry.get('action')!r} not one of {ACTIONS}"
    for k in ("new_lat", "new_lon"):
        v = entry.get(k)
        if v is not None and not isinstance(v, (int, float)):
            return f"{k} is not a number"
    return None


def read_log(log) -> list[dict]:
    """The decisions of ``log`` in order. A truncated (unparsable) last line is what a
    crash during an append leaves: it is ignored with a warning. Any other bad line
    raises :class:`RelabelError` naming the line."""
    path = Path(log)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    out = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
            problem = _entry_ok(entry)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            entry, problem = None, f"not valid JSON ({e})"
        if problem:
            if i == last:
                logger.warning("%s: line %d is incomplete (%s), ignored: an interrupted write, never "
                               "acknowledged", path, i + 1, problem)
                continue
            raise RelabelError(f"{path}: line {i + 1}: {problem}; fix or delete that line")
        out.append(entry)
    return out


def repair_log(log) -> int:
    """Cut a truncated last line off ``log`` (see :func:`read_log`); return the bytes cut.
    Needed before appending, or the next line would be glued to the fragment."""
    path = Path(log)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        ok = _entry_ok(json.loads(tail.decode("utf-8"))) is None
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if ok:  # complete entry, only the newline was lost
        with open(path, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        return 0
    logger.warning("%s: cutting off an incomplete last line (%d bytes): %r", path, len(tail), tail[:200])
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return len(tail)


def append_entry(log, entry: dict) -> None:
    """Append one decision to ``log`` as a JSON line, flushed and fsync'd before returning."""
    path = Path(log)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:  # make the new directory entry durable too
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)


def replay(log) -> pd.DataFrame:
    """Replay ``log`` (a path, or a list of entries): one row per photo with a decision,
    its last one (``photo_id, status, lat, lon, db_name, timestamp, n_decisions``)."""
    entries = log if isinstance(log, list) else read_log(log)
    last: dict[str, dict] = {}
    count: dict[str, int] = {}
    for e in entries:
        last[e["photo_id"]] = e
        count[e["photo_id"]] = count.get(e["photo_id"], 0) + 1
    rows = [{"photo_id": pid, "status": e["action"],
             "lat": np.nan if e.get("new_lat") is None else float(e["new_lat"]),
             "lon": np.nan if e.get("new_lon") is None else float(e["new_lon"]),
             "db_name": e.get("db_name") or "", "timestamp": e.get("timestamp", ""), "n_decisions": count[pid]}
            for pid, e in last.items()]
    return pd.DataFrame(rows, columns=["photo_id", "status", "lat", "lon", "db_name", "timestamp", "n_decisions"])


def labels_table(queries: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """One row per query photo: the replayed decision, or ``unreviewed`` at its position."""
    out = queries[["photo_id", "file", "lat", "lon"]].copy()
    out["orig_lat"], out["orig_lon"] = out.lat, out.lon
    out["status"], out["db_name"] = "unreviewed", ""
    unknown = sorted(set(decisions.photo_id) - set(out.photo_id))
    if unknown:
        logger.warning("the log has decisions for %d photos not in the query table (ignored), e.g. %s",
                       len(unknown), unknown[:3])
    d = decisions.set_index("photo_id")
    hit = out.photo_id.isin(d.index)
    if hit.any():
        ids = out.photo_id[hit]
        for c in ("lat", "lon", "status", "db_name"):
            out.loc[hit, c] = d.loc[ids, c].to_numpy()
    out["lat"], out["lon"] = out.lat.astype(float), out.lon.astype(float)
    return out[LABEL_COLUMNS].reset_index(drop=True)


def write_labels(queries: pd.DataFrame, log, out) -> pd.DataFrame:
    """Replay ``log`` over ``queries`` and write ``labels.csv`` to ``out`` atomically."""
    labels = labels_table(queries, replay(log))
    with atomic_path(out) as tmp:
        labels.to_csv(tmp, index=False)
    return labels


# ----------------------------------------------------------------------------- state


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _num(v):
    """float -> JSON number or null."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _safe_rel(name: str) -> bool:
    """A relative POSIX path without ``..``, empty or absolute parts."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts) and posixpath.normpath(name) == name


def _parse_coord(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or value is None:
        raise DecisionError(f"{what} is missing")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DecisionError(f"{what} is missing")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DecisionError(f"{what} {value!r} is not a number (decimal degrees, e.g. 37.7749)") from None
    if not math.isfinite(x):
        raise DecisionError(f"{what} {value!r} is not a finite number")
    if not lo <= x <= hi:
        raise DecisionError(f"{what} {x:g} out of range [{lo:g}, {hi:g}]")
    return x


class Relabeller:
    """The review state behind the web page (thread-safe; usable without HTTP)."""

    def __init__(self, queries: pd.DataFrame, photos_dir, db: pd.DataFrame, zone: str, db_root, build_dir,
                 n_candidates: int = 6, confirm_m: float = CONFIRM_M):
        if not len(queries):
            raise RelabelError("no query photos to review (is every 'keep' false?)")
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
        self.queries = queries.reset_index(drop=True)
        self.photos_dir, self.db_root = Path(photos_dir), Path(db_root)
        for what, p in (("photos folder", self.photos_dir), ("database root", self.db_root)):
            if not p.is_dir():
                raise FileNotFoundError(f"{p}: {what} not found")
        self.db, self.zone = db, zone
        self._zone_number, self._zone_letter = int(zone[:-1]), zone[-1].upper()
        self._db_xy = db[["east", "north"]].to_numpy(np.float64)
        # distances by pipeline.geodesy (right across zones); the table's east/north are in
        # its common zone, lat/lon place the images of other zones
        self._db_pos = geodesy.from_utm(self._db_xy[:, 0], self._db_xy[:, 1], [zone] * len(db),
                                        db.lat.to_numpy(np.float64), db.lon.to_numpy(np.float64))
        self._db_index = {n: i for i, n in enumerate(db.name)}
        self.n_candidates, self.confirm_m = int(n_candidates), float(confirm_m)
        self.dir = Path(build_dir) / "relabel"
        self.log_path, self.labels_path = self.dir / LOG_NAME, self.dir / LABELS_NAME
        self._row = {pid: i for i, pid in enumerate(self.queries.photo_id)}
        self._photo_files = {f for f in self.queries.file if _safe_rel(f)}
        unsafe = sorted(set(self.queries.file) - self._photo_files)
        if unsafe:
            logger.warning("%d photo paths are not plain relative paths and will not be served, e.g. %s",
                           len(unsafe), unsafe[:3])
        absent = [f for f in self._photo_files if not (self.photos_dir / f).is_file()]
        if absent:
            logger.warning("%d photos missing under %s, e.g. %s", len(absent), self.photos_dir, absent[:3])
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        repair_log(self.log_path)
        self.labels = write_labels(self.queries, self.log_path, self.labels_path)
        c = self.counts()
        logger.info("relabel: %d photos, %d reviewed; log %s", len(self.queries), len(self.queries) - c["unreviewed"],
                    self.log_path)

    # positions ---------------------------------------------------------------------
    def distances(self, lat: float, lon: float) -> np.ndarray | None:
        """Metres (:mod:`pipeline.geodesy`) from ``lat, lon`` to every database image (None
        without a position)."""
        if not (np.isfinite(lat) and np.isfinite(lon)):
            return None
        q = geodesy.from_latlon([lat], [lon])
        return geodesy.distance(q.take(np.zeros(len(self._db_pos), np.int64)), self._db_pos)

    def candidates(self, lat: float, lon: float, k: int) -> list[dict]:
        d = self.distances(lat, lon)
        if d is None:
            return []
        k = max(1, min(int(k), len(d), MAX_CANDIDATES))
        idx = np.argpartition(d, k - 1)[:k] if k < len(d) else np.arange(len(d))
        idx = idx[np.lexsort((idx, d[idx]))]
        return [{"rank": r + 1, "name": self.db.name.iloc[i], "url": "/db/" + quote(self.db.name.iloc[i], safe="/@"),
                 "lat": float(self.db.lat.iloc[i]), "lon": float(self.db.lon.iloc[i]),
                 "distance_m": round(float(d[i]), 2)} for r, i in enumerate(idx)]

    # views -------------------------------------------------------------------------
    def counts(self) -> dict:
        vc = self.labels.status.value_counts()
        return {s: int(vc.get(s, 0)) for s in STATUSES}

    def next_unreviewed(self, after: int = -1) -> int | None:
        """Index of the first unreviewed photo after ``after`` (wrapping round), or None."""
        todo = np.flatnonzero(self.labels.status.to_numpy() == "unreviewed")
        if not len(todo):
            return None
        later = todo[todo > after]
        return int(later[0] if len(later) else todo[0])

    def state(self, after: int = -1) -> dict:
        c = self.counts()
        total = len(self.labels)
        return {"total": total, "reviewed": total - c["unreviewed"], "counts": c,
                "next_unreviewed": self.next_unreviewed(after), "n_candidates": self.n_candidates,
                "confirm_m": self.confirm_m, "zone": self.zone}

    def query(self, index: int, k: int | None = None) -> dict:
        with self._lock:
            if not 0 <= index < len(self.labels):
                raise DecisionError(f"query index {index} out of range [0, {len(self.labels) - 1}]")
            r = self.labels.iloc[index]
            return {"index": int(index), "photo_id": r.photo_id, "file": r.file,
                    "url": "/photo/" + quote(r.file, safe="/@") if r.file in self._photo_files else "",
                    "lat": _num(r.lat), "lon": _num(r.lon), "orig_lat": _num(r.orig_lat), "orig_lon": _num(r.orig_lon),
                    "status": r.status, "db_name": r.db_name,
                    "candidates": self.candidates(r.lat, r.lon, k or self.n_candidates),
                    "state": self.state(index)}

    # decisions ---------------------------------------------------------------------
    def decide(self, payload) -> dict:
        """Apply one decision (``{"photo_id", "action": pick|enter|skip|reject, "db_name"
        | "lat", "lon"}``): log it durably, rebuild labels.csv, return the log entry,
        the new label and the index of the next unreviewed photo."""
        if not isinstance(payload, dict):
            raise DecisionError("the body must be a JSON object")
        pid = payload.get("photo_id")
        if not isinstance(pid, str) or pid not in self._row:
            raise DecisionError(f"unknown photo_id {pid!r}")
        action = payload.get("action")
        with self._lock:
            i = self._row[pid]
            cur = self.labels.iloc[i]
            old_lat, old_lon = float(cur.lat), float(cur.lon)
            new_lat, new_lon, db_name, warning = old_lat, old_lon, "", None
            if action == "pick":
                db_name = payload.get("db_name")
                if not isinstance(db_name, str) or db_name not in self._db_index:
                    raise DecisionError(f"db_name {db_name!r} is not an image of the database")
                j = self._db_index[db_name]
                d = self.distances(old_lat, old_lon)
                if d is not None and d[j] <= self.confirm_m and d[j] <= d.min() + TIE_M:
                    status = "confirmed"
                else:
                    status = "moved"
                    new_lat, new_lon = float(self.db.lat.iloc[j]), float(self.db.lon.iloc[j])
            elif action == "enter":
                new_lat = _parse_coord(payload.get("lat"), "latitude", -90.0, 90.0)
                new_lon = _parse_coord(payload.get("lon"), "longitude", -180.0, 180.0)
                if not -80.0 <= new_lat <= 84.0:
                    raise DecisionError(f"latitude {new_lat:g} is outside the UTM range [-80, 84]")
                status = "entered"
                nearest = float(self.distances(new_lat, new_lon).min())
                if nearest > 1000:
                    warning = (f"the entered position is {nearest / 1000:.1f} km from the nearest database image "
                               "(lat/lon swapped?); verify will drop it")
            elif action in ("skip", "reject"):
                status = {"skip": "skipped", "reject": "rejected"}[action]
            else:
                raise DecisionError(f"action {action!r} not one of pick, enter, skip, reject")
            moved = None
            if status in ("moved", "entered") and np.isfinite(old_lat) and np.isfinite(old_lon):
                a, b = geodesy.from_latlon([new_lat], [new_lon]), geodesy.from_latlon([old_lat], [old_lon])
                moved = round(float(geodesy.distance(a, b)[0]), 2)
            entry = {"timestamp": _utc_now(), "photo_id": pid, "action": status,
                     "old_lat": _num(old_lat), "old_lon": _num(old_lon),
                     "new_lat": _num(new_lat), "new_lon": _num(new_lon), "db_name": db_name, "moved_m": moved}
            append_entry(self.log_path, entry)  # durable from here on: the reply may say "saved"
            try:
                self.labels = write_labels(self.queries, self.log_path, self.labels_path)
            except OSError as e:
                logger.error("%s: not rewritten (%s); it is rebuilt from the log at the next start",
                             self.labels_path, e)
                self.labels = labels_table(self.queries, replay(self.log_path))
                warning = f"saved in the log, but labels.csv was not rewritten: {e}"
            logger.info("%s %s%s", pid, status, f" -> {db_name}" if db_name else "")
            r = self.labels.iloc[i]
            return {"ok": True, "entry": entry, "warning": warning,
                    "label": {"photo_id": pid, "lat": _num(r.lat), "lon": _num(r.lon), "status": r.status,
                              "db_name": r.db_name},
                    "next": self.next_unreviewed(i), "state": self.state(i)}

    # files -------------------------------------------------------------------------
    def file_for(self, kind: str, name: str) -> Path | None:
        """The file behind ``/photo/<name>`` or ``/db/<name>``: only names listed in the
        tables, only below the configured folder; None otherwise."""
        if not _safe_rel(name):
            return None
        if kind == "photo" and name in self._photo_files:
            return self.photos_dir / name
        if kind == "db" and name in self._db_index:
            return self.db_root / name
        return None


# ----------------------------------------------------------------------------- HTTP


class RelabelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, relabeller: Relabeller):
        self.relabeller = relabeller
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: RelabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: the decisions are logged by the relabeller
        logger.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str):
        self.close_connection = True  # a request body may be left unread
        self._json(status, {"ok": False, "error": message})

    def _host_ok(self) -> bool:
        """Bound to a loopback address, answer only requests naming it (no DNS rebinding)."""
        host, port = self.server.server_address[:2]
        if host not in ("127.0.0.1", "::1", "localhost"):
            return True
        allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        if self.headers.get("Host", "") in allowed:
            return True
        self._error(421, f"Host {self.headers.get('Host')!r} not served (use {self.server.url})")
        return False

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        rel: Relabeller = self.server.relabeller
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        path, qs = url.path, parse_qs(url.query)
        try:
            if path in ("/", "/index.html"):
                return self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
            if path == "/api/state":
                with rel._lock:
                    return self._json(200, rel.state(int(qs.get("after", ["-1"])[0])))
            if path.startswith("/api/query/"):
                k = int(qs["k"][0]) if "k" in qs else None
                return self._json(200, rel.query(int(path[len("/api/query/"):]), k))
            for kind in ("photo", "db"):
                prefix = f"/{kind}/"
                if path.startswith(prefix):
                    name = unquote(path[len(prefix):])
                    if not _safe_rel(name):
                        return self._error(403, f"refused path {name!r}")
                    f = rel.file_for(kind, name)
                    if f is None:
                        return self._error(404, f"{kind} {name!r} is not in the tables")
                    try:
                        data = f.read_bytes()
                    except OSError as e:
                        return self._error(404, f"{name}: cannot read ({e.strerror})")
                    ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                    return self._send(200, data, ctype, cache="max-age=600")
            return self._error(404, f"no such page {path!r}")
        except (DecisionError, ValueError) as e:
            return self._error(400, str(e))

    def do_POST(self):
        rel: Relabeller = self.server.relabeller
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/decision":
            return self._error(404, f"no such endpoint {self.path!r}")
        # JSON only: another web site cannot send that cross-origin without a CORS preflight,
        # which this server never grants
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            return self._error(415, "Content-Type must be application/json")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "Content-Length required")
        if not 0 < n <= MAX_BODY:
            return self._error(413 if n > MAX_BODY else 400, f"body of {n} bytes (1 to {MAX_BODY} accepted)")
        raw = self.rfile.read(n)
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(400, f"the body is not valid JSON ({e})")
        try:
            result = rel.decide(payload)
        except DecisionError as e:
            return self._error(400, str(e))
        except (OSError, RelabelError) as e:  # the log could not be written: the decision is not saved
            logger.error("decision not saved: %s", e)
            return self._error(500, f"decision NOT saved: {e}")
        return self._json(200, result)


def serve(queries_csv, photos_dir, db_root, db_table, build_dir, host: str = "127.0.0.1", port: int = 0,
          n_candidates: int = 6, positions_csv=None, confirm_m: float = CONFIRM_M) -> RelabelServer:
    """Load the inputs, replay the log, bind the server (not yet serving: call
    ``serve_forever()``, e.g. in a thread; ``shutdown()`` and ``server_close()`` stop it).
    ``port=0`` picks a free port; the URL is ``server.url``."""
    queries = load_queries(queries_csv, positions_csv)
    db, zone = load_database(db_table)
    rel = Relabeller(queries, photos_dir, db, zone, db_root, build_dir, n_candidates, confirm_m)
    server = RelabelServer((host, int(port)), rel)
    return server


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--queries", required=True, help="photos to review: CSV with photo_id, file (+ keep; + lat, lon "
                   "unless --positions), e.g. <build>/dedup.csv")
    p.add_argument("--positions", default=None, help="CSV with photo_id, lat, lon (e.g. <build>/collected/photos.csv)")
    p.add_argument("--photos", required=True, help="folder the 'file' column is relative to (<build>/collected)")
    p.add_argument("--db-root", required=True, help="dataset root of the database images")
    p.add_argument("--db-table", required=True, help="its index table (work/<dataset>/index/database.csv)")
    p.add_argument("--build", required=True, help="build folder: writes <build>/relabel/{log.jsonl,labels.csv}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    p.add_argument("--candidates", type=int, default=6, help="database images shown per photo (default 6)")
    p.add_argument("--confirm-m", type=float, default=CONFIRM_M,
                   help=f"picking the nearest database image within this many metres confirms the label "
                        f"(default {CONFIRM_M:g})")
    p.add_argument("--replay-only", action="store_true", help="rebuild labels.csv from the log and exit")
    return p


def run(a: argparse.Namespace) -> int:
    if a.replay_only:
        queries = load_queries(a.queries, a.positions)
        d = Path(a.build) / "relabel"
        labels = write_labels(queries, d / LOG_NAME, d / LABELS_NAME)
        print(json.dumps(labels.status.value_counts().to_dict(), sort_keys=True))
        return 0
    server = serve(a.queries, a.photos, a.db_root, a.db_table, a.build, a.host, a.port, a.candidates,
                   positions_csv=a.positions, confirm_m=a.confirm_m)
    print(f"relabel: open {server.url}  (Ctrl-C stops; decisions are saved as you go)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", flush=True)
    finally:
        server.server_close()
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m pipeline.nightset.relabel",
                                              description=__doc__.split("\n\n")[0]))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run(a)
    except (ValueError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 1


# ----------------------------------------------------------------------------- page
# Embedded (not a package-data file) so an installed package always has it.

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Relabel night photos</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{margin:0;font:14px system-ui,sans-serif;background:#15171a;color:#ddd}
 header{display:flex;gap:1.5em;align-items:center;padding:.5em 1em;background:#22252a;flex-wrap:wrap}
 header b{color:#fff} button{font:inherit;padding:.3em .8em;cursor:pointer;border-radius:4px;border:1px solid #555;
 background:#333;color:#eee} button:hover{background:#444} input{font:inherit;width:9em;background:#111;color:#eee;
 border:1px solid #555;padding:.25em} main{display:flex;gap:1em;padding:1em}
 #left{flex:0 0 42%} #query-img{width:100%;max-height:70vh;object-fit:contain;display:block;background:#000}
 #grid{flex:1;display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.6em;align-content:start}
 .candidate{background:#22252a;border:2px solid transparent;border-radius:4px;padding:4px;cursor:pointer}
 .candidate:hover{border-color:#6af} .candidate.chosen{border-color:#4c4} .candidate img{width:100%;display:block}
 .candidate .dist{display:flex;justify-content:space-between;font-size:13px;padding-top:2px}
 .key{color:#fc6;font-weight:bold} #message{min-height:1.3em;padding:0 1em;color:#f88} #message.ok{color:#8c8}
 #message.warn{color:#fc6} .status{padding:.1em .5em;border-radius:3px;background:#444}
 #done{padding:2em;display:none} .help{color:#999;font-size:12px} a{color:#8bf}
</style></head>
<body>
<header>
 <span id="progress">…</span><span id="position"></span>
 <span>Flickr id <b id="photo-id"></b> <span id="query-status" class="status"></span></span>
 <span id="query-label"></span>
 <span><button id="prev-btn" title="←">◀</button> <button id="next-btn" title="→">▶</button>
 <button id="next-unreviewed-btn" title="n">next unreviewed</button></span>
</header>
<div id="message"></div>
<main id="review">
 <div id="left">
  <img id="query-img" alt="query photo">
  <p><button id="skip-btn">skip <span class="key">s</span></button>
     <button id="reject-btn">reject <span class="key">x</span></button></p>
  <form id="enter-form"><label>lat <input id="lat" placeholder="37.7749" autocomplete="off"></label>
   <label>lon <input id="lon" placeholder="-122.4194" autocomplete="off"></label>
   <button id="enter-btn" type="submit">set position <span class="key">↵</span></button></form>
  <p class="help">click the database image showing the same place (or press its number) to move the label
   there; <span class="key">e</span> coordinates (a pasted "lat, lon" is split), <span class="key">m</span> more
   candidates, <span class="key">n</span> next unreviewed, <span class="key">←→</span> browse.
   <a id="map-link" target="_blank" rel="noopener">map</a></p>
 </div>
 <div id="grid"></div>
</main>
<div id="done"><h2>Every photo has been reviewed.</h2><p id="done-counts"></p>
 <p>Browse with ◀ ▶ to change a decision; labels.csv is up to date.</p></div>
<script>
"use strict";
let cur = null, total = 0, k = 0;
const $ = id => document.getElementById(id);
function msg(text, cls) { const m = $("message"); m.textContent = text || ""; m.className = cls || ""; }
async function api(url, body) {
  const opt = body ? {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)} : {};
  const r = await fetch(url, opt);
  let data; try { data = await r.json(); } catch (e) { data = {error: "bad reply (" + r.status + ")"}; }
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}
function fmt(x) { return x === null || x === undefined ? "–" : x.toFixed(6); }
function progress(s) {
  total = s.total;
  $("progress").textContent = s.reviewed + " of " + s.total + " reviewed";
  $("progress").dataset.reviewed = s.reviewed;
}
function showDone(s) {
  cur = null; document.body.dataset.photo = "";
  $("review").style.display = "none"; $("done").style.display = "block";
  $("done-counts").textContent = Object.entries(s.counts).map(([a, n]) => a + ": " + n).join(", ");
  progress(s); document.body.dataset.ready = "1";
}
async function show(i, kk) {
  document.body.dataset.ready = "0";
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  k = kk || 0;
  const q = await api("/api/query/" + i + (k ? "?k=" + k : ""));
  cur = q; k = q.candidates.length;
  $("review").style.display = "flex"; $("done").style.display = "none";
  progress(q.state);
  $("position").textContent = "#" + (q.index + 1) + " / " + q.state.total;
  $("photo-id").textContent = q.photo_id; document.body.dataset.photo = q.photo_id;
  $("query-status").textContent = q.status + (q.db_name ? " → " + q.db_name.split("/").pop() : "");
  $("query-status").dataset.status = q.status;
  $("query-label").textContent = fmt(q.lat) + ", " + fmt(q.lon);
  $("map-link").href = q.lat === null ? "#" : "https://www.openstreetmap.org/?mlat=" + q.lat + "&mlon=" + q.lon + "#map=19/" + q.lat + "/" + q.lon;
  $("query-img").src = q.url; $("query-img").title = q.file;
  $("lat").value = ""; $("lon").value = "";
  const g = $("grid"); g.textContent = "";
  if (!q.candidates.length) g.textContent = "no position: enter coordinates";
  q.candidates.forEach((c, j) => {
    const d = document.createElement("div");
    d.className = "candidate" + (c.name === q.db_name ? " chosen" : "");
    d.dataset.name = c.name; d.dataset.rank = c.rank; d.title = c.name;
    const img = document.createElement("img"); img.src = c.url; img.alt = c.name; img.loading = "eager";
    const cap = document.createElement("div"); cap.className = "dist";
    const key = document.createElement("span"); key.className = "key"; key.textContent = j < 9 ? String(j + 1) : "";
    const m = document.createElement("span"); m.className = "metres"; m.textContent = c.distance_m.toFixed(1) + " m";
    cap.append(key, m); d.append(img, cap);
    d.addEventListener("click", () => decide({action: "pick", db_name: c.name}));
    g.append(d);
  });
  history.replaceState(null, "", "#" + q.index);
  document.body.dataset.ready = "1";
}
async function goNext(after) {
  const s = await api("/api/state?after=" + after);
  if (s.next_unreviewed === null) showDone(s); else await show(s.next_unreviewed);
}
async function decide(d) {
  if (!cur) return;
  d.photo_id = cur.photo_id;
  try {
    const r = await api("/api/decision", d);
    msg(cur.photo_id + ": " + r.entry.action + (r.entry.db_name ? " → " + r.entry.db_name.split("/").pop() : "") +
        (r.warning ? " — " + r.warning : ""), r.warning ? "warn" : "ok");
    if (r.next === null) showDone(r.state); else await show(r.next);
  } catch (e) { msg(e.message, "error"); }
}
function enterCoords() {
  let lat = $("lat").value.trim(), lon = $("lon").value.trim();
  if (lat.includes(",") && !lon) { [lat, lon] = lat.split(",", 2).map(s => s.trim()); }
  decide({action: "enter", lat: lat, lon: lon});
}
$("enter-form").addEventListener("submit", e => { e.preventDefault(); enterCoords(); });
$("skip-btn").onclick = () => decide({action: "skip"});
$("reject-btn").onclick = () => decide({action: "reject"});
$("prev-btn").onclick = () => show(cur ? (cur.index - 1 + total) % total : total - 1).catch(e => msg(e.message, "error"));
$("next-btn").onclick = () => show(cur ? (cur.index + 1) % total : 0).catch(e => msg(e.message, "error"));
$("next-unreviewed-btn").onclick = () => goNext(cur ? cur.index : -1).catch(e => msg(e.message, "error"));
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") { if (e.key === "Escape") e.target.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= 9 && cur && cur.candidates[n - 1]) decide({action: "pick", db_name: cur.candidates[n - 1].name});
  else if (e.key === "s") decide({action: "skip"});
  else if (e.key === "x") decide({action: "reject"});
  else if (e.key === "e") { e.preventDefault(); $("lat").focus(); }
  else if (e.key === "m" && cur) show(cur.index, k * 2);
  else if (e.key === "n") $("next-unreviewed-btn").click();
  else if (e.key === "ArrowLeft") $("prev-btn").click();
  else if (e.key === "ArrowRight") $("next-btn").click();
});
(async () => {
  try {
    const h = parseInt(location.hash.slice(1), 10);
    const s = await api("/api/state");
    total = s.total;
    if (h >= 0 && h < s.total) await show(h); else await goNext(-1);
  } catch (e) { msg(e.message, "error"); }
})();
</script>
</body></html>
"""


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"nightset-relabel": (add_arguments, run)}


if __name__ == "__main__":
    sys.exit(main())
