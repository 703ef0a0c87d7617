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

from .extract_global import GlobalStore
from .io import atomic_path, read_json, write_json
from .topk import TopK, write_topk

logger = logging.getLogger(__name__)

#: databases up to this many images get an exact (flat) index under ``auto``
FLAT_MAX = 1_000_000
#: index names understood besides FAISS factory strings
NAMED = ("auto", "flat", "flat_fp16", "ivfpq", "sharded")
SHARDED_MARKER = "sharded index: exact chunked search over the stores listed in the .json\n"


# --------------------------------------------------------------------------- index choice

def auto_nlist(n: int) -> int:
    """~4 * sqrt(n) inverted lists (FAISS's rule of thumb), rounded to a power of two."""
    return max(1, int(2 ** round(np.log2(4 * np.sqrt(max(n, 1))))))


def choose_factory(n: int, dim: int, index: str = "auto", nlist: int | None = None, m: int | None = None,
                   nbits: int = 8) -> str:
    """The FAISS factory string for ``n`` database vectors of ``dim`` dimensions.

    ``index`` is one of :data:`NAMED` or a factory string (returned as is);
    ``sharded`` gives ``"sharded"`` (no FAISS index).
    """
    if index == "auto":
        index = "flat" if n <= FLAT_MAX else "ivfpq"
        if index == "ivfpq" and m is None and dim % 8:
            return f"IVF{nlist or auto_nlist(n)},Flat"
    if index == "flat":
        return "Flat"
    if index == "flat_fp16":
        return "SQfp16"
    if index == "sharded":
        return "sharded"
    if index == "ivfpq":
        m = m or dim // 8
        if m < 1 or dim % m:
            raise ValueError(f"ivfpq: m={m} sub-quantizers must divide the dimension {dim}")
        return f"IVF{nlist or auto_nlist(n)},PQ{m}x{nbits}"
    return index


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


def normalize(x: np.ndarray) -> np.ndarray:
    """An L2-normalised float32 copy of ``x`` (rows of norm 0 stay 0)."""
    x = np.array(x, dtype=np.float32, order="C")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, n, out=x, where=n > 0)
    return x


def iter_chunks(sources, chunk_size: int = 100_000) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(source number, first row, normalised descriptors, valid)`` chunk by chunk over all sources."""
    for si, s in enumerate(sources):
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
        sample = training_sample(sources, train_size, seed)
        logger.info("training %s on %d vectors", factory, len(sample))
        work.train(sample)
        del sample
    t1 = time.perf_counter()
    valid = [np.zeros(len(s), bool) for s in sources]
    for si, start, d, v in tqdm(iter_chunks(sources, chunk_size), desc="index chunks", mininterval=2,
                                total=sum(-(-len(s) // chunk_size) for s in sources), disable=not progress):
        work.add(np.ascontiguousarray(d[v]))
        valid[si][start : start + len(v)] = v
    if on_gpu:
        idx = faiss.index_gpu_to_cpu(work)
    timings.update(train_s=t1 - t0, add_s=time.perf_counter() - t1, gpu=on_gpu)
    return idx, valid


def build_index(db_stores: list, out: str | Path, index: str = "auto", train_size: int = 200_000, seed: int = 0,
                nlist: int | None = None, m: int | None = None, nbits: int = 8, chunk_size: int = 100_000,
                use_gpu="auto") -> dict:
    """Build a FAISS index over the valid vectors of the database shards (see the module doc).

    Writes ``out`` (the index) and ``out.json`` (factory, metric, the database names
    in index id order, their rows, the invalid images left out; for ``sharded``
    the stores to search).
    """
    stores = [_open(p) for p in db_stores]
    if not stores:
        raise ValueError("no database descriptor stores given")
    dims = {s.dim for s in stores}
    if len(dims) != 1:
        raise ValueError(f"database shards have different dimensions {sorted(dims)}: {[str(getattr(s, 'path', s)) for s in stores]}")
    dim = dims.pop()
    n_total = sum(len(s) for s in stores)
    factory = choose_factory(n_total, dim, index, nlist, m, nbits)
    logger.info("database: %d images of %d-d descriptors -> index %r", n_total, dim, factory)
    if factory == "sharded":
        valid = [np.asarray(s.valid_arr[:]) if hasattr(s, "valid_arr") else np.ones(len(s), bool) for s in stores]
        metric, idx = "ip", None
    else:
        idx, valid = make_index(stores, factory, train_size, seed, chunk_size, use_gpu)
        metric = _metric_name(metric_of(factory))
    names, invalid, db_rows = [], [], []
    offset = 0
    for s, v in zip(stores, valid):
        for i, (n, ok) in enumerate(zip(s.names, v)):
            if ok:
                names.append(n)
                db_rows.append(offset + i)
            else:
                invalid.append(n)
        offset += len(s)
    if invalid:
        logger.warning("%d unreadable database images are left out of the index", len(invalid))
    info = {"factory": factory, "metric": metric, "normalized": True, "n": len(names), "dim": dim,
            "names": names, "rows": db_rows, "invalid": invalid}
    if factory == "sharded":
        info["stores"] = [str(Path(s.path).resolve()) for s in stores]
        info["chunk_size"] = chunk_size
    with atomic_path(out) as tmp:
        if idx is None:
            Path(tmp).write_text(SHARDED_MARKER)
        else:
            faiss.write_index(idx, str(tmp))
    write_json(str(out) + ".json", info)
    return info


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
        n_chunks = sum(-(-len(s) // chunk_size) for s in stores)
        chunks = tqdm(_valid_chunks(stores, chunk_size), total=n_chunks, desc="sharded search", disable=not progress)
        D, I = search_chunks(q[a : a + query_batch], chunks, k)
        Ds.append(D)
        Is.append(I)
    return np.concatenate(Ds), np.concatenate(Is)


# --------------------------------------------------------------------------- search

def search(index_path, query_store, out, k: int = 100, batch_size: int = 1024, nprobe: int = 32, meta: dict | None = None,
           use_gpu="auto") -> TopK:
    """Top-k database candidates for every valid query, written as a top-k file."""
    info = read_json(str(index_path) + ".json")
    metric = info.get("metric", "l2")  # indexes built before the metric was recorded: L2
    q = GlobalStore(query_store)
    if q.dim != info["dim"]:
        raise ValueError(f"{query_store}: {q.dim}-d queries do not fit the {info['dim']}-d index {index_path}")
    n_db = int(info["n"])
    k_eff = min(k, n_db)
    if k_eff < k:
        logger.warning("database has only %d images: k lowered from %d", n_db, k)
    db_names = np.array(info["names"], dtype=object)
    db_rows = np.asarray(info["rows"], dtype=np.int64)
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
    if info["factory"] == "sharded":
        S, I = sharded_search(info["stores"], np.concatenate(qvecs), k_eff, info.get("chunk_size", 100_000), progress=True)
        dist = to_squared_l2(S, "ip")
    else:
        idx = faiss.read_index(str(index_path))
        if info.get("normalized"):
            qvecs = [normalize(x) for x in qvecs]
        work, on_gpu = to_device(idx, use_gpu)
        _set_nprobe(work, nprobe, on_gpu)
        cand, dist = [], []
        x = np.concatenate(qvecs)
        for a in tqdm(range(0, len(x), batch_size), desc="search", mininterval=2):
            D, I = work.search(np.ascontiguousarray(x[a : a + batch_size]), k_eff)
            cand.append(I)
            dist.append(to_squared_l2(D, metric))  # squared L2 = 2 - 2 cos
        I, dist = np.concatenate(cand), np.concatenate(dist)
    if (I < 0).any():
        raise RuntimeError(f"{index_path}: the index returned fewer than k={k_eff} results (nprobe too small?)")
    if skipped:
        logger.warning("%d unreadable queries have no candidates: %s", len(skipped), skipped[:5])
    topk = TopK(
        np.array(qnames, dtype=object), db_names[I], db_rows[I], dist,
        {**(meta or {}), "k": k_eff, "index": info["factory"], "metric": metric, "nprobe": nprobe,
         "skipped_queries": skipped, "n_database": n_db},
    )
    write_topk(out, topk)
    return topk
