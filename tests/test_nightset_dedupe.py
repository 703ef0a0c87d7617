"""Dedupe stage of the night query set: near-identical shots grouped, distinct ones kept."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
import utm

from pipeline.datasets.names import parse_name
from pipeline.datasets.synthetic import generate
from pipeline.nightset import dedupe as D


def jitter(img: np.ndarray, rng, scale=1.0, shift=3, crop=0.02, quality=(60, 85)) -> np.ndarray:
    """A near-duplicate: shifted, slightly cropped, rescaled, brightness-changed, re-encoded."""
    h, w = img.shape[:2]
    dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, 2))
    c = rng.uniform(0, crop)
    x0, y0 = int(c * w) + max(dx, 0), int(c * h) + max(dy, 0)
    x1, y1 = w - int(c * w) + min(dx, 0), h - int(c * h) + min(dy, 0)
    out = cv2.resize(img[y0:y1, x0:x1], (round((x1 - x0) * scale), round((y1 - y0) * scale)),
                     interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.clip(out.astype(np.float32) * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
    _, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(*quality))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def offset(lat, lon, east_m, north_m):
    e, n, zone, letter = utm.from_latlon(lat, lon)
    return utm.to_latlon(e + east_m, n + north_m, zone, letter)


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    """Synthetic night street views along one street (many of them within 50 m of each other)."""
    root = tmp_path_factory.mktemp("syn") / "s"
    generate(root, {"seed": 5, "n_streets": 1, "street_length": 80.0, "n_queries": 24,
                    "image_size": [320, 240], "supersample": 1, "occluder_prob": 0.0})
    files = sorted((root / "queries").glob("*.jpg"))
    return [(cv2.imread(str(f)), parse_name(f.name)) for f in files]


@pytest.fixture
def build(tmp_path, queries):
    """A collected folder: the originals plus near-duplicates, a far copy, a re-framed burst shot."""
    col = tmp_path / "collected"
    (col / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []

    def add(pid, img, lat, lon, owner=None, when="2023-11-21 22:00:00"):
        owner = owner or f"owner_{pid}"
        cv2.imwrite(str(col / "images" / f"{pid}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows.append({"photo_id": pid, "file": f"images/{pid}.jpg", "lat": lat, "lon": lon, "accuracy": 16,
                     "datetaken": when, "owner": owner, "title": "", "url": "", "license": ""})

    for k, (img, pos) in enumerate(queries):
        add(f"q{k:02d}", img, pos.lat, pos.lon, owner=f"o{k}", when=f"2023-11-21 22:{k:02d}:00")
    # q00: a bigger re-upload 8 m away (kept: more pixels); q01: a smaller one 20 m away
    add("d00", jitter(queries[0][0], rng, scale=1.5), *offset(queries[0][1].lat, queries[0][1].lon, 8, 0),
        when="2023-11-22 10:00:00")
    add("d01", jitter(queries[1][0], rng, scale=0.6), *offset(queries[1][1].lat, queries[1][1].lon, 0, -20))
    # q02: two more copies nearby: a group of three
    add("d02a", jitter(queries[2][0], rng), *offset(queries[2][1].lat, queries[2][1].lon, 3, 3))
    add("d02b", jitter(queries[2][0], rng, scale=0.8), *offset(queries[2][1].lat, queries[2][1].lon, -5, 10))
    # q03: the same image 2 km away: a different place, kept
    add("far03", jitter(queries[3][0], rng), *offset(queries[3][1].lat, queries[3][1].lon, 2000, 0))
    # q04: re-framed shot of its owner 2 s later (too different for the image rule)
    add("burst04", jitter(queries[4][0], rng, shift=40, crop=0.12), queries[4][1].lat, queries[4][1].lon,
        owner="o4", when="2023-11-21 22:04:02")
    table = pd.DataFrame(rows)
    table.to_csv(col / "photos.csv", index=False)
    return col, table


def _read(path):
    out = pd.read_csv(path, dtype={"photo_id": str, "duplicate_of": str, "reason": str})
    out["duplicate_of"] = out.duplicate_of.fillna("")
    out["reason"] = out.reason.fillna("")
    return out.set_index("photo_id")


def test_dedupe_groups_near_duplicates(build, tmp_path):
    col, table = build
    out = tmp_path / "dedup.csv"
    summary = D.dedupe(col, out)
    d = _read(out)
    assert list(d.reset_index().columns[:6]) == ["photo_id", "file", "keep", "duplicate_of", "similarity",
                                                 "distance_m"]
    assert d.index.tolist() == table.photo_id.tolist() and (d.file == table.set_index("photo_id").file).all()
    # near-duplicates: one kept per group, the one with most pixels
    assert d.loc["d00", "keep"] and not d.loc["q00", "keep"] and d.loc["q00", "duplicate_of"] == "d00"
    assert d.loc["q01", "keep"] and d.loc["d01", "duplicate_of"] == "q01"
    assert d.loc["q02", "keep"] and (d.loc[["d02a", "d02b"], "duplicate_of"] == "q02").all()
    assert d.loc["q02", "group_size"] == 3 and d.loc["d02a", "group"] == d.loc["q02", "group"]
    dups = d[d.duplicate_of != ""]
    assert set(dups.index) == {"q00", "d01", "d02a", "d02b"}
    assert (dups.similarity >= 0.92).all() and (dups.distance_m <= 50).all()
    assert dups.loc["d01", "distance_m"] == pytest.approx(20, abs=0.5)
    assert (dups.reason == "duplicate").all()
    # the same image far away and distinct views nearby are all kept
    assert d.loc["far03", "keep"] and d.loc["q03", "keep"] and d.loc["far03", "group_size"] == 1
    assert d.loc["burst04", "keep"] and d.loc["q04", "keep"]  # burst rule is off by default
    originals = d.loc[[p for p in d.index if p.startswith("q") and p != "q00"]]
    assert originals.keep.all()
    assert summary["removed"] == 4 and summary["kept"] == len(d) - 4 and summary["groups_with_duplicates"] == 3


def test_margins_of_the_fixture(build):
    """The distinct views really are nearby and alike-ish, the copies alike: the test means something."""
    col, table = build
    model = D.build_descriptor({"name": "thumb_grad"})
    from pipeline.nightset.photos import read_photo

    desc = {p: model.describe([read_photo(col / f, 256).image])[0] for p, f in zip(table.photo_id, table.file)}
    t = table.set_index("photo_id")
    q = [p for p in t.index if p.startswith("q")]
    close = [(a, b) for i, a in enumerate(q) for b in q[i + 1:]
             if D.haversine_m(t.lat[a], t.lon[a], t.lat[b], t.lon[b]) <= 50]
    assert len(close) >= 30  # many distinct views within the distance limit
    assert max(float(desc[a] @ desc[b]) for a, b in close) < 0.92
    assert float(desc["q03"] @ desc["far03"]) >= 0.92  # kept apart by distance only
    print("burst pair similarity", float(desc["q04"] @ desc["burst04"]))
    assert 0.7 <= float(desc["q04"] @ desc["burst04"]) < 0.92  # only the burst rule joins these


def test_burst_rule_and_prefer_earliest(build, tmp_path):
    col, _ = build
    out = tmp_path / "dedup.csv"
    s = D.dedupe(col, out, conf={"burst_seconds": 5, "prefer": "earliest"})
    d = _read(out)
    assert d.loc["q04", "keep"] and d.loc["burst04", "duplicate_of"] == "q04"  # q04 is 2 s earlier
    assert d.loc["q00", "keep"] and d.loc["d00", "duplicate_of"] == "q00"  # d00 was taken a day later
    assert s["burst_pairs"] == 1


def test_filtered_rows_and_bad_images(build, tmp_path):
    col, table = build
    # photo without a position and an unreadable one
    photos = pd.read_csv(col / "photos.csv", dtype={"photo_id": str})
    extra = pd.DataFrame([{**photos.iloc[5].to_dict(), "photo_id": "nopos", "lat": None, "lon": None},
                          {**photos.iloc[5].to_dict(), "photo_id": "broken", "file": "images/broken.jpg"}])
    (col / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    pd.concat([photos, extra]).to_csv(col / "photos.csv", index=False)
    filtered = pd.DataFrame({"photo_id": list(table.photo_id) + ["nopos", "broken"], "keep": True})
    filtered.loc[filtered.photo_id.isin(["d00", "q07"]), "keep"] = False
    filtered.to_csv(tmp_path / "filtered.csv", index=False)
    out = tmp_path / "dedup.csv"
    s = D.dedupe(col / "photos.csv", out, tmp_path / "filtered.csv")
    d = _read(out)
    assert "d00" not in d.index and "q07" not in d.index and d.loc["q00", "keep"]  # d00 filtered out
    assert not d.loc["broken", "keep"] and d.loc["broken", "reason"].startswith("unreadable:")
    assert "broken.jpg" in d.loc["broken", "reason"]
    # nopos is a copy of q05 but has no position: kept (only the burst rule could join it)
    assert d.loc["nopos", "keep"] and d.loc["q05", "keep"]
    assert s["no_position"] == 1 and s["unreadable"] == 1
    # CLI
    assert D.main(["-q", "--src", str(col), "--filtered", str(tmp_path / "filtered.csv"), "--out",
                   str(tmp_path / "cli.csv"), "--max-distance", "10"]) == 0
    c = _read(tmp_path / "cli.csv")
    assert c.loc["d01", "keep"]  # 20 m from q01: beyond 10 m


def test_bad_inputs(build, tmp_path):
    col, _ = build
    pd.DataFrame({"photo_id": ["zzz"], "keep": [True]}).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(ValueError, match=r"f.csv: photo_id\(s\) \['zzz'\] are not in"):
        D.dedupe(col, tmp_path / "o.csv", tmp_path / "f.csv")
    pd.DataFrame({"photo_id": ["q00"], "keep": ["maybe"]}).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(ValueError, match="keep must be true/false"):
        D.dedupe(col, tmp_path / "o.csv", tmp_path / "f.csv")
    with pytest.raises(ValueError, match="dedupe: unknown option 'sim'"):
        D.dedupe(col, tmp_path / "o.csv", conf={"sim": 0.5})
    with pytest.raises(ValueError, match="thumb_grad: unknown option 'size'"):
        D.dedupe(col, tmp_path / "o.csv", conf={"descriptor": {"name": "thumb_grad", "size": 8}})
    with pytest.raises(ValueError, match="unknown dedupe descriptor"):
        D.dedupe(col, tmp_path / "o.csv", conf={"descriptor": {"name": "dinov2"}})
    nolat = tmp_path / "p.csv"
    pd.DataFrame({"photo_id": ["1"], "file": ["a.jpg"]}).to_csv(nolat, index=False)
    with pytest.raises(ValueError, match=r"p.csv: missing column\(s\) \['lat', 'lon'\]"):
        D.dedupe(nolat, tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    n = 1500
    lat = 37.77 + rng.uniform(-0.02, 0.02, n)  # about 4.4 km x 3.5 km
    lon = -122.42 + rng.uniform(-0.02, 0.02, n)
    lat[:50] = 37.77 + rng.uniform(-2e-4, 2e-4, 50)  # a dense spot
    lon[:50] = -122.42 + rng.uniform(-2e-4, 2e-4, 50)
    lat[60] = np.nan
    got = set()
    for i, j, d in D.near_pairs(lat, lon, 100.0):
        assert (i < j).all() and (d <= 100).all()
        got |= set(zip(i.tolist(), j.tolist()))
    full = D.haversine_m(lat[:, None], lon[:, None], lat[None], lon[None])
    ii, jj = np.nonzero(np.triu(full <= 100, 1))
    assert got == set(zip(ii.tolist(), jj.tolist()))
    assert len(got) < n * 20  # far fewer than n^2 / 2 pairs were produced


def test_near_pairs_across_the_antimeridian():
    lat = np.array([0.0, 0.0, 0.0])
    lon = np.array([179.9999, -179.9999, 10.0])
    pairs = [(int(i), int(j)) for a, b, _ in D.near_pairs(lat, lon, 50.0) for i, j in zip(a, b)]
    assert pairs == [(0, 1)]
    assert D.haversine_m(0.0, 179.9999, 0.0, -179.9999) == pytest.approx(2 * math.pi * 6371008.8 * 0.0002 / 360,
                                                                       rel=1e-3)


def test_global_descriptor_plugin(build, tmp_path):
    """Any pipeline.global_features model can be the descriptor (random CosPlace weights here)."""
    col, table = build
    conf = {"descriptor": {"name": "global", "device": "cpu",
                           "model": {"name": "cosplace", "backbone": "ResNet18", "fc_output_dim": 32,
                                     "resize": [64, 64]}},
            "sim_threshold": 0.9999}
    s = D.dedupe(col, tmp_path / "dedup.csv", conf=conf)
    d = _read(tmp_path / "dedup.csv")
    assert len(d) == len(table) and s["conf"]["descriptor"]["name"] == "global"
    with pytest.raises(ValueError, match="needs 'model'"):
        D.build_descriptor({"name": "global"})
