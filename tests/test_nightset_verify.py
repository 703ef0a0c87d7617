"""Verify stage: queries need a database image within the threshold; the output is a dataset."""

import json

import numpy as np
import pandas as pd
import pytest
import utm
from PIL import Image

from pipeline.datasets.index import index_dataset, read_table
from pipeline.evaluate import candidate_distances
from pipeline.nightset.verify import verify
from pipeline.topk import TopK

from .conftest import make_dataset


@pytest.fixture
def build(tmp_path):
    root = make_dataset(tmp_path / "ds", n_db=6, n_q=1)  # database every 10 m along east from 550000
    index_dataset(root, tmp_path / "index")
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    db = read_table(tmp_path / "index" / "database.csv")
    for i, (dx, status) in enumerate([(3.0, "moved"), (12.0, "confirmed"), (200.0, "entered"), (4.0, "rejected")]):
        Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)).save(photos / f"{i}.jpg")
        lat, lon = utm.to_latlon(db.east.iloc[0] + dx, db.north.iloc[0], 10, "S")
        rows.append({"photo_id": str(1000 + i), "file": f"{i}.jpg", "lat": lat, "lon": lon, "status": status})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, root


def test_verify_keeps_queries_near_the_database(build):
    tmp, root = build
    counts = verify(tmp / "labels.csv", tmp / "photos", root, tmp / "index", tmp / "out", 25.0, {"collected": 9})
    assert counts["verified_queries"] == 2 and counts["rejected"] == 1 and counts["no_database_within_threshold"] == 1
    assert counts["collected"] == 9
    assert json.loads((tmp / "out" / "counts.json").read_text()) == counts
    v = pd.read_csv(tmp / "out" / "verified.csv", dtype={"photo_id": str}).set_index("photo_id")
    assert list(v.kept) == [True, True, False, False]
    assert v.loc["1000", "nearest_db_m"] == pytest.approx(3.0, abs=0.05)
    assert v.loc["1002", "reason"] == "no database image within 25 m"
    # the output folder is a dataset: VG names with positions, the database linked
    index_dataset(tmp / "out", tmp / "out_index")
    q = read_table(tmp / "out_index" / "queries.csv")
    assert len(q) == 2 and len(read_table(tmp / "out_index" / "database.csv")) == 6
    t = TopK(q.name.to_numpy(), np.array([[read_table(tmp / "index" / "database.csv").name.iloc[0]]] * 2),
             np.zeros((2, 1), int), np.zeros((2, 1), np.float32), {})
    d = candidate_distances(t)
    assert d[0, 0] == pytest.approx(3.0, abs=0.05) and d[1, 0] == pytest.approx(12.0, abs=0.05)
    # a re-run replaces the queries folder
    verify(tmp / "labels.csv", tmp / "photos", root, tmp / "index", tmp / "out", 2.5)  # only the photo 2 m from db1
    assert len(list((tmp / "out" / "queries").iterdir())) == 1


def test_verify_names_a_missing_photo(build):
    tmp, root = build
    (tmp / "photos" / "0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="0.jpg: photo 1000"):
        verify(tmp / "labels.csv", tmp / "photos", root, tmp / "index", tmp / "out")
