"""Photos for the night set's classifiers: decoding with the capture hour, the photos table, labels.

- :class:`Photo`, :func:`read_photo` (a downscaled RGB image with its EXIF hour;
  :class:`~pipeline.images.ImageReadError` names an unreadable file),
  :func:`read_many` (threads; unreadable files give None and a message);
- :func:`parse_hour`, :func:`exif_hour`: the hour of day of an EXIF or ISO date-time;
- :func:`read_photos_table`: ``<build>/collected/photos.csv`` (the collect stage's output);
- :func:`read_labels`: a labelled-images CSV (``file``, ``label``) for fitting and training
  (:mod:`pipeline.nightset.stats_models`, :mod:`pipeline.nightset.mobilenet`).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..images import ImageReadError

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
    except Exception:  # noqa: BLE001 - broken EXIF blocks are common; the date is optional
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


def read_many(paths, max_side: int = 512, desc: str = "read",
              workers: int = 2) -> tuple[list[Photo | None], list[str]]:
    """Read photos (:func:`read_photo`) in threads; unreadable ones give None and an error message."""
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


# --------------------------------------------------------------------------- photos table


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


# --------------------------------------------------------------------------- labels

_KNOWN_POSITIVE = {frozenset({"0", "1"}): "1", frozenset({"false", "true"}): "true",
                   frozenset({"day", "night"}): "night", frozenset({"indoor", "outdoor"}): "outdoor"}


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

