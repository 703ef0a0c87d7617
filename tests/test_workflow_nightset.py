"""The night query set workflow end to end: a mock Flickr serves photos of a generated area
(night shots of the synthetic streets, day shots, a duplicate, a far-away shot, an indoor
shot); Snakemake collects, filters, de-duplicates, replays the (empty) relabel log,
verifies, and the main pipeline evaluates the resulting query set."""

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import utm
import yaml
from PIL import Image

from pipeline.datasets.names import parse_name
from pipeline.datasets.synthetic import generate
from pipeline.nightset.classify import build_classifier
from pipeline.nightset.photos import read_photo
from pipeline.nightset.stats_models import fit_stats_csv

from .nightset_images import make_labelled_images, render_room
from .nightset_mock import mock_flickr
from .test_workflow import job_counts, snakemake

SYN = {"n_streets": 2, "street_length": 80.0, "n_queries": 10, "image_size": [160, 120], "seed": 3}


def _jpeg(arr_or_path) -> bytes:
    im = Image.open(arr_or_path) if isinstance(arr_or_path, (str, os.PathLike)) else Image.fromarray(arr_or_path)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _photo(pid, lat, lon, minute):
    return {"id": str(pid), "latitude": round(lat, 6), "longitude": round(lon, 6), "accuracy": 16,
            "owner": f"u{pid % 3}", "datetaken": f"2021-01-01 22:{minute:02d}:00", "title": f"photo {pid}"}


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    wd = tmp_path_factory.mktemp("nightset")
    root = wd / "data" / "syn"
    generate(root, SYN)
    queries = sorted((root / "queries").glob("*.jpg"))
    database = sorted((root / "database").glob("*.jpg"))
    photos, images, expect = [], {}, {}
    for i, q in enumerate(queries):  # the night shots, at their true positions
        p = parse_name(q.name)
        photos.append(_photo(2000 + i, p.lat, p.lon, i))
        images[str(2000 + i)] = _jpeg(q)
    # the duplicate and the far-away shot copy the night shot the configured filter is surest
    # to keep (this test is about the stages after it; the classifiers' accuracy is measured
    # in tests/test_nightset_filter.py)
    labelled = make_labelled_images(wd / "labelled", n_day=20, n_night=20, seed=11)
    df = pd.read_csv(labelled)
    pd.DataFrame({"file": df.file, "label": df.night}).to_csv(wd / "labelled" / "night.csv", index=False)
    fit_stats_csv("daynight_stats", wd / "labelled" / "night.csv", wd / "night_fitted.json")
    shots = [read_photo(q) for q in queries]
    keep = (build_classifier(str(wd / "night_fitted.json")).predict(shots)
            * build_classifier("outdoor_stats").predict(shots))
    best = int(np.argmax(keep))
    dark = queries[best]
    src = parse_name(dark.name)
    first = parse_name(queries[0].name)
    # a near-identical re-upload, 2 m away, a minute later
    lat, lon = utm.to_latlon(src.east + 2.0, src.north, src.zone, src.letter)
    photos.append(_photo(2100, lat, lon, 59))
    images["2100"] = _jpeg(np.asarray(Image.open(dark).convert("RGB"))[:, 1:])
    # the same kind of shot placed 400 m away from any database image
    lat, lon = utm.to_latlon(src.east + 400.0, src.north + 400.0, src.zone, src.letter)
    photos.append(_photo(2200, lat, lon, 30))
    images["2200"] = _jpeg(np.asarray(Image.open(dark).convert("RGB"))[:, ::-1])  # mirrored
    # day shots (database images) and an indoor night shot: filtered out
    for j, d in enumerate(database[:3]):
        p = parse_name(d.name)
        photos.append(_photo(2300 + j, p.lat, p.lon, 40 + j))
        images[str(2300 + j)] = _jpeg(d)
    photos.append(_photo(2400, first.lat, first.lon, 50))
    images["2400"] = _jpeg(render_room(np.random.default_rng(0), size=(160, 120), night=True))
    lats = [float(p["latitude"]) for p in photos]
    lons = [float(p["longitude"]) for p in photos]
    bbox = [min(lons) - 1e-3, min(lats) - 1e-3, max(lons) + 1e-3, max(lats) + 1e-3]
    expect = {"collected": len(photos), "night_shots": len(queries), "dup_of": str(2000 + best)}
    return wd, root, photos, images, bbox, expect


@pytest.fixture(scope="module")
def built(area):
    wd, _root, photos, images, bbox, expect = area
    with mock_flickr(photos, images) as (base_url, state):
        config = {
            "datasets": {"syn": {"root": "data/syn", "synthetic": SYN}, "syn_flickr_night": {"nightset": "toy"}},
            "nightsets": {"toy": {"database": "syn", "bbox": bbox, "threshold_m": 25,
                                  "collect": {"base_url": base_url, "rate": 0, "per_page": 5},
                                  "filter": {"night": "night_fitted.json"}}},
            "global_methods": {"vlad_sift": {
                "model": {"name": "vlad", "local": {"name": "sift", "max_keypoints": 500}, "n_clusters": 16, "dim": 32},
                "extraction": {"device": "cpu", "num_workers": 0, "batch_size": 8}}},
            "retrieval": {"k": 10},
            "evaluation": {"recall_at": [1, 5, 10]},
        }
        (wd / "config.yaml").write_text(yaml.safe_dump(config))
        os.environ["FLICKR_API_KEY"] = "test-key"
        try:
            code, out = snakemake(wd, "results/syn_flickr_night/vlad_sift.csv")
        finally:
            os.environ.pop("FLICKR_API_KEY", None)
        served = dict(state.image_served)
    assert code == 0, out
    return wd, out, served, expect


def test_every_stage_ran_and_counts_add_up(built):
    wd, _out, served, expect = built
    build = wd / "work" / "nightsets" / "toy"
    counts = json.loads((build / "dataset" / "counts.json").read_text())
    assert counts["collected"] == expect["collected"]
    assert all(v == 1 for v in served.values()) and len(served) == expect["collected"]  # each image once
    filtered = pd.read_csv(build / "filtered.csv", dtype={"photo_id": str}).set_index("photo_id")
    # day shots and the indoor shot are dropped; most night street shots are kept
    assert not filtered.loc[["2300", "2301", "2302", "2400"], "keep"].any()
    night = [str(2000 + i) for i in range(expect["night_shots"])]
    assert filtered.loc[night, "keep"].mean() >= 0.5, filtered
    assert filtered.loc[[expect["dup_of"], "2100", "2200"], "keep"].all(), filtered
    assert counts["filtered_kept"] == int(filtered.keep.sum())
    dedup = pd.read_csv(build / "dedup.csv", dtype={"photo_id": str}).set_index("photo_id")
    assert dedup.loc[[expect["dup_of"], "2100"], "keep"].sum() == 1  # the re-upload and its original: one kept
    assert counts["deduplicated_kept"] == int(filtered.keep.sum()) - 1
    assert counts["relabel_status"] == {"unreviewed": counts["deduplicated_kept"]}
    # verification drops the shot 400 m from every database image, keeps the others
    verified = pd.read_csv(build / "dataset" / "verified.csv", dtype={"photo_id": str}).set_index("photo_id")
    assert verified.loc["2200", "reason"] == "no database image within 25 m"
    assert counts["no_database_within_threshold"] == 1
    assert counts["verified_queries"] == counts["deduplicated_kept"] - 1
    assert (verified[verified.kept].nearest_db_m <= 25).all()


def test_the_query_set_is_evaluated_by_the_main_pipeline(built):
    wd, _out, _, _expect = built
    counts = json.loads((wd / "work" / "nightsets" / "toy" / "dataset" / "counts.json").read_text())
    q = sorted((wd / "work" / "nightsets" / "toy" / "dataset" / "queries").iterdir())
    assert len(q) == counts["verified_queries"] and all("flickr_" in p.name for p in q)
    df = pd.read_csv(wd / "results" / "syn_flickr_night" / "vlad_sift.csv")
    assert df.n_queries.iloc[0] == counts["verified_queries"]
    assert 0 <= df["R@1"].iloc[0] <= df["R@10"].iloc[0] <= 100


def test_rerun_is_a_noop_and_a_relabel_decision_reruns_only_what_follows(built):
    wd, _, _, _ = built
    code, out = snakemake(wd, "-n", "results/syn_flickr_night/vlad_sift.csv")
    assert code == 0 and "Nothing to be done" in out, out
    log = wd / "work" / "nightsets" / "toy" / "relabel" / "log.jsonl"
    labels = pd.read_csv(wd / "work" / "nightsets" / "toy" / "relabel" / "labels.csv", dtype={"photo_id": str})
    r = labels.iloc[0]
    entry = {"timestamp": "2026-01-01T00:00:00", "photo_id": r.photo_id, "action": "reject",
             "old_lat": r.lat, "old_lon": r.lon, "new_lat": r.lat, "new_lon": r.lon, "db_name": None, "moved_m": 0.0}
    log.write_text(json.dumps(entry) + "\n")
    code, out = snakemake(wd, "-n", "work/nightsets/toy/dataset/counts.json")
    assert code == 0, out
    counts = job_counts(out)
    assert counts.get("nightset_labels") == 1 and counts.get("nightset_verify") == 1, counts
    assert "nightset_collect" not in counts and "nightset_filter" not in counts, counts
