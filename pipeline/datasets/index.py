"""Index a dataset in the VG benchmark layout once, into tables on disk.

A dataset root holds ``database/**`` and ``queries/**`` images whose names encode
their UTM position. Indexing walks both folders, parses every name, checks that
each image can be read (header and, for JPEG, the end-of-image marker), brings all
positions into one UTM zone and writes

- ``<out>/database.csv`` and ``<out>/queries.csv``: one row per usable image,
  columns ``name`` (path relative to the dataset root, the key used by every later
  stage), ``east``, ``north`` (metres, common zone), ``zone`` (the name's own zone),
  ``lat``, ``lon``, ``width``, ``height``;
- ``<out>/skipped.csv``: every image left out, with the reason;
- ``<out>/summary.json``: counts, the common zone, the options used.

Positions come from the VG names, or, for photos named otherwise, from a CSV
(``positions``) with a ``name`` column (path relative to the root) and either
``lat``/``lon`` (converted to UTM) or ``east``/``north``/``zone`` (e.g. ``10S``).

Bad names (or images missing from the positions CSV) are an error by default
(they would give wrong positions); unreadable or truncated images are skipped and
listed, never silently dropped.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..images import ImageReadError, image_size
from ..io import atomic_path, write_json
from .geo import common_zone_positions
from .names import BadNameError, Position, is_image_file, parse_name

logger = logging.getLogger(__name__)

SPLITS = ("database", "queries")
COLUMNS = ["name", "east", "north", "zone", "lat", "lon", "width", "height"]


class DatasetError(ValueError):
    """A dataset that cannot be indexed as it is."""


def list_images(root: Path, split: str) -> list[str]:
    """Image paths under ``root/split``, relative to ``root``, sorted."""
    base = root / split
    if not base.is_dir():
        raise DatasetError(f"{base}: folder not found (expected <root>/{split}/ with images)")
    out = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        out.extend(str(rel / f) for f in sorted(filenames) if is_image_file(f))
    if not out:
        raise DatasetError(f"{base}: no images (.jpg/.jpeg/.png) found")
    return out


def check_image(path: Path) -> tuple[int, int] | str:
    """Return ``(width, height)`` of a readable image, or the reason it is not."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        try:
            width, height, fmt = image_size(path)
        except ImageReadError as e:  # not an image, or over max_pixels (a decompression bomb)
            return str(e).removeprefix(f"{path}: ")
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(size - 64, 0))
                tail = f.read()
            # A complete JPEG ends with the EOI marker (some writers pad after it).
            if b"\xff\xd9" not in tail:
                return "truncated JPEG (no end-of-image marker)"
        return width, height
    except OSError as e:
        return f"unreadable image ({e})"


def read_positions(path) -> dict[str, Position]:
    """Positions by image name from a CSV (see the module docstring)."""
    import utm

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"name": str, "zone": str})
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the positions CSV ({e})") from None
    if "name" not in df.columns:
        raise DatasetError(f"{path}: positions CSV needs a 'name' column (found {list(df.columns)})")
    out = {}
    if {"east", "north", "zone"} <= set(df.columns):
        for r in df.itertuples():
            zone = str(r.zone).strip()
            if not (zone[:-1].isdigit() and zone[-1].isalpha()):
                raise DatasetError(f"{path}: row {r.name!r} has zone {zone!r}; expected e.g. '10S'")
            lat, lon = (float(r.lat), float(r.lon)) if "lat" in df.columns else (np.nan, np.nan)
            out[r.name] = Position(float(r.east), float(r.north), int(zone[:-1]), zone[-1].upper(), lat, lon)
    elif {"lat", "lon"} <= set(df.columns):
        for r in df.itertuples():
            try:
                e, n, zn, zl = utm.from_latlon(float(r.lat), float(r.lon))
            except (ValueError, utm.error.OutOfRangeError) as err:
                raise DatasetError(f"{path}: row {r.name!r}: {err}") from None
            out[r.name] = Position(float(e), float(n), int(zn), zl, float(r.lat), float(r.lon))
    else:
        raise DatasetError(f"{path}: positions CSV needs lat/lon or east/north/zone columns (found {list(df.columns)})")
    return out


def index_split(root: Path, split: str, on_bad_name: str = "error", workers: int = 8, positions=None):
    """Return ``(rows, skipped)`` for one split (``positions``: name -> Position, or None)."""
    names = list_images(root, split)
    rows, skipped, bad = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = pool.map(lambda n: check_image(root / n), names, chunksize=64)
        for name, check in tqdm(zip(names, checks), total=len(names), desc=f"index {split}", mininterval=2):
            try:
                if positions is None:
                    pos = parse_name(name)
                elif name in positions:
                    pos = positions[name]
                else:
                    raise BadNameError(f"{name!r} has no row in the positions CSV")
            except BadNameError as e:
                bad.append(f"{split}: {e}")
                skipped.append({"name": name, "split": split, "reason": f"bad name: {e}"})
                continue
            if isinstance(check, str):
                skipped.append({"name": name, "split": split, "reason": check})
                continue
            rows.append([name, pos.east, pos.north, pos.zone_id, pos.lat, pos.lon, *check])
    if bad and on_bad_name == "error":
        shown = "\n  ".join(bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(
            f"{root / split}: {len(bad)} images have no position:\n  {shown}{more}\n"
            "Rename them, or set on_bad_name: skip for this dataset to skip (and list) them."
        )
    if not rows:
        raise DatasetError(f"{root / split}: none of the {len(names)} images is usable (see the skipped list)")
    return rows, skipped


def index_dataset(root, out_dir, on_bad_name: str = "error", workers: int = 8, positions=None) -> dict:
    """Index ``root`` into ``out_dir`` (see the module docstring). Returns the summary."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    lookup = read_positions(positions) if positions else None
    tables, skipped = {}, []
    for split in SPLITS:
        rows, skip = index_split(root, split, on_bad_name, workers, lookup)
        tables[split] = pd.DataFrame(rows, columns=COLUMNS)
        skipped += skip
    both = pd.concat([tables[s] for s in SPLITS], ignore_index=True)
    xy, zone = common_zone_positions(
        both.east.values, both.north.values, both.zone.values, both.lat.values, both.lon.values,
        what=f"images of {root}",
    )
    start = 0
    for split in SPLITS:
        n = len(tables[split])
        tables[split]["east"] = xy[start : start + n, 0]
        tables[split]["north"] = xy[start : start + n, 1]
        start += n
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_table(tables[split], out_dir / f"{split}.csv")
    write_table(pd.DataFrame(skipped, columns=["name", "split", "reason"]), out_dir / "skipped.csv")
    summary = {
        "root": str(root),
        "zone": zone,
        "zones": sorted(set(both.zone)),
        "counts": {s: len(tables[s]) for s in SPLITS},
        "skipped": {s: sum(1 for r in skipped if r["split"] == s) for s in SPLITS},
        "on_bad_name": on_bad_name,
        "positions": str(positions) if positions else "names",
    }
    for row in skipped[:20]:
        logger.warning("skipped %s: %s", row["name"], row["reason"])
    if skipped:
        logger.warning("%d images skipped, listed in %s", len(skipped), out_dir / "skipped.csv")
    write_json(out_dir / "summary.json", summary)
    logger.info("indexed %s: %s", root, summary["counts"])
    return summary


def write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6f")


def read_table(path) -> pd.DataFrame:
    """Read an index table written by :func:`index_dataset`, checking its columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: index table not found; run the index stage first")
    df = pd.read_csv(path, dtype={"name": str, "zone": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: not an index table, columns {missing} missing")
    return df


def _index_arguments(p):
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--on-bad-name", choices=["error", "skip"], default="error")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--positions", default=None, help="CSV of name + lat/lon (or east/north/zone)")


def _index(a):
    index_dataset(a.root, a.out, a.on_bad_name, a.workers, a.positions)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"index": (_index_arguments, _index)}
