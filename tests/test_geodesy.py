"""Ground-truth distances (pipeline.geodesy) against the WGS84 geodesic (pyproj's Geod).

Within one zone the distance is the VG benchmarks' UTM distance (so the thesis's recalls
stay exact); across zones, hemispheres, the antimeridian and near the poles it is the
geodesic (the ECEF chord, equal to it far below a millimetre at these ranges).
"""

from __future__ import annotations

import numpy as np
import pytest
import utm

from pipeline import geodesy
from pipeline.datasets.names import format_name
from pipeline.evaluate import candidate_distances, evaluate_topk
from pipeline.topk import TopK

pyproj = pytest.importorskip("pyproj", reason="pyproj (a test dependency) gives the reference geodesic")
GEOD = pyproj.Geod(ellps="WGS84")


def geodesic(a, b) -> float:
    return GEOD.inv(a[1], a[0], b[1], b[0])[2]


def offset(lat, lon, metres_east=0.0, metres_north=0.0):
    """The point ``metres_east`` / ``metres_north`` from (lat, lon) along the geodesic."""
    az = np.degrees(np.arctan2(metres_east, metres_north))
    lon2, lat2, _ = GEOD.fwd(lon, lat, az, float(np.hypot(metres_east, metres_north)))
    return lat2, lon2


def name_at(lat, lon, zone_number=None, letter=None):
    """A VG benchmark name of (lat, lon), in its own zone or one forced on it."""
    e, n, z, ltr = utm.from_latlon(lat, lon, force_zone_number=zone_number, force_zone_letter=letter)
    return format_name(e, n, z, ltr, lat, lon)


def dist_of_names(a: str, b: str) -> float:
    return float(candidate_distances(TopK([a], [[b]], [[0]], [[0.0]]))[0, 0])


CROSS = {  # pairs straddling a zone boundary, a hemisphere, the antimeridian, a special zone, a pole
    "zone 32/33 at 12 E (Venice's meridian band)": ((45.4371, 11.99995), 18.0, 0.0),
    "zone 30/31 at the Greenwich meridian (London)": ((51.4779, -0.00012), 18.0, 0.0),
    "zone 17/18 at 78 W": ((40.7, -78.00002), 20.0, 5.0),
    "zone 55/56 in the south (150 E, New South Wales)": ((-33.8, 149.99990), 20.0, -3.0),
    "the equator, both hemispheres": ((0.00005, 30.2), 3.0, -12.0),
    "the antimeridian (Fiji)": ((-16.5, 179.99990), 15.0, 2.0),
    "Norway's 32V edge at 3 E": ((60.0, 2.99990), 14.0, 0.0),
    "Svalbard's 33X/35X edge at 21 E": ((78.2, 20.99985), 20.0, 0.0),
    "beyond UTM, near the north pole": ((85.5, 40.0), 12.0, 9.0),
    "beyond UTM, near the south pole": ((-89.9, 120.0), 7.0, -20.0),
}


@pytest.mark.parametrize("case", CROSS, ids=list(CROSS))
def test_across_frames_equals_the_geodesic(case):
    (lat, lon), de, dn = CROSS[case]
    b = offset(lat, lon, de, dn)
    p = geodesy.from_latlon([lat, b[0]], [lon, b[1]])
    assert p.frame[0] != p.frame[1] or p.frame[0] == 0, p.frame  # the case crosses a frame
    d = float(geodesy.distance(p.take([0]), p.take([1]))[0])
    assert abs(d - geodesic((lat, lon), b)) < 1e-3, (d, geodesic((lat, lon), b))


def test_within_a_zone_is_utm_exactly_as_the_benchmarks():
    rng = np.random.default_rng(0)
    e = 550_000 + rng.uniform(-5000, 5000, 200)
    n = 4_180_000 + rng.uniform(-5000, 5000, 200)
    p = geodesy.from_utm(e, n, ["10S"] * 200)
    q = geodesy.from_utm(e[::-1], n[::-1], ["10S"] * 200)
    # exactly the values evaluation always gave (numpy's norm of the UTM differences)
    np.testing.assert_array_equal(geodesy.distance(p, q), np.linalg.norm(np.stack([e - e[::-1], n - n[::-1]], 1), axis=1))
    # and UTM is within its scale factor (0.9996 .. 1.001) of the geodesic
    a, b = utm.to_latlon(e[0], n[0], 10, "S"), utm.to_latlon(e[1], n[1], 10, "S")
    assert abs(float(geodesy.distance(p.take([0]), p.take([1]))[0]) / geodesic(a, b) - 1) < 1.1e-3


def test_bands_of_one_zone_are_one_zone():
    # 40 N separates bands S and T of zone 18: UTM northing is continuous across it
    lat, lon = 39.99995, -74.0
    b = offset(lat, lon, 3.0, 15.0)
    na, nb = name_at(lat, lon), name_at(*b)
    assert "@18@S@" in na and "@18@T@" in nb
    ea, ea_n = map(float, na.split("@")[1:3])
    eb, eb_n = map(float, nb.split("@")[1:3])
    assert dist_of_names(na, nb) == pytest.approx(np.hypot(ea - eb, ea_n - eb_n), abs=1e-9)
    assert abs(dist_of_names(na, nb) - geodesic((lat, lon), b)) < 0.02


def test_positions_forced_into_a_far_zone_are_measured_where_they_are():
    """Venice forced into New York's zone 18 (the commonest of a mixed dataset): 18 m
    stays 18 m (forced UTM reads 35 m)."""
    lat, lon = 45.4371, 12.3326
    b = offset(lat, lon, 18.0, 0.0)
    na, nb = name_at(lat, lon, 18, "T"), name_at(*b, 18, "T")
    assert abs(dist_of_names(na, nb) - 18.0) < 0.01
    # without lat/lon (a positions CSV of east/north/zone), the forced UTM values are all
    # there is: inverted, points forced into the next zone are still where they are
    # (London east of Greenwich, zone 31, forced into zone 30: 18 m, not 18.009)
    lat, lon = 51.5, 0.9
    b = offset(lat, lon, 18.0, 0.0)
    e, n = zip(*(utm.from_latlon(*x, force_zone_number=30, force_zone_letter="U")[:2] for x in ((lat, lon), b)))
    assert abs(np.hypot(e[0] - e[1], n[0] - n[1]) - 18.0) > 0.005
    p = geodesy.from_utm(e, n, ["30U", "30U"])
    assert p.frame.tolist() == [31, 31]
    native = [utm.from_latlon(*x)[:2] for x in ((lat, lon), b)]  # zone 31's own UTM (scale 0.99986 here)
    assert float(geodesy.distance(p.take([0]), p.take([1]))[0]) == pytest.approx(
        np.hypot(native[0][0] - native[1][0], native[0][1] - native[1][1]), abs=1e-4)


def test_mixed_city_dataset_recall():
    """10 New York and 4 Venice queries, each name in its own zone (18T, 33T). Nine New
    York queries and all Venice ones have their first candidate 12-20 m away; one New York
    query's is 40 m away. R@1 at 25 m is 13 / 14 = 92.9 (forcing Venice into zone 18
    stretched their 12-20 m past 25 m: 78.6)."""
    rng = np.random.default_rng(1)
    queries, cands = [], []
    cities = [(40.7128, -74.0060)] * 10 + [(45.4371, 12.3326)] * 4
    for i, (lat, lon) in enumerate(cities):
        lat, lon = offset(lat, lon, *rng.uniform(-2000, 2000, 2))
        d = 40.0 if i == 3 else rng.uniform(12, 20)
        far = offset(lat, lon, *rng.uniform(500, 900, 2))
        queries.append(name_at(lat, lon))
        cands.append([name_at(*offset(lat, lon, d * 0.6, d * 0.8)), name_at(*far)])
    topk = TopK(queries, cands, np.zeros((14, 2)), np.zeros((14, 2)))
    assert {n.split("@")[3] for n in queries} == {"18", "33"}
    r = evaluate_topk(topk, threshold=25.0, ns=(1, 2))
    assert round(r["R@1"], 1) == 92.9
    d = candidate_distances(topk)
    assert abs(d[12, 0] - geodesic(tuple(map(float, queries[12].split("@")[5:7])),
                                   tuple(map(float, cands[12][0].split("@")[5:7])))) < 0.05


def test_native_zone_numbers():
    lat = np.array([45.0, 45.0, 60.0, 60.0, 78.0, 78.0, 78.0, -33.9, 0.0, 0.0])
    lon = np.array([11.99, 12.01, 2.99, 3.01, 8.9, 9.1, 41.0, 151.2, 179.999, -180.0])
    assert geodesy.native_zone_number(lat, lon).tolist() == [32, 33, 31, 32, 31, 33, 37, 56, 60, 1]


def test_bad_zone_is_named():
    with pytest.raises(ValueError, match="bad UTM zone '1x1'"):
        geodesy.from_utm([500000.0], [4e6], ["1x1"])
