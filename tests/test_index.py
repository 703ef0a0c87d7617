import shutil

import pandas as pd
import pytest

from pipeline.datasets.index import DatasetError, index_dataset, read_table

from .conftest import make_dataset, vg_name


def test_index_tables(tiny_dataset, tmp_path):
    out = tmp_path / "index"
    summary = index_dataset(tiny_dataset, out)
    db, q = read_table(out / "database.csv"), read_table(out / "queries.csv")
    assert len(db) == 12 and len(q) == 4
    assert summary["counts"] == {"database": 12, "queries": 4} and summary["zone"] == "10S"
    assert db.name.str.startswith("database/").all()
    assert db.east.min() == pytest.approx(550000.0) and db.east.max() == pytest.approx(550110.0)
    assert set(db.width) == {128} and set(db.height) == {96}
    assert len(pd.read_csv(out / "skipped.csv")) == 0


def test_truncated_and_empty_images_are_skipped_and_listed(tiny_dataset, tmp_path):
    db = sorted((tiny_dataset / "database").iterdir())
    data = db[0].read_bytes()
    db[0].write_bytes(data[: len(data) // 2])  # truncated
    db[1].write_bytes(b"")  # empty
    db[2].write_bytes(b"garbage, not an image at all")
    out = tmp_path / "index"
    summary = index_dataset(tiny_dataset, out)
    assert summary["counts"]["database"] == 9 and summary["skipped"]["database"] == 3
    skipped = pd.read_csv(out / "skipped.csv")
    reasons = dict(zip(skipped.name.map(lambda n: n.split("/")[-1]), skipped.reason))
    assert "truncated" in reasons[db[0].name]
    assert reasons[db[1].name] == "empty file"
    assert "unreadable" in reasons[db[2].name]
    assert db[0].name not in set(read_table(out / "database.csv").name.map(lambda n: n.split("/")[-1]))


def test_bad_names_error_or_skip(tiny_dataset, tmp_path):
    src = next((tiny_dataset / "queries").iterdir())
    shutil.copy(src, tiny_dataset / "queries" / "IMG_0001.jpg")
    with pytest.raises(DatasetError, match="IMG_0001.jpg") as e:
        index_dataset(tiny_dataset, tmp_path / "a")
    assert "on_bad_name: skip" in str(e.value)
    summary = index_dataset(tiny_dataset, tmp_path / "b", on_bad_name="skip")
    assert summary["skipped"]["queries"] == 1
    assert "bad name" in pd.read_csv(tmp_path / "b" / "skipped.csv").reason[0]


def test_empty_or_missing_folders(tmp_path):
    root = make_dataset(tmp_path / "d")
    for f in (root / "queries").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="queries: no images"):
        index_dataset(root, tmp_path / "i")
    shutil.rmtree(root / "queries")
    with pytest.raises(DatasetError, match="folder not found"):
        index_dataset(root, tmp_path / "i")
    with pytest.raises(DatasetError, match="dataset folder not found"):
        index_dataset(tmp_path / "nowhere", tmp_path / "i")


def test_mixed_zones_handled(tiny_dataset, tmp_path):
    import utm

    # one database image given in zone 11 coordinates: re-projected into zone 10
    src = sorted((tiny_dataset / "database").iterdir())[0]
    lat, lon = utm.to_latlon(550000.0, 4180000.0, 10, "S")
    e11, n11, _, _ = utm.from_latlon(lat, lon, force_zone_number=11)
    shutil.move(src, tiny_dataset / "database" / vg_name(e11, n11, 11, "S", pano_id="z11"))
    summary = index_dataset(tiny_dataset, tmp_path / "i")
    assert summary["zone"] == "10S" and summary["zones"] == ["10S", "11S"]
    db = read_table(tmp_path / "i" / "database.csv")
    row = db[db.zone == "11S"].iloc[0]
    assert row.east == pytest.approx(550000.0, abs=0.5) and row.north == pytest.approx(4180000.0, abs=0.5)


def test_mixed_zones_without_latlon_refused(tiny_dataset, tmp_path):
    src = sorted((tiny_dataset / "database").iterdir())[0]
    shutil.move(src, tiny_dataset / "database" / "@0200000.00@4180000.00@11@S@@@x@.jpg")
    with pytest.raises(ValueError, match="UTM zones"):
        index_dataset(tiny_dataset, tmp_path / "i")
