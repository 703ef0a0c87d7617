"""Metres between the positions of geotagged images, right in every zone and hemisphere.

The rule (one implementation for evaluation, the night-set tools and the reports):

* two positions in the same UTM zone *number* and hemisphere (their native zone: the
  zone their longitude lies in, Norway's and Svalbard's exceptions included) are
  ``hypot(d_east, d_north)`` apart in that zone: the VG benchmarks' convention, so
  single-zone datasets (SF-XL, Tokyo, Pitts, ...) give exactly the recalls they always
  gave. Latitude bands of one zone (``18S``, ``18T``) are the same zone;
* any other pair is the straight-line (chord) distance between their Earth-centred
  (ECEF, WGS84, on the ellipsoid) coordinates, which equals the geodesic to well under a
  millimetre up to kilometres (the difference is ``d^3 / 24R^2``: 2e-11 m at 25 m), and
  has no zone edge, antimeridian or pole.

A position is read from its UTM values (east, north, zone number, band letter), which
fix its latitude/longitude exactly; positions that a dataset forced into another zone
(the index stage's common zone) are moved back to their native zone first, so a photo
far from the forced zone's meridian is not stretched (Venice in zone 18 reads 18 m as
32 m). Where only latitude/longitude are known, :func:`from_latlon` builds the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import utm

#: WGS84 semi-major axis (m) and flattening
A = 6378137.0
F = 1 / 298.257223563
E2 = F * (2 - F)


def ecef(lat, lon) -> np.ndarray:
    """``[N, 3]`` Earth-centred coordinates (m) of latitudes/longitudes (degrees) on the
    WGS84 ellipsoid (height 0)."""
    la, lo = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    n = A / np.sqrt(1 - E2 * np.sin(la) ** 2)
    return np.stack([n * np.cos(la) * np.cos(lo), n * np.cos(la) * np.sin(lo), n * (1 - E2) * np.sin(la)], -1)


def native_zone_number(lat, lon) -> np.ndarray:
    """The UTM zone number each position lies in (6 degree zones; Norway's 32V and
    Svalbard's 31X/33X/35X/37X exceptions), for arrays."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    lon = (lon + 180) % 360 - 180
    z = (np.floor((lon + 180) / 6).astype(np.int64) % 60) + 1
    z = np.where((lat >= 56) & (lat < 64) & (lon >= 3) & (lon < 12), 32, z)
    sv = (lat >= 72) & (lat <= 84) & (lon >= 0)
    z = np.where(sv & (lon < 9), 31, z)
    z = np.where(sv & (lon >= 9) & (lon < 21), 33, z)
    z = np.where(sv & (lon >= 21) & (lon < 33), 35, z)
    z = np.where(sv & (lon >= 33) & (lon < 42), 37, z)
    return z


@dataclass
class Positions:
    """Positions ready for :func:`distance`: UTM in the native zone (``xy [N, 2]``), the
    frame that UTM is valid in (``frame [N]``: zone number, negative in the south, 0
    beyond UTM's latitudes) and Earth-centred coordinates (``xyz [N, 3]``)."""

    xy: np.ndarray
    frame: np.ndarray
    xyz: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)

    def take(self, idx) -> Positions:
        return Positions(self.xy[idx], self.frame[idx], self.xyz[idx])


def from_latlon(lat, lon) -> Positions:
    """Positions from latitudes/longitudes (degrees). Beyond UTM's latitudes (84 N, 80 S)
    a position has no frame (``0``) and is always measured by the chord."""
    lat, lon = np.asarray(lat, np.float64).reshape(-1), np.asarray(lon, np.float64).reshape(-1)
    if np.isnan(lat).any() or np.isnan(lon).any():
        raise ValueError("positions need a latitude and longitude (NaN found)")
    if (np.abs(lat) > 90).any():
        raise ValueError(f"latitude out of range: {lat[np.abs(lat) > 90][:3]}")
    xy = np.full((len(lat), 2), np.nan)
    number = native_zone_number(lat, lon)
    north = lat >= 0
    polar = (lat > 84) | (lat < -80)
    for z in np.unique(number[~polar]):
        for hemi in (True, False):
            m = (number == z) & (north == hemi) & ~polar
            if m.any():
                e, n, _, _ = utm.from_latlon(lat[m], lon[m], force_zone_number=int(z), force_northern=bool(hemi))
                xy[m] = np.stack([e, n], 1)
    frame = np.where(polar, 0, np.where(north, number, -number))
    return Positions(xy, frame, ecef(lat, lon))


def from_utm(east, north, zones, lat=None, lon=None) -> Positions:
    """Positions from UTM values and zone ids (``"10S"``: number and band letter), in any
    mix of zones and hemispheres.

    A position given in its native zone keeps its UTM values exactly (its latitude and
    longitude follow from them). One given in another zone (a dataset's forced common
    zone) is placed by its ``lat``/``lon`` when known (far from a zone's meridian the
    forced UTM values are distorted), else by inverting the given UTM values.
    """
    east, north = np.asarray(east, np.float64).reshape(-1), np.asarray(north, np.float64).reshape(-1)
    zones = np.asarray(zones, dtype=str).reshape(-1)
    n_pos = len(east)
    if not n_pos:
        return Positions(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros((0, 3)))
    lat_u, lon_u = np.empty(n_pos), np.empty(n_pos)
    given = np.empty(n_pos, np.int64)  # the given frame: zone number, negative in the south
    for zid in np.unique(zones):
        m = zones == zid
        number, letter = _split_zone(zid)
        with np.errstate(all="ignore"):
            la, lo = utm.to_latlon(east[m], north[m], number, northern=bool(letter >= "N"), strict=False)
        lat_u[m], lon_u[m] = la, lo
        given[m] = number if letter >= "N" else -number
    lat_g = np.full(n_pos, np.nan) if lat is None else np.asarray(lat, np.float64).reshape(-1)
    lon_g = np.full(n_pos, np.nan) if lon is None else np.asarray(lon, np.float64).reshape(-1)
    known = np.isfinite(lat_g) & np.isfinite(lon_g)
    ref_lat, ref_lon = np.where(known, lat_g, lat_u), np.where(known, lon_g, lon_u)
    native = native_zone_number(ref_lat, ref_lon)
    in_native = given == np.where(ref_lat >= 0, native, -native)
    use_given = ~in_native & known
    out = from_latlon(np.where(use_given, lat_g, lat_u), np.where(use_given, lon_g, lon_u))
    # in the native zone: the given UTM values exactly (no round trip)
    keep = in_native & (out.frame == given)
    out.xy[keep] = np.stack([east, north], 1)[keep]
    return out


def _split_zone(zone_id: str) -> tuple[int, str]:
    z = str(zone_id).strip()
    if len(z) < 2 or not z[:-1].isdigit() or not z[-1].isalpha():
        raise ValueError(f"bad UTM zone {z!r} (expected a number and a band letter, e.g. '10S')")
    return int(z[:-1]), z[-1].upper()


def distance(a: Positions, b: Positions) -> np.ndarray:
    """Metres between ``a[i]`` and ``b[i]`` (same length), by the rule of the module doc."""
    same = (a.frame == b.frame) & (a.frame != 0)
    planar = np.linalg.norm(a.xy - b.xy, axis=-1)
    chord = np.linalg.norm(a.xyz - b.xyz, axis=-1)
    return np.where(same, planar, chord)


def nearest(queries: Positions, database: Positions, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest database position per query and its distance (m): exact, in
    chunks (memory ``chunk x len(database)``); ``(-1, inf)`` for an empty database."""
    if not len(database):
        return np.full(len(queries), -1), np.full(len(queries), np.inf)
    idx = np.empty(len(queries), np.int64)
    dist = np.empty(len(queries))
    for s in range(0, len(queries), chunk):
        q = queries.take(slice(s, s + chunk))
        # nearest by the chord (the rule's planar distances differ from it by 0.1 % at most)
        d = np.linalg.norm(q.xyz[:, None, :] - database.xyz[None], axis=2)
        best = d.argmin(1)
        idx[s:s + chunk] = best
        dist[s:s + chunk] = distance(q, database.take(best))
    return idx, dist
