"""Global extraction: stores, shards, corrupt images, resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pipeline.extract_global as eg
from pipeline.datasets.index import index_dataset, read_table
from pipeline.extract_global import extract_global, fit_global
from pipeline.global_store import GlobalStore, num_shards, shard_range
from pipeline.gather import gather_stores
from pipeline.retrieval import build_index, choose_factory, search

from .conftest import REPO, make_dataset

VLAD_SIFT = {"name": "vlad", "local": {"name": "sift", "max_keypoints": 300}, "n_clusters": 8, "dim": 8, "fit_images": 12}


@pytest.fixture
def indexed(tiny_dataset, tmp_path):
    index_dataset(tiny_dataset, tmp_path / "index")
    fit = tmp_path / "fit.pt"
    fit_global(VLAD_SIFT, tiny_dataset, tmp_path / "index" / "database.csv", fit, device="cpu")
    return tiny_dataset, tmp_path / "index", fit


def names_of(index_dir, split):
    return read_table(index_dir / f"{split}.csv").name.tolist()


def test_shard_ranges():
    assert num_shards(10, 4) == 3 and num_shards(0, 4) == 1
    assert [shard_range(10, 4, i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="out of range"):
        shard_range(10, 4, 3)


def test_extract_store_and_retrieval(indexed, tmp_path):
    root, index_dir, fit = indexed
    db = names_of(index_dir, "database")
    # two shards of the database, one store of queries
    shards = []
    for i in range(num_shards(len(db), 5)):
        a, b = shard_range(len(db), 5, i)
        out = tmp_path / f"db_{i}.zarr"
        extract_global(VLAD_SIFT, root, db[a:b], out, fit_state=fit, batch_size=2, chunk_size=3, device="cpu")
        shards.append(out)
    s = GlobalStore(shards[0])
    desc, valid = s.read()
    assert desc.shape == (5, 8) and valid.all()
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-5)
    assert s.names == db[:5]
    extract_global(VLAD_SIFT, root, names_of(index_dir, "queries"), tmp_path / "q.zarr", fit_state=fit, device="cpu")
    # gathered into one store (chunks that straddle the shards), as the workflow does
    attrs = gather_stores(shards, tmp_path / "database.zarr", chunk_rows=4, progress=False)
    assert attrs["n"] == 12 and attrs["n_valid"] == 12 and len(attrs["shards"]) == 3
    gathered = GlobalStore(tmp_path / "database.zarr")
    assert gathered.names == db and gathered.chunk_rows == 4
    np.testing.assert_array_equal(gathered.read()[0], np.concatenate([GlobalStore(p).read()[0] for p in shards]))
    info = build_index(tmp_path / "database.zarr", tmp_path / "faiss.index")
    assert info["factory"] == "Flat" and info["n"] == 12
    topk = search(tmp_path / "faiss.index", tmp_path / "q.zarr", tmp_path / "topk.h5", k=5,
                  database=tmp_path / "database.zarr")
    assert topk.k == 5 and len(topk) == 4
    assert np.all(np.diff(topk.distances, axis=1) >= 0)
    # the queries are darkened copies of database images 0, 3, 6, 9 (rows in the sorted table)
    expected = [db.index(n) for n in sorted(db)]
    assert [int(topk.candidate_index[i, 0]) for i in range(4)] == [expected[0], expected[3], expected[6], expected[9]]


def test_corrupt_image_is_reported_not_fatal(indexed, tmp_path):
    root, index_dir, fit = indexed
    db = names_of(index_dir, "database")
    (root / db[2]).write_bytes((root / db[2]).read_bytes()[:300])  # truncated after indexing
    attrs = extract_global(VLAD_SIFT, root, db, tmp_path / "db.zarr", fit_state=fit, chunk_size=4, device="cpu")
    assert list(attrs["errors"]) == [db[2]] and attrs["n_valid"] == 11
    desc, valid = GlobalStore(tmp_path / "db.zarr").read()
    assert not valid[2] and valid.sum() == 11 and not desc[2].any()
    info = build_index([tmp_path / "db.zarr"], tmp_path / "faiss.index")
    assert info["invalid"] == [db[2]] and info["invalid_rows"] == [2] and info["n"] == 11


def test_resume_after_interruption_skips_finished_chunks(indexed, tmp_path, monkeypatch):
    root, index_dir, fit = indexed
    db = names_of(index_dir, "database")
    clean = extract_global(VLAD_SIFT, root, db, tmp_path / "clean.zarr", fit_state=fit, batch_size=2, chunk_size=4, device="cpu")
    assert clean["extracted_this_run"] == 12
    out = tmp_path / "db.zarr"
    calls = {"n": 0}
    real = eg.describe_batch

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # batches of 2: chunks 0 (4 images) done, chunk 1 half done
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(eg, "describe_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        extract_global(VLAD_SIFT, root, db, out, fit_state=fit, batch_size=2, chunk_size=4, device="cpu")
    assert not out.exists()  # no final store under the real name
    assert (tmp_path / "db.zarr.progress" / "chunk_000000").exists()
    monkeypatch.setattr(eg, "describe_batch", real)
    attrs = extract_global(VLAD_SIFT, root, db, out, fit_state=fit, batch_size=2, chunk_size=4, device="cpu")
    assert attrs["resumed_chunks"] == 1 and attrs["extracted_this_run"] == 8
    np.testing.assert_allclose(GlobalStore(out).read()[0], GlobalStore(tmp_path / "clean.zarr").read()[0], atol=1e-6)
    assert not (tmp_path / "db.zarr.partial").exists() and not (tmp_path / "db.zarr.progress").exists()
    # a finished store is never recomputed
    assert extract_global(VLAD_SIFT, root, db, out, fit_state=fit, device="cpu")["extracted_this_run"] == 8


def test_resume_after_sigkill(tmp_path):
    """Kill -9 a real extraction process mid-way; the rerun finishes only what is left."""
    root = make_dataset(tmp_path / "d", n_db=160, n_q=1, size=(64, 96))
    index_dataset(root, tmp_path / "index")
    fit = tmp_path / "fit.pt"
    fit_global(VLAD_SIFT, root, tmp_path / "index" / "database.csv", fit, device="cpu")
    out = tmp_path / "db.zarr"
    conf = '{"model": %s, "extraction": {"batch_size": 2, "chunk_size": 8, "device": "cpu", "num_workers": 0}}' % (
        __import__("json").dumps(VLAD_SIFT)
    )
    cmd = [sys.executable, "-m", "pipeline", "--threads", "1", "extract-global", "--conf", conf, "--root", str(root),
           "--table", str(tmp_path / "index" / "database.csv"), "--out", str(out), "--fit-state", str(fit)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "db.zarr.progress"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(progress.glob("chunk_*"))) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(progress.glob("chunk_*")))
    assert 2 <= done < 20, "the process should have been killed mid-way"
    assert not out.exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    attrs = GlobalStore(out).attrs
    assert attrs["resumed_chunks"] >= done and attrs["extracted_this_run"] == 160 - 8 * attrs["resumed_chunks"]
    assert GlobalStore(out).read()[1].all()


def test_choose_factory():
    assert choose_factory(1000, 512) == "Flat"
    assert choose_factory(2_800_000, 512).startswith("IVF") and "PQ64" in choose_factory(2_800_000, 512)
    assert choose_factory(10, 512, "HNSW32") == "HNSW32"


def test_unfitted_model_refused(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="must be fitted"):
        extract_global(VLAD_SIFT, tiny_dataset, ["x.jpg"], tmp_path / "o.zarr", device="cpu")


def test_vlad_fit_does_not_depend_on_the_number_of_threads(tmp_path):
    """A cluster job (2 threads) and a laptop run (1 thread) fit the same codebook and PCA, so
    they give the same retrieval lists and recalls (the k-means and SVD run on one thread).
    On this set (the SLURM test's) the two fits differed before: the SLURM run's recalls
    then differed from the local run's."""
    import torch

    from pipeline.datasets.synthetic import generate

    root = tmp_path / "syn"
    generate(root, {"n_streets": 2, "street_length": 40.0, "n_queries": 8, "image_size": [160, 120], "seed": 1})
    index_dataset(root, tmp_path / "index")
    conf = {"name": "vlad", "local": {"name": "sift", "max_keypoints": 500}, "n_clusters": 16, "dim": 16}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fit_global(conf, root, tmp_path / "index" / "database.csv", tmp_path / f"fit_{threads}.pt", device="cpu")
    finally:
        torch.set_num_threads(before)
    a, b = (torch.load(tmp_path / f"fit_{t}.pt", weights_only=True) for t in (1, 2))
    for key in ("centroids", "pca_mean", "pca_proj"):
        assert torch.equal(a[key], b[key]), key
