"""UTM positions: bring positions from several UTM zones into one metric frame."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import utm

logger = logging.getLogger(__name__)


class MixedZoneError(ValueError):
    """Positions span several UTM zones and cannot be brought into one frame."""


def common_zone_positions(
    east: np.ndarray,
    north: np.ndarray,
    zones: list[str] | np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    zone: str | None = None,
    what: str = "positions",
) -> tuple[np.ndarray, str]:
    """Return ``[N, 2]`` east/north positions, all in one UTM zone, and that zone.

    When every position is in the same zone (the usual case) the UTM values are
    returned unchanged. Otherwise the positions outside the target zone (``zone``
    or the most frequent one) are re-projected from their latitude/longitude into
    it, so distances across a zone boundary stay metric. Positions in another zone
    without a latitude/longitude cannot be re-projected: that raises
    :class:`MixedZoneError` naming the zones.
    """
    east = np.asarray(east, dtype=np.float64)
    north = np.asarray(north, dtype=np.float64)
    zones = np.asarray(zones, dtype=object)
    xy = np.stack([east, north], axis=1) if len(east) else np.zeros((0, 2))
    counts = Counter(zones.tolist())
    if not counts:
        return xy, zone or ""
    target = zone or counts.most_common(1)[0][0]
    other = zones != target
    if not other.any():
        return xy, target
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    missing = other & (np.isnan(lat) | np.isnan(lon))
    if missing.any():
        raise MixedZoneError(
            f"{what} span UTM zones {dict(counts)} and {int(missing.sum())} of those outside "
            f"zone {target} have no latitude/longitude to re-project them; "
            "split the dataset by zone or add lat/lon to the names"
        )
    number = int(target[:-1])
    letter = target[-1]
    for i in np.flatnonzero(other):
        e, n, _, _ = utm.from_latlon(lat[i], lon[i], force_zone_number=number, force_zone_letter=letter)
        xy[i] = (e, n)
    logger.warning(
        "%s span UTM zones %s: re-projected %d positions into zone %s from their lat/lon",
        what, dict(counts), int(other.sum()), target,
    )
    return xy, target
