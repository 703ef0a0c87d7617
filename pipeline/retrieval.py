"""FAISS index over database descriptors and top-k search for the queries.

Index types (``retrieval.index``):

- ``flat``: exact inner product (``IndexFlat``, METRIC_INNER_PRODUCT) on the
  L2-normalised descriptors, float32 storage (4 * D bytes a vector);
- ``flat_fp16``: the same with float16 storage (``IndexScalarQuantizer``
  QT_fp16, 2 * D bytes a vector), near-exact;
- ``ivfpq``: compressed IVF-PQ (``nlist`` inverted lists, ``m`` sub-quantizers
  of ``nbits`` bits: m bytes a vector for nbits = 8; L2 metric, which ranks
  normalised vectors as the inner product does), searched with ``nprobe`` lists;
- ``sharded``: no index file at all: search reads the database stores chunk by
  chunk, searches each chunk exactly (flat inner product) and merges the
  per-chunk top-k -- the same result as one big flat search, in bounded memory;
- ``auto``: ``flat`` up to :data:`FLAT_MAX` images, ``ivfpq`` beyond;
- anything else: a FAISS factory string (``Flat``, ``IVF4096,PQ64``, ``HNSW32``...).

Building never loads all descriptors at once: the index is trained on a random
sample (``train_size`` vectors, read row by row from the stores), then the stores
are added chunk by chunk (``chunk_size`` rows). Search runs in query batches, so
no query x database matrix is ever held in memory. faiss-gpu is used when present
(``faiss.get_num_gpus() > 0`` and the index type has a GPU version), else the CPU;
the choice is logged.

With ``rescore`` > 0 a compressed (non-exact) index proposes ``rescore * k``
candidates per query and their exact descriptors, read from the database store,
decide the final top-k (:func:`rescore_exact`).

The database is the gathered store (:mod:`pipeline.gather`) or several stores read
as one (:class:`ConcatSource`); the index's ``.json`` records its row count and the
rows left out (unreadable images), and search reads names only for the returned
candidates, so nothing holds millions of names.

Distances in the top-k file are squared L2 distances of the normalised
descriptors (``2 - 2 cos``), whatever the index metric, so the rest of the pipeline
recovers the cosine similarity as ``1 - d / 2``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from .args import json_arg
from .global_store import GlobalStore
from .index_plan import FLAT_MAX, NAMED, auto_nlist, choose_factory, chunk_rows_for, train_size_for  # noqa: F401 - re-exported
from .io import atomic_path, read_json, write_json
from .topk import TopK, write_topk

logger = logging.getLogger(__name__)

SHARDED_MARKER = "sharded index: exact chunked search over the database store it was built from\n"


# --------------------------------------------------------------------------- index choice

def metric_of(factory: str) -> int:
    """Inner product for flat (exhaustive) indexes, L2 for IVF/PQ/graph ones.

    On L2-normalised vectors both rank the database the same way; distances are
    converted to squared L2 either way (:func:`to_squared_l2`).
    """
    exhaustive = factory == "Flat" or (factory.startswith("SQ") and "," not in factory)
    return faiss.METRIC_INNER_PRODUCT if exhaustive else faiss.METRIC_L2


def to_squared_l2(D: np.ndarray, metric: str) -> np.ndarray:
    """FAISS result values -> squared L2 distances of unit vectors (``2 - 2 cos``), ascending."""
    D = np.asarray(D, np.float32)
    if metric == "ip":
        D = 2.0 - 2.0 * D
    return np.maximum(D, 0.0)


def _metric_name(metric: int) -> str:
    return "ip" if metric == faiss.METRIC_INNER_PRODUCT else "l2"


# --------------------------------------------------------------------------- sources

class ArraySource:
    """A (memory-mapped) ``[n, D]`` array read like a :class:`GlobalStore` (every row valid)."""

    def __init__(self, array, names: list[str] | None = None):
        self.array = array
        self._names = names

    @property
    def names(self) -> list[str]:
        return self._names if self._names is not None else [str(i) for i in range(len(self))]

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    def __len__(self):
        return self.array.shape[0]

    def read(self, start: int = 0, stop: int | None = None):
        d = np.asarray(self.array[start:stop], dtype=np.float32)
        return d, np.ones(len(d), bool)

    def read_rows(self, rows: np.ndarray):
        d = np.asarray(self.array[np.asarray(rows)], dtype=np.float32)
        return d, np.ones(len(d), bool)


def _read_rows(src, rows: np.ndarray):
    """Rows (sorted) of a store without reading the whole store."""
    if hasattr(src, "read_rows"):
        return src.read_rows(rows)
    d = np.asarray(src.descriptors.oindex[rows, :], dtype=np.float32)
    v = np.asarray(src.valid_arr.oindex[rows])
    return d, v


def _open(p):
    return p if hasattr(p, "read") else GlobalStore(p)


def _valid_of(s) -> np.ndarray:
    if hasattr(s, "read_valid"):
        return s.read_valid()
    return np.ones(len(s), bool)


def _names_at(s, rows) -> np.ndarray:
    if hasattr(s, "names_at"):
        return s.names_at(rows)
    return np.asarray(s.names, dtype=object)[np.asarray(rows)]


class ConcatSource:
    """Several stores read as one (rows numbered across them in order); also the one gathered store."""

    def __init__(self, stores):
        stores = stores if isinstance(stores, (list, tuple)) else [stores]
        self.stores = [_open(p) for p in stores]
        if not self.stores:
            raise ValueError("no database descriptor stores given")
        dims = {s.dim for s in self.stores}
        if len(dims) != 1:
            raise ValueError(f"database stores have different dimensions {sorted(dims)}: "
                             f"{[str(getattr(s, 'path', s)) for s in self.stores]}")
        self.bounds = np.concatenate([[0], np.cumsum([len(s) for s in self.stores])]).astype(np.int64)

    @property
    def dim(self) -> int:
        return self.stores[0].dim

    @property
    def chunk_rows(self) -> int:
        return min(getattr(s, "chunk_rows", 65536) for s in self.stores)

    def __len__(self):
        return int(self.bounds[-1])

    def _split(self, rows):
        """``(store number, rows of that store, positions in rows)`` for sorted ``rows``."""
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted(self.bounds, rows, "right") - 1
        for si in np.unique(which):
            pos = np.flatnonzero(which == si)
            yield si, rows[pos] - self.bounds[si], pos

    def read(self, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else min(stop, len(self))
        ds, vs = [], []
        for si, s in enumerate(self.stores):
            lo, hi = max(start, self.bounds[si]), min(stop, self.bounds[si + 1])
            if lo < hi:
                d, v = s.read(int(lo - self.bounds[si]), int(hi - self.bounds[si]))
                ds.append(d)
                vs.append(v)
        if not ds:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, bool)
        return np.concatenate(ds), np.concatenate(vs)

    def read_rows(self, rows):
        d = np.zeros((len(rows), self.dim), np.float32)
        v = np.zeros(len(rows), bool)
        for si, r, pos in self._split(rows):
            d[pos], v[pos] = _read_rows(self.stores[si], r)
        return d, v

    def read_valid(self) -> np.ndarray:
        return np.concatenate([_valid_of(s) for s in self.stores])

    def names_at(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        flat = rows.ravel()
        out = np.empty(len(flat), object)
        order = np.argsort(flat, kind="stable")
        for si, r, pos in self._split(flat[order]):
            out[order[pos]] = _names_at(self.stores[si], r)
        return out.reshape(rows.shape)

    @property
    def paths(self) -> list[str]:
        return [str(getattr(s, "path", "<array>")) for s in self.stores]


def normalize(x: np.ndarray) -> np.ndarray:
    """An L2-normalised float32 copy of ``x`` (rows of norm 0 stay 0)."""
    x = np.array(x, dtype=np.float32, order="C")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x


def iter_chunks(sources, chunk_size: int = 100_000) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(source number, first row, normalised descriptors, valid)`` chunk by chunk over all sources."""
    for si, s in enumerate(sources):
        chunk_size = chunk_rows_for(chunk_size, s.dim)
        for start in range(0, len(s), chunk_size):
            d, v = s.read(start, start + chunk_size)
            yield si, start, normalize(d), v


def training_sample(sources, size: int, seed: int = 0) -> np.ndarray:
    """``size`` valid vectors drawn uniformly over all sources (read row by row, never a whole store)."""
    lens = np.array([len(s) for s in sources])
    total = int(lens.sum())
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, min(size, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(lens)])
    out = []
    for si, s in enumerate(sources):
        r = rows[(rows >= bounds[si]) & (rows < bounds[si + 1])] - bounds[si]
        for a in range(0, len(r), 50_000):  # bounded reads
            d, v = _read_rows(s, r[a : a + 50_000])
            out.append(normalize(d[v]))
    return np.concatenate(out) if out else np.zeros((0, sources[0].dim), np.float32)


# --------------------------------------------------------------------------- GPU

def _ivf(idx):
    """The IVF index inside ``idx`` (downcast to its class), or None."""
    ivf = faiss.try_extract_index_ivf(idx)
    return None if ivf is None else faiss.downcast_index(ivf)


def gpu_count() -> int:
    try:
        return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001
        return 0


def to_device(idx, use_gpu="auto"):
    """``(index, on_gpu)``: the index cloned to all GPUs when faiss-gpu has one and supports it."""
    if use_gpu is False or use_gpu == "never":
        logger.info("faiss: CPU (GPU not requested)")
        return idx, False
    n = gpu_count()
    if n == 0:
        if use_gpu is True:
            logger.warning("faiss: GPU requested but faiss sees none; CPU")
        else:
            logger.info("faiss: CPU (no GPU visible to faiss)")
        return idx, False
    try:
        co = faiss.GpuMultipleClonerOptions()
        # PQ: float16 lookup tables (needed for m > 48 sub-quantizers); flat storage stays float32
        co.useFloat16 = isinstance(_ivf(idx), faiss.IndexIVFPQ)
        gidx = faiss.index_cpu_to_all_gpus(idx, co=co)
        logger.info("faiss: %d GPU(s)", n)
        return gidx, True
    except Exception as e:  # noqa: BLE001 - index type without a GPU version
        logger.info("faiss: CPU (%s has no GPU version: %s)", type(idx).__name__, str(e).splitlines()[0][:120])
        return idx, False


def _set_nprobe(idx, nprobe: int, on_gpu: bool):
    if on_gpu:
        try:
            faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", nprobe)
        except Exception as e:  # noqa: BLE001 - not an IVF index
            logger.debug("nprobe not set on %s: %s", type(idx).__name__, e)
        return
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        ivf.nprobe = nprobe


# --------------------------------------------------------------------------- build

def make_index(sources, factory: str, train_size: int = 200_000, seed: int = 0, chunk_size: int = 100_000,
               use_gpu="auto", progress: bool = True, timings: dict | None = None):
    """Train (on a sample) and fill (chunk by chunk) a FAISS index over the valid vectors of ``sources``.

    Returns ``(cpu index, valid mask per source)``; ``timings`` (if given) gets
    ``train_s``, ``add_s`` and ``gpu``.
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    dim = sources[0].dim
    metric = metric_of(factory)
    idx = faiss.index_factory(dim, factory, metric)
    if isinstance(_ivf(idx), faiss.IndexIVFPQ):
        _ivf(idx).do_polysemous_training = False  # the factory turns it on: slow (minutes), and unused here
    work, on_gpu = to_device(idx, use_gpu)
    if not idx.is_trained:
        sample = training_sample(sources, train_size_for(train_size, dim), seed)
        logger.info("training %s on %d vectors", factory, len(sample))
        work.train(sample)
        del sample
    t1 = time.perf_counter()
    valid = [np.zeros(len(s), bool) for s in sources]
    for si, start, d, v in tqdm(iter_chunks(sources, chunk_size), desc="index chunks", mininterval=2,
                                total=sum(-(-len(s) // chunk_rows_for(chunk_size, s.dim)) for s in sources),
                                disable=not progress):
        work.add(np.ascontiguousarray(d[v]))
        valid[si][start : start + len(v)] = v
    if on_gpu:
        idx = faiss.index_gpu_to_cpu(work)
    timings.update(train_s=t1 - t0, add_s=time.perf_counter() - t1, gpu=on_gpu)
    return idx, valid


def build_index(db_stores, out: str | Path, index: str = "auto", train_size: int = 200_000, seed: int = 0,
                nlist: int | None = None, m: int | None = None, nbits: int = 8, chunk_size: int = 100_000,
                use_gpu="auto", pca="auto") -> dict:
    """Build a FAISS index over the valid vectors of the database (see the module doc).

    ``db_stores``: the gathered database store, or several stores read as one in
    order. Writes ``out`` (the index; for ``sharded`` a marker) and ``out.json``:
    factory, metric, dimension, the database's row count and names hash, and the
    rows left out (unreadable images). Index ids number the valid rows in order;
    :func:`search` maps them back to rows and names of the same database.
    """
    db = ConcatSource(db_stores)
    n_total, dim = len(db), db.dim
    factory = choose_factory(n_total, dim, index, nlist, m, nbits, pca)
    logger.info("database: %d images of %d-d descriptors -> index %r", n_total, dim, factory)
    if factory == "sharded":
        valid, metric, idx = db.read_valid(), "ip", None
    else:
        idx, valid = make_index([db], factory, train_size, seed, chunk_size, use_gpu)
        valid = valid[0]
        metric = _metric_name(metric_of(factory))
    invalid_rows = np.flatnonzero(~valid)
    if len(invalid_rows):
        logger.warning("%d unreadable database images are left out of the index", len(invalid_rows))
    info = {"factory": factory, "metric": metric, "normalized": True, "n": int(valid.sum()), "dim": dim,
            "n_rows": n_total, "invalid_rows": invalid_rows.tolist(),
            "invalid": _names_at(db, invalid_rows).tolist() if len(invalid_rows) else [],
            "database": db.paths, "chunk_size": chunk_size}
    with atomic_path(out) as tmp:
        if idx is None:
            Path(tmp).write_text(SHARDED_MARKER)
        else:
            faiss.write_index(idx, str(tmp))
    write_json(str(out) + ".json", info)
    return info


def index_rows(info: dict) -> np.ndarray:
    """Database row of every index id."""
    keep = np.ones(int(info["n_rows"]), bool)
    keep[np.asarray(info["invalid_rows"], np.int64)] = False
    return np.flatnonzero(keep)


# --------------------------------------------------------------------------- exact sharded search

def merge_topk(D1, I1, D2, I2, k: int, largest: bool = True):
    """Merge two per-query top-k lists (values ``D``, ids ``I``) into one top-k."""
    D = np.concatenate([D1, D2], axis=1)
    I = np.concatenate([I1, I2], axis=1)
    order = np.argsort(-D if largest else D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def search_chunks(queries: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]], k: int, fp16: bool = False):
    """Exact inner-product top-k of ``queries`` over database chunks ``(first id, vectors)``.

    Each chunk is searched with its own flat index and the per-chunk top-k are
    merged: the result equals one flat search over all chunks (ids are the
    chunks' first id + row). Returns ``(similarities, ids)``, ``-inf`` / ``-1``
    where fewer than ``k`` vectors exist.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    D = np.full((len(q), k), -np.inf, np.float32)
    I = np.full((len(q), k), -1, np.int64)
    for first, xb in chunks:
        if len(xb) == 0:
            continue
        sub = faiss.IndexScalarQuantizer(q.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT) \
            if fp16 else faiss.IndexFlatIP(q.shape[1])
        sub.add(np.ascontiguousarray(xb, dtype=np.float32))
        d, i = sub.search(q, min(k, len(xb)))
        D, I = merge_topk(D, I, d, np.where(i >= 0, i + first, -1), k)
    return D, I


def _valid_chunks(stores, chunk_size: int):
    """``(first index id, valid normalised vectors)`` over the stores; ids count valid vectors only."""
    nid = 0
    for _, _, d, v in iter_chunks(stores, chunk_size):
        x = d[v]
        yield nid, x
        nid += len(x)


def sharded_search(db_stores, queries: np.ndarray, k: int, chunk_size: int = 100_000, query_batch: int = 16384,
                   progress: bool = False):
    """Exact top-k (similarities, ids) over database stores too large for one in-memory index.

    The database is read once per ``query_batch`` queries, ``chunk_size`` rows at a time.
    """
    stores = [_open(p) for p in db_stores]
    q = normalize(queries)
    Ds, Is = [], []
    for a in range(0, len(q), query_batch):
        n_chunks = sum(-(-len(s) // chunk_rows_for(chunk_size, s.dim)) for s in stores)
        chunks = tqdm(_valid_chunks(stores, chunk_size), total=n_chunks, desc="sharded search", disable=not progress)
        D, I = search_chunks(q[a : a + query_batch], chunks, k)
        Ds.append(D)
        Is.append(I)
    return np.concatenate(Ds), np.concatenate(Is)


# --------------------------------------------------------------------------- exact re-scoring

def rescore_exact(db, queries: np.ndarray, rows: np.ndarray, k: int, pair_batch: int = 65_536):
    """Exact cosine similarities of each query with its candidate rows; the best ``k`` per query.

    ``rows [nq, k']``: database rows (of ``db``) proposed by a compressed index,
    ``-1`` for none. The database is read once, chunk by chunk, and only the chunks
    holding some candidate: memory is one chunk plus ``nq * k'`` numbers, whatever
    the database size. Returns ``(similarities, rows)``, both ``[nq, k]``, best first.
    """
    db = _open(db) if not isinstance(db, ConcatSource) else db
    q = normalize(queries)
    nq, kk = rows.shape
    flat = rows.ravel()
    sims = np.full(len(flat), -np.inf, np.float32)
    order = np.argsort(flat, kind="stable")
    sorted_rows = flat[order]
    step = chunk_rows_for(getattr(db, "chunk_rows", 65536), db.dim)  # big descriptors: fewer rows at a time
    start = int(np.searchsorted(sorted_rows, 0))  # skip -1
    while start < len(sorted_rows):
        c0 = int(sorted_rows[start]) // step * step
        end = int(np.searchsorted(sorted_rows, c0 + step))
        x, v = db.read(c0, c0 + step)
        x = normalize(x)
        for a in range(start, end, chunk_rows_for(pair_batch, x.shape[1])):
            sel = order[a : min(end, a + chunk_rows_for(pair_batch, x.shape[1]))]
            r = flat[sel] - c0
            s = np.einsum("ij,ij->i", q[sel // kk], x[r])
            sims[sel] = np.where(v[r], s, -np.inf)
        start = end
    sims = sims.reshape(nq, kk)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, 1), np.take_along_axis(rows, top, 1)


def is_exact(factory: str) -> bool:
    """Whether an index's ranking is exact (up to float16 storage): no re-scoring needed."""
    return factory in ("Flat", "SQfp16", "sharded")


# --------------------------------------------------------------------------- search

def search(index_path, query_store, out, k: int = 100, batch_size: int = 1024, nprobe: int = 32, meta: dict | None = None,
           use_gpu="auto", database=None, rescore: int = 0) -> TopK:
    """Top-k database candidates for every valid query, written as a top-k file.

    ``database``: the store(s) the index was built from (the names, the
    ``sharded`` search and re-scoring read it). ``rescore`` > 0: a compressed index proposes
    ``rescore * k`` candidates per query, re-ranked by their exact descriptors
    (:func:`rescore_exact`); ignored for exact indexes.
    """
    info = read_json(str(index_path) + ".json")
    metric = info.get("metric", "l2")  # indexes built before the metric was recorded: L2
    q = GlobalStore(query_store)
    if q.dim != info["dim"]:
        raise ValueError(f"{query_store}: {q.dim}-d queries do not fit the {info['dim']}-d index {index_path}")
    if database is None:
        raise ValueError(f"{index_path}: searching it needs the database store it was built from (database=)")
    if "n_rows" not in info:
        raise ValueError(f"{index_path}: built by an older version of the pipeline; rebuild the index")
    db = ConcatSource(database)
    if len(db) != info["n_rows"]:
        raise ValueError(f"{index_path} was built over {info['n_rows']} database rows, {db.paths} has {len(db)}: "
                         "rebuild the index")
    n_db = int(info["n"])
    k_eff = min(k, n_db)
    if k_eff < k:
        logger.warning("database has only %d images: k lowered from %d", n_db, k)
    rows_of_id = index_rows(info)
    qnames, qvecs, skipped = [], [], []
    for start in range(0, len(q), batch_size):
        d, v = q.read(start, start + batch_size)
        block = q.names[start : start + len(d)]
        skipped += [n for n, ok in zip(block, v) if not ok]
        qnames += [n for n, ok in zip(block, v) if ok]
        if v.any():
            qvecs.append(d[v])
    if not qnames:
        raise ValueError(f"{query_store}: no valid query descriptors")
    x = normalize(np.concatenate(qvecs))
    k_search = k_eff
    if info["factory"] == "sharded":
        S, I = sharded_search([db], x, k_eff, info.get("chunk_size", 100_000), progress=True)
        dist = to_squared_l2(S, "ip")
    else:
        idx = faiss.read_index(str(index_path))
        work, on_gpu = to_device(idx, use_gpu)
        _set_nprobe(work, nprobe, on_gpu)
        if rescore and not is_exact(info["factory"]):
            k_search = min(n_db, rescore * k_eff)
        cand, dist = [], []
        for a in tqdm(range(0, len(x), batch_size), desc="search", mininterval=2):
            D, I = work.search(np.ascontiguousarray(x[a : a + batch_size]), k_search)
            cand.append(I)
            dist.append(to_squared_l2(D, metric))  # squared L2 = 2 - 2 cos
        I, dist = np.concatenate(cand), np.concatenate(dist)
    db_rows = np.where(I >= 0, rows_of_id[np.maximum(I, 0)], -1)
    if k_search > k_eff:
        logger.info("re-scoring %d candidates per query with the exact descriptors", k_search)
        S, db_rows = rescore_exact(db, x, db_rows, k_eff)
        dist = to_squared_l2(S, "ip")
    if (db_rows < 0).any() or not np.isfinite(dist).all():
        raise RuntimeError(f"{index_path}: the index returned fewer than k={k_eff} results (nprobe too small?)")
    if skipped:
        logger.warning("%d unreadable queries have no candidates: %s", len(skipped), skipped[:5])
    names = _names_at(db, db_rows)
    topk = TopK(
        np.array(qnames, dtype=object), names, db_rows, dist,
        {**(meta or {}), "k": k_eff, "index": info["factory"], "metric": metric, "nprobe": nprobe,
         "input_size": q.attrs.get("input_size"),
         "rescored": k_search if k_search > k_eff else 0, "skipped_queries": skipped, "n_database": n_db},
    )
    write_topk(out, topk)
    return topk


def _build_arguments(p):
    p.add_argument("--out", required=True)
    p.add_argument("--index", default="auto")
    p.add_argument("stores", nargs="+")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    p.add_argument("--m", type=int, default=None, help="PQ sub-quantizers (default dim / 8)")
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--train-size", type=int, default=200_000,
                   help="training sample of IVF indexes (capped at 1.6 GB of float32: index_plan.TRAIN_MAX_BYTES)")
    p.add_argument("--pca", type=_pca_arg, default="auto",
                   help="IVF-PQ: reduce descriptors by PCA first (auto: to 1024-d above 16384-d; none; or a size)")
    p.add_argument("--chunk-size", type=int, default=100_000, help="descriptors read and added at a time")
    p.add_argument("--gpu", choices=["auto", "never"], default="auto")


def _pca_arg(text: str):
    return text if text in ("auto", "none") else int(text)


def _build(a):
    build_index(a.stores, a.out, a.index, train_size=a.train_size, nlist=a.nlist, m=a.m, nbits=a.nbits,
                chunk_size=a.chunk_size, use_gpu="auto" if a.gpu == "auto" else False, pca=a.pca)


def _search_arguments(p):
    p.add_argument("--index", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--gpu", choices=["auto", "never"], default="auto")
    p.add_argument("--meta", type=json_arg, default={})
    p.add_argument("--database", nargs="+", default=None, help="the database store(s) the index was built from")
    p.add_argument("--rescore", type=int, default=0,
                   help="compressed index: re-rank RESCORE x k candidates with the exact descriptors (0: off)")


def _search(a):
    search(a.index, a.queries, a.out, a.k, nprobe=a.nprobe, meta=a.meta, use_gpu="auto" if a.gpu == "auto" else False,
           database=a.database, rescore=a.rescore)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"build-index": (_build_arguments, _build), "search": (_search_arguments, _search)}
