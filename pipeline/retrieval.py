"""FAISS index over database descriptors and top-k search for the queries.

The index type is chosen by database size (``index: auto``) or named explicitly
with a FAISS factory string; the choice is logged and stored. Search runs in
query batches, so no query x database matrix is ever held in memory.
"""

from __future__ import annotations

import logging
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


def choose_factory(n: int, dim: int, index: str = "auto") -> str:
    """The FAISS factory string for ``n`` database vectors of ``dim`` dimensions."""
    if index != "auto":
        return index
    if n <= FLAT_MAX:
        return "Flat"
    # ~4*sqrt(n) lists as FAISS recommends; PQ with 8-bit codes of 8 dims each
    nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
    return f"IVF{nlist},PQ{dim // 8}x8" if dim % 8 == 0 else f"IVF{nlist},Flat"


def build_index(db_stores: list, out: str | Path, index: str = "auto", train_size: int = 200_000, seed: int = 0) -> dict:
    """Build a FAISS (L2) index over the valid vectors of the database shards.

    Writes ``out`` (the index) and ``out.json`` (the database names, in index id
    order, and the invalid images left out).
    """
    stores = [GlobalStore(p) for p in db_stores]
    if not stores:
        raise ValueError("no database descriptor stores given")
    dims = {s.dim for s in stores}
    if len(dims) != 1:
        raise ValueError(f"database shards have different dimensions {sorted(dims)}: {[str(s.path) for s in stores]}")
    dim = dims.pop()
    n_total = sum(len(s) for s in stores)
    factory = choose_factory(n_total, dim, index)
    logger.info("database: %d images of %d-d descriptors -> FAISS index %r", n_total, dim, factory)
    idx = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    if not idx.is_trained:
        rng = np.random.default_rng(seed)
        sample = []
        per_store = max(1, train_size // len(stores))
        for s in stores:
            rows = np.sort(rng.choice(len(s), min(per_store, len(s)), replace=False))
            d, v = s.read()
            sample.append(d[rows][v[rows]])
        sample = np.concatenate(sample)
        logger.info("training the index on %d vectors", len(sample))
        idx.train(sample)
    names, invalid, db_rows = [], [], []
    offset = 0
    for s in tqdm(stores, desc="index shards", mininterval=2):
        for start in range(0, len(s), 100_000):
            d, v = s.read(start, start + 100_000)
            idx.add(np.ascontiguousarray(d[v]))
            block = s.names[start : start + len(d)]
            names += [n for n, ok in zip(block, v) if ok]
            db_rows += [offset + start + i for i, ok in enumerate(v) if ok]
            invalid += [n for n, ok in zip(block, v) if not ok]
        offset += len(s)
    if invalid:
        logger.warning("%d unreadable database images are left out of the index", len(invalid))
    info = {"factory": factory, "n": len(names), "dim": dim, "names": names, "rows": db_rows, "invalid": invalid}
    with atomic_path(out) as tmp:
        faiss.write_index(idx, str(tmp))
    write_json(str(out) + ".json", info)
    return info


def search(index_path, query_store, out, k: int = 100, batch_size: int = 1024, nprobe: int = 32, meta: dict | None = None) -> TopK:
    """Top-k database candidates for every valid query, written as a top-k file."""
    idx = faiss.read_index(str(index_path))
    info = read_json(str(index_path) + ".json")
    if hasattr(idx, "nprobe"):
        idx.nprobe = nprobe
    q = GlobalStore(query_store)
    if q.dim != idx.d:
        raise ValueError(f"{query_store}: {q.dim}-d queries do not fit the {idx.d}-d index {index_path}")
    k_eff = min(k, idx.ntotal)
    if k_eff < k:
        logger.warning("database has only %d images: k lowered from %d", idx.ntotal, k)
    db_names = np.array(info["names"], dtype=object)
    db_rows = np.asarray(info["rows"], dtype=np.int64)
    qnames, cand, dist, skipped = [], [], [], []
    for start in tqdm(range(0, len(q), batch_size), desc="search", mininterval=2):
        d, v = q.read(start, start + batch_size)
        block = q.names[start : start + len(d)]
        skipped += [n for n, ok in zip(block, v) if not ok]
        if not v.any():
            continue
        D, I = idx.search(np.ascontiguousarray(d[v]), k_eff)
        qnames += [n for n, ok in zip(block, v) if ok]
        cand.append(I)
        dist.append(np.sqrt(np.maximum(D, 0)))  # FAISS gives squared L2
    if not qnames:
        raise ValueError(f"{query_store}: no valid query descriptors")
    I = np.concatenate(cand)
    if (I < 0).any():
        raise RuntimeError(f"{index_path}: the index returned fewer than k={k_eff} results (nprobe too small?)")
    if skipped:
        logger.warning("%d unreadable queries have no candidates: %s", len(skipped), skipped[:5])
    topk = TopK(
        np.array(qnames, dtype=object), db_names[I], db_rows[I], np.concatenate(dist),
        {**(meta or {}), "k": k_eff, "index": info["factory"], "skipped_queries": skipped,
         "n_database": int(idx.ntotal)},
    )
    write_topk(out, topk)
    return topk
