"""Index options of pipeline.retrieval: flat IP (fp32/fp16), IVF-PQ, sharded exact search."""

import faiss
import numpy as np
import pytest
import zarr

from pipeline.retrieval import (
    ArraySource,
    ConcatSource,
    build_index,
    choose_factory,
    index_rows,
    make_index,
    metric_of,
    rescore_exact,
    search,
    search_chunks,
    sharded_search,
)
from pipeline.topk import read_topk


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n, d, seed):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def clustered(n, d, n_clusters, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    x = centres[rng.integers(n_clusters, size=n)] + spread * rng.standard_normal((n, d))
    return unit(x)


def brute_force(q, x, k):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def write_store(path, desc, valid=None, prefix="db"):
    """A descriptor store as extract_global writes it (only what GlobalStore reads)."""
    g = zarr.open_group(str(path), mode="w")
    n, d = desc.shape
    g.create_array("descriptors", shape=(n, d), chunks=(max(1, min(n, 64)), d), dtype="float32")[:] = desc
    g.create_array("valid", shape=(n,), chunks=(max(1, min(n, 64)),), dtype=bool)[:] = (
        np.ones(n, bool) if valid is None else valid)
    g.attrs["names"] = [f"{prefix}/{i:05d}.jpg" for i in range(n)]
    return path


@pytest.mark.parametrize("index, exact", [("flat", True), ("flat_fp16", False)])
def test_flat_ip_matches_brute_force(index, exact):
    x, q, k = random_unit(3000, 64, 0), random_unit(50, 64, 1), 10
    factory = choose_factory(len(x), 64, index)
    assert metric_of(factory) == faiss.METRIC_INNER_PRODUCT
    idx, valid = make_index([ArraySource(x)], factory, progress=False)
    assert idx.ntotal == 3000 and valid[0].all()
    D, I = idx.search(q, k)
    S, J = brute_force(q, x, k)
    np.testing.assert_allclose(D, S, atol=1e-5 if exact else 2e-3)
    if exact:
        assert (I == J).all()
    else:  # fp16 storage: the same neighbours but where two similarities are closer than fp16 resolution
        assert (I[:, 0] == J[:, 0]).mean() >= 0.98
        assert np.mean([len(set(a) & set(b)) / k for a, b in zip(I, J)]) >= 0.97


@pytest.mark.parametrize("chunk", [1000, 777, 5000])
def test_sharded_search_equals_single_flat_search(chunk):
    x, q, k = random_unit(4000, 32, 2), random_unit(64, 32, 3), 20
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    D, I = flat.search(q, k)
    chunks = ((a, x[a : a + chunk]) for a in range(0, len(x), chunk))
    Ds, Is = search_chunks(q, chunks, k)
    assert (Is == I).all()
    np.testing.assert_allclose(Ds, D, rtol=0, atol=1e-6)


def test_sharded_search_over_stores_and_invalid_rows(tmp_path):
    x, q, k = random_unit(900, 16, 4), random_unit(30, 16, 5), 15
    valid = np.ones(900, bool)
    valid[[3, 400, 899]] = False
    stores = [write_store(tmp_path / f"s{i}.zarr", x[a : a + 300], valid[a : a + 300], f"s{i}")
              for i, a in enumerate(range(0, 900, 300))]
    S, I = sharded_search(stores, q, k, chunk_size=128, query_batch=7)
    S0, J = brute_force(q, x[valid], k)
    assert (I == J).all()
    np.testing.assert_allclose(S, S0, atol=1e-5)


def test_ivfpq_recall_against_exact_on_clustered_data():
    x = clustered(10000, 64, 100, 1.0, 6)
    rng = np.random.default_rng(7)
    q = unit(x[rng.choice(len(x), 200, replace=False)] + 0.04 * rng.standard_normal((200, 64)))
    factory = choose_factory(len(x), 64, "ivfpq", nlist=32, m=16)
    assert factory == "IVF32,PQ16x8" and metric_of(factory) == faiss.METRIC_L2
    idx, _ = make_index([ArraySource(x[:4000]), ArraySource(x[4000:])], factory, train_size=10000, progress=False)
    _, J = brute_force(q, x, 10)
    recall = {}
    for nprobe in (1, 8):
        faiss.extract_index_ivf(idx).nprobe = nprobe
        _, I = idx.search(q, 10)
        recall[nprobe] = (np.mean(I[:, 0] == J[:, 0]),  # R@1: the exact nearest neighbour comes first
                          np.mean([J[i, 0] in I[i] for i in range(len(q))]),  # 1-R@10: ... is in the top 10
                          np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, J)]))  # 10-R@10: top-10 overlap
    # measured (faiss 1.15 CPU): nprobe 1: R@1 0.965, 1-R@10 0.965, 10-R@10 0.66; nprobe 8: 1.0, 1.0, 0.71
    r1, r10, overlap = recall[8]
    assert r1 >= 0.9 and r10 >= 0.95 and overlap >= 0.6, recall
    assert recall[8][2] >= recall[1][2]


@pytest.mark.parametrize("index", ["flat", "flat_fp16", "ivfpq", "sharded", "Flat"])
def test_build_from_several_stores_and_search(tmp_path, index):
    x = clustered(1200, 32, 20, 0.3, 9)
    valid = np.ones(1200, bool)
    valid[5] = False
    stores = [write_store(tmp_path / f"db{i}.zarr", x[a : a + 400], valid[a : a + 400], f"s{i}")
              for i, a in enumerate(range(0, 1200, 400))]
    qi = [0, 450, 1199, 801]
    write_store(tmp_path / "q.zarr", x[qi], prefix="q")
    info = build_index(stores, tmp_path / "faiss.index", index, nlist=16, m=8, train_size=1000, chunk_size=150)
    assert info["n"] == 1199 and info["invalid"] == ["s0/00005.jpg"]
    assert info["n_rows"] == 1200 and info["invalid_rows"] == [5]
    rows = index_rows(info)
    assert len(rows) == 1199 and rows[4] == 4 and rows[5] == 6 and rows[-1] == 1199
    if index != "sharded":
        assert faiss.read_index(str(tmp_path / "faiss.index")).ntotal == 1199
    with pytest.raises(ValueError, match="needs the database store"):
        search(tmp_path / "faiss.index", tmp_path / "q.zarr", tmp_path / "topk.h5", k=10)
    with pytest.raises(ValueError, match="rebuild the index"):
        search(tmp_path / "faiss.index", tmp_path / "q.zarr", tmp_path / "topk.h5", k=10, database=stores[:2])
    topk = search(tmp_path / "faiss.index", tmp_path / "q.zarr", tmp_path / "topk.h5", k=10, nprobe=16,
                  database=stores)
    # every query is a database vector: found first (exactly or nearly), at squared L2 ~ 0
    assert list(topk.candidate_index[:, 0]) == qi
    assert list(topk.candidate_names[:, 0]) == ["s0/00000.jpg", "s1/00050.jpg", "s2/00399.jpg", "s2/00001.jpg"]
    assert np.all(np.diff(topk.distances, axis=1) >= -1e-6)
    assert np.all(topk.distances >= 0) and np.all(topk.distances <= 4)
    if index != "ivfpq":  # squared L2 = 2 - 2 cos, exact
        cos = (x[qi][:, None] * x[topk.candidate_index]).sum(-1)
        np.testing.assert_allclose(1 - topk.distances / 2, cos, atol=2e-3 if index == "flat_fp16" else 1e-5)
    assert read_topk(tmp_path / "topk.h5").meta["index"] == info["factory"]


def test_choose_factory_options():
    assert choose_factory(1000, 512) == "Flat"
    assert choose_factory(2_800_000, 512) == "IVF8192,PQ64x8"
    assert choose_factory(2_800_000, 512, "ivfpq", nlist=4096, m=32, nbits=8) == "IVF4096,PQ32x8"
    assert choose_factory(10, 512, "flat_fp16") == "SQfp16"
    assert choose_factory(10, 512, "HNSW32") == "HNSW32"
    with pytest.raises(ValueError, match="divide"):
        choose_factory(10, 100, "ivfpq", m=3)


def test_rescore_exact_reranks_candidates_by_true_similarity(tmp_path):
    x = random_unit(1000, 16, 3)
    stores = [write_store(tmp_path / "a.zarr", x[:300]), write_store(tmp_path / "b.zarr", x[300:])]
    db = ConcatSource(stores)
    assert db.chunk_rows == 64 and len(db) == 1000
    q = random_unit(20, 16, 4)
    rng = np.random.default_rng(5)
    cand = np.stack([rng.choice(1000, 30, replace=False) for _ in range(20)])
    cand[0, 3] = -1  # the index gave fewer candidates for this query
    S, R = rescore_exact(db, q, cand, 8, pair_batch=17)
    for i in range(20):
        c = cand[i][cand[i] >= 0]
        s = x[c] @ q[i]
        best = np.argsort(-s, kind="stable")[:8]
        assert list(R[i]) == list(c[best])
        np.testing.assert_allclose(S[i], s[best], atol=1e-5)


def test_search_with_rescoring_recovers_the_exact_order(tmp_path):
    """IVF-PQ alone mis-orders close neighbours; re-scoring 4 x k candidates exactly puts them right."""
    x = clustered(6000, 32, 40, 1.0, 11)
    store = write_store(tmp_path / "db.zarr", x)
    qi = np.random.default_rng(12).choice(6000, 50, replace=False)
    q = unit(x[qi] + 0.05 * np.random.default_rng(13).standard_normal((50, 32)))
    write_store(tmp_path / "q.zarr", q, prefix="q")
    build_index([store], tmp_path / "ivf.index", "ivfpq", nlist=16, m=8, train_size=6000)
    _, J = brute_force(q, x, 10)
    overlap = {}
    for rescore in (0, 4):
        t = search(tmp_path / "ivf.index", tmp_path / "q.zarr", tmp_path / f"t{rescore}.h5", k=10, nprobe=16,
                   database=[store], rescore=rescore)
        assert t.meta["rescored"] == (40 if rescore else 0)
        overlap[rescore] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(t.candidate_index, J)])
        if rescore:  # exact similarities of what it returns, best first
            cos = (q[:, None] * x[t.candidate_index]).sum(-1)
            np.testing.assert_allclose(1 - t.distances / 2, cos, atol=1e-5)
            assert np.all(np.diff(t.distances, axis=1) >= 0)
    # PQ8 (8 bytes a vector) orders neighbours poorly; exact re-scoring of its top 40 nearly restores them
    assert overlap[0] < 0.8 and overlap[4] >= 0.95, overlap  # measured: 0.69 and 0.98


def test_concat_source_names_and_rows(tmp_path):
    x = random_unit(130, 8, 1)
    db = ConcatSource([write_store(tmp_path / "a.zarr", x[:70], prefix="a"),
                       write_store(tmp_path / "b.zarr", x[70:], prefix="b")])
    assert list(db.names_at(np.array([[69, 70], [0, 129]])).ravel()) == ["a/00069.jpg", "b/00000.jpg",
                                                                          "a/00000.jpg", "b/00059.jpg"]
    d, _ = db.read(60, 80)
    np.testing.assert_array_equal(d, x[60:80])
    d, _ = db.read_rows(np.array([5, 69, 70, 128]))
    np.testing.assert_array_equal(d, x[[5, 69, 70, 128]])
