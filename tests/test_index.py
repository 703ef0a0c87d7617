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


def plain_named_dataset(root, tmp_path):
    """The tiny dataset renamed to IMG_*.jpg, with its positions in a lat/lon CSV."""
    import utm

    from pipeline.datasets.names import parse_name

    rows = []
    for split in ("database", "queries"):
        for i, f in enumerate(sorted((root / split).iterdir())):
            p = parse_name(f.name)
            lat, lon = utm.to_latlon(p.east, p.north, p.zone, p.letter)
            new = f.with_name(f"IMG_{i:04d}.jpg")
            f.rename(new)
            rows.append({"name": f"{split}/{new.name}", "lat": lat, "lon": lon})
    csv = tmp_path / "positions.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_positions_from_csv(tiny_dataset, tmp_path):
    csv = plain_named_dataset(tiny_dataset, tmp_path)
    summary = index_dataset(tiny_dataset, tmp_path / "index", positions=csv)
    assert summary["counts"] == {"database": 12, "queries": 4} and summary["zone"] == "10S"
    db = read_table(tmp_path / "index" / "database.csv")
    assert db.name[0] == "database/IMG_0000.jpg"
    assert db.east[0] == pytest.approx(550000.0, abs=0.01) and db.east[11] == pytest.approx(550110.0, abs=0.01)


def test_positions_csv_problems_are_named(tiny_dataset, tmp_path):
    csv = plain_named_dataset(tiny_dataset, tmp_path)
    df = pd.read_csv(csv)
    df[df.name != "queries/IMG_0002.jpg"].to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="queries/IMG_0002.jpg' has no row in the positions CSV"):
        index_dataset(tiny_dataset, tmp_path / "index", positions=csv)
    df[["name", "lat"]].to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="needs lat/lon or east/north/zone"):
        index_dataset(tiny_dataset, tmp_path / "index", positions=csv)


def test_evaluation_with_index_positions(tiny_dataset, tmp_path):
    import numpy as np

    from pipeline.datasets.names import BadNameError
    from pipeline.evaluate import evaluate_topk, index_positions
    from pipeline.topk import TopK

    csv = plain_named_dataset(tiny_dataset, tmp_path)
    index_dataset(tiny_dataset, tmp_path / "index", positions=csv)
    positions = index_positions(tmp_path / "index")
    db = read_table(tmp_path / "index" / "database.csv").name.tolist()
    queries = read_table(tmp_path / "index" / "queries.csv").name.tolist()
    # query j sits 2.2 m from database image 3j: rank it second, behind a far image
    cands = [[db[(3 * j + 6) % 12], db[3 * j]] for j in range(4)]
    topk = TopK(queries, cands, np.zeros((4, 2)), np.zeros((4, 2)))
    r = evaluate_topk(topk, 25.0, (1, 2), positions)
    assert r["R@1"] == 0.0 and r["R@2"] == 100.0
    with pytest.raises(BadNameError, match="not in the dataset's index tables"):
        evaluate_topk(TopK(["queries/other.jpg"], [cands[0]], [[0, 0]], [[0, 0]]), 25.0, (1,), positions)
