"""Parse and write VG-benchmark image names.

The visual geo-localization benchmark (gmberton/VPR-datasets-downloader) stores
each image's position in its file name::

    @UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@pano_id@tile_num
    @heading@pitch@roll@height@timestamp@note@.jpg

Only the first six fields are required here; the remaining ones may be empty.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class BadNameError(ValueError):
    """A file name that does not follow the VG benchmark format."""


@dataclass(frozen=True)
class Position:
    """The position encoded in a VG image name."""

    east: float
    north: float
    zone: int
    letter: str
    lat: float
    lon: float

    @property
    def zone_id(self) -> str:
        return f"{self.zone}{self.letter}"


def _field_float(value: str, what: str, name: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise BadNameError(f"{name!r}: {what} field {value!r} is not a number") from None
    if not math.isfinite(out):
        raise BadNameError(f"{name!r}: {what} field {value!r} is not finite")
    return out


def parse_name(path: str | os.PathLike | bytes) -> Position:
    """Return the position encoded in a VG image name (a path or bare name).

    Raises :class:`BadNameError` naming the file and the problem when the name is
    not in the ``@east@north@zone@letter@lat@lon@...`` format.
    """
    if isinstance(path, bytes):
        path = path.decode()
    name = os.path.basename(os.fspath(path))
    fields = name.split("@")
    if len(fields) < 7 or fields[0] != "":
        raise BadNameError(
            f"{name!r}: expected a VG benchmark name "
            "'@UTM_east@UTM_north@zone@letter@lat@lon@...', "
            f"found {len(fields) - 1} '@' separators"
        )
    east = _field_float(fields[1], "UTM_east", name)
    north = _field_float(fields[2], "UTM_north", name)
    try:
        zone = int(fields[3])
    except ValueError:
        raise BadNameError(f"{name!r}: UTM zone field {fields[3]!r} is not an integer") from None
    if not 1 <= zone <= 60:
        raise BadNameError(f"{name!r}: UTM zone {zone} is outside 1..60")
    letter = fields[4].upper()
    if len(letter) != 1 or letter not in "CDEFGHJKLMNPQRSTUVWX":
        raise BadNameError(f"{name!r}: UTM zone letter {fields[4]!r} is not a valid band letter")
    lat = _field_float(fields[5], "latitude", name) if fields[5] else math.nan
    lon = _field_float(fields[6], "longitude", name) if fields[6] else math.nan
    if not (math.isnan(lat) or -90 <= lat <= 90):
        raise BadNameError(f"{name!r}: latitude {lat} is outside [-90, 90]")
    if not (math.isnan(lon) or -180 <= lon <= 180):
        raise BadNameError(f"{name!r}: longitude {lon} is outside [-180, 180]")
    return Position(east, north, zone, letter, lat, lon)


def format_name(
    east: float,
    north: float,
    zone: int,
    letter: str,
    lat: float,
    lon: float,
    pano_id: str = "",
    tile_num: str = "",
    heading: float | str = "",
    pitch: float | str = "",
    roll: str = "",
    height: str = "",
    timestamp: str = "",
    note: str = "",
    extension: str = ".jpg",
) -> str:
    """Build a VG benchmark image name (the inverse of :func:`parse_name`)."""

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    for field in (pano_id, tile_num, roll, height, timestamp, note):
        if "@" in str(field):
            raise ValueError(f"field {field!r} may not contain '@'")
    return (
        f"@{east:010.2f}@{north:010.2f}@{zone}@{letter}@{lat:.6f}@{lon:.6f}"
        f"@{pano_id}@{tile_num}@{fmt(heading)}@{fmt(pitch)}@{roll}@{height}"
        f"@{timestamp}@{note}@{extension}"
    )


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
