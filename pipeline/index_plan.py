"""Which FAISS index a database gets, and how much memory building and searching it take.

Kept free of heavy imports: the workflow reads it when it plans jobs (the
``mem_mb`` of build_index and search, so a cluster gets a fitting request).
"""

from __future__ import annotations

import math
import re

#: databases up to this many images get an exact (flat) index under ``auto``
FLAT_MAX = 1_000_000
#: index names understood besides FAISS factory strings
NAMED = ("auto", "flat", "flat_fp16", "ivfpq", "sharded")


def auto_nlist(n: int) -> int:
    """~4 * sqrt(n) inverted lists (FAISS's rule of thumb), rounded to a power of two."""
    return max(1, int(2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))


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


def index_bytes(factory: str, n: int, dim: int) -> float:
    """Bytes an index of ``n`` vectors takes in memory (storage, ids, coarse centroids)."""
    if factory == "sharded":
        return 9.0 * n  # the valid mask and row ids only
    if factory == "Flat":
        return 4.0 * n * dim
    if factory == "SQfp16":
        return 2.0 * n * dim
    ivf = re.match(r"IVF(\d+)", factory)
    coarse = 4.0 * int(ivf.group(1)) * dim if ivf else 0.0
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        code = int(pq.group(1)) * int(pq.group(2) or 8) / 8
    elif "SQ8" in factory:
        code = dim
    elif "SQfp16" in factory:
        code = 2 * dim
    else:  # Flat lists, HNSW, anything else: full vectors (an upper bound)
        code = 4 * dim + (64 * 4 if "HNSW" in factory else 0)
    return n * (code + (8 if ivf else 0)) + coarse


def memory_mb(stage: str, n: int | None, dim: int, index: str = "auto", k: int = 100, nlist: int | None = None,
              m: int | None = None, nbits: int = 8, train_size: int = 200_000, chunk_size: int = 100_000,
              rescore: int = 0, n_queries: int = 100_000) -> int:
    """``mem_mb`` for ``stage`` (``build`` or ``search``) of a database of ``n`` images.

    The index as stored, one chunk of descriptors being read (three copies:
    read, normalised, valid rows), the training sample (IVF), and the search's
    queries, candidates and re-scoring batch; plus ~1 GB for Python, PyTorch and
    FAISS, and a 25 % margin. ``n`` unknown (not indexed yet): 16 GB.
    """
    if n is None:
        return 16_000
    factory = choose_factory(n, dim, index, nlist, m, nbits)
    total = 1.0e9 + index_bytes(factory, n, dim) + 3 * 4.0 * min(chunk_size, n) * dim
    if stage == "build":
        if factory.startswith("IVF"):
            total += 3 * 4.0 * min(train_size, n) * dim
    elif stage == "search":
        kk = k * max(1, rescore) if factory not in ("Flat", "SQfp16", "sharded") else k
        total += 16.0 * n  # index id -> database row
        total += n_queries * (2 * 4.0 * dim + kk * 24.0 + k * 120.0)  # queries, candidates, result names
        total += 2 * 4.0 * 65_536 * dim  # re-scoring batch
    else:
        raise ValueError(f"stage must be 'build' or 'search', not {stage!r}")
    return int(math.ceil(total * 1.25 / 2**20 / 256) * 256)
