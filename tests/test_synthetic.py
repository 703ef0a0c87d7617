"""Tests of the synthetic VG dataset generator (small conf: the file runs in seconds)."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import utm

from pipeline.datasets.names import parse_name
from pipeline.datasets.synthetic import DEFAULT_CONF, generate, main

SMALL = {
    "n_streets": 2,
    "street_length": 60.0,
    "db_spacing": 10.0,
    "n_queries": 6,
    "image_size": [96, 72],
    "pixels_per_metre": 10,
    "seed": 3,
}


def _images(root, sub):
    return sorted(os.listdir(os.path.join(root, sub)))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "demo")
    summary = generate(root, SMALL)
    return root, summary


def test_layout_and_counts(small_root):
    root, summary = small_root
    assert summary["created"] is True
    db, q = _images(root, "database"), _images(root, "queries")
    assert len(db) == summary["counts"]["database"] > 0
    assert len(q) == summary["counts"]["queries"] == SMALL["n_queries"]
    # 2 headings per position, positions every db_spacing along each street
    assert len(db) % len(DEFAULT_CONF["db_headings"]) == 0
    assert os.path.isfile(os.path.join(root, "README.txt"))
    with open(os.path.join(root, "synthetic.json")) as fh:
        stored = json.load(fh)
    assert stored["conf"] == summary["conf"]
    assert stored["conf"]["seed"] == SMALL["seed"]
    assert stored["counts"] == summary["counts"]
    assert str(SMALL["seed"]) in open(os.path.join(root, "README.txt")).read()
    assert not [e for e in os.listdir(os.path.dirname(root)) if ".partial-" in e]


def test_names_parse_and_latlon_agree(small_root):
    root, _ = small_root
    for sub in ("database", "queries"):
        for name in _images(root, sub):
            p = parse_name(name)
            assert (p.zone, p.letter) == (DEFAULT_CONF["utm_zone"], DEFAULT_CONF["utm_letter"])
            east, north, zone, letter = utm.from_latlon(p.lat, p.lon)
            assert (zone, letter) == (p.zone, p.letter)
            assert np.hypot(east - p.east, north - p.north) < 1.0, name


def test_every_query_has_a_positive(small_root):
    root, _ = small_root
    db = np.array([[parse_name(n).east, parse_name(n).north] for n in _images(root, "database")])
    q = np.array([[parse_name(n).east, parse_name(n).north] for n in _images(root, "queries")])
    d = np.linalg.norm(q[:, None] - db[None], axis=2).min(1)
    assert (d <= 25.0).all()
    assert (d > 0.01).all()  # queries are not on the database grid


def test_images_readable_with_size(small_root):
    root, _ = small_root
    for sub in ("database", "queries"):
        for name in _images(root, sub):
            img = cv2.imread(os.path.join(root, sub, name))
            assert img is not None, name
            assert img.shape == (72, 96, 3)
            assert img.std() > 5  # not blank


def test_night_queries_are_darker(small_root):
    root, _ = small_root
    db = np.mean([cv2.imread(os.path.join(root, "database", n)).mean() for n in _images(root, "database")])
    q = np.mean([cv2.imread(os.path.join(root, "queries", n)).mean() for n in _images(root, "queries")])
    assert q < 0.8 * db


def test_deterministic(small_root, tmp_path):
    root, _ = small_root
    other = str(tmp_path / "again")
    generate(other, SMALL)
    for sub in ("database", "queries"):
        names = _images(root, sub)
        assert names == _images(other, sub)
        for name in names:
            a = cv2.imread(os.path.join(root, sub, name)).astype(int)
            b = cv2.imread(os.path.join(other, sub, name)).astype(int)
            assert np.abs(a - b).max() <= 2, name


def test_other_seed_differs(small_root, tmp_path):
    root, _ = small_root
    other = str(tmp_path / "seed4")
    generate(other, dict(SMALL, seed=4, n_streets=1))
    assert set(_images(other, "queries")).isdisjoint(_images(root, "queries"))


def test_unknown_key_raises(tmp_path):
    with pytest.raises(ValueError, match="no_such_key"):
        generate(str(tmp_path / "x"), {"no_such_key": 1})
    assert not os.path.exists(tmp_path / "x")


def test_rerun_is_noop(small_root):
    root, _ = small_root
    before = {n: os.stat(os.path.join(root, "database", n)).st_mtime_ns for n in _images(root, "database")}
    summary = generate(root, dict(SMALL, image_size=(96, 72)))  # tuples compare equal to lists
    assert summary["created"] is False
    after = {n: os.stat(os.path.join(root, "database", n)).st_mtime_ns for n in _images(root, "database")}
    assert before == after


def test_differing_conf_raises(small_root):
    root, _ = small_root
    with pytest.raises(FileExistsError, match="remove it"):
        generate(root, dict(SMALL, n_queries=7))


def test_incomplete_root_raises(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="remove it"):
        generate(str(root), SMALL)


def test_cli_noop_on_complete_root(small_root, capsys):
    root, summary = small_root
    conf = {k: v for k, v in SMALL.items() if k not in ("seed", "n_queries", "image_size")}
    rc = main(["--root", root, "--seed", str(SMALL["seed"]), "--n-queries", str(SMALL["n_queries"]),
               "--image-size", "96", "72", "--conf", json.dumps(conf), "-q"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["created"] is False
    assert out["counts"] == summary["counts"]


def test_empty_existing_root_is_filled(tmp_path):
    # Snakemake creates the output's folder before the job runs
    root = tmp_path / "made_by_snakemake"
    root.mkdir()
    summary = generate(root, SMALL)
    assert summary["created"] is True and (root / "synthetic.json").exists()
