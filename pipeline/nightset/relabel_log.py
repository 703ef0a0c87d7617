"""Relabel's decision log and its replay into ``labels.csv``, and the review state.

Holds the inputs (:func:`load_queries`: the photos to review; :func:`load_database`: the
database index table and its UTM zone), the log and its replay, and :class:`Relabeller`,
the review state behind the web page (candidate database images nearest a label,
decisions), usable without HTTP. The stage and its CLI are in
:mod:`pipeline.nightset.relabel`; the server and the page in
:mod:`pipeline.nightset.relabel_server`.

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
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import posixpath
import threading
from pathlib import Path
from urllib.parse import quote

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
