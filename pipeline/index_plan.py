"""Which FAISS index a database gets, and how much memory building and searching it take.

Kept free of heavy imports: the workflow reads it when it plans jobs (the
``mem_mb`` of build_index and search, so a cluster gets a fitting request).
"""

from __future__ import annotations

import math
import re

#: databases up to this many images get an exact (flat) index under ``auto``
FLAT_MAX = 1_000_000
#: ... and up to this many bytes of float32 descriptors: any 1 M x 512-d (CosPlace), but only
#: 236 k x 8448-d (MegaLoc, SALAD) or 122 k x 16384-d (BoQ ResNet-50)
FLAT_MAX_BYTES = 8_000_000_000
#: under ``auto``/``ivfpq``, descriptors of more dimensions than this are first reduced by a
#: PCA (with a random rotation: FAISS's ``PCAR``) to :data:`PCA_DIM` dimensions; the exact
#: descriptors still re-score the candidates (``retrieval.rescore``). Every released model here
#: (up to BoQ's 16384-d) keeps its full descriptor: PQ at dim/8 bytes a vector (1 KB for
#: MegaLoc: 3 GB at SF-XL scale) kept the exact top-10 far better than PCA to 1024-d on the
#: 8448-d benchmark (re-scored 10-R@10 0.99 against 0.86, benchmarks/sfxl_index.py)
PCA_ABOVE = 16384
PCA_DIM = 1024
#: descriptors read at a time (building, exact and re-scoring search) are capped at this many
#: bytes of float32: 100 k x 512-d, 8192 x 8448-d
CHUNK_MAX_BYTES = 4 * 512 * 100_000
#: the index's training sample is capped at this many bytes of float32 (200 k x 512-d; a
#: 16384-d descriptor gets 30 k vectors, still > 4 per inverted list of SF-XL's 8192)
TRAIN_MAX_BYTES = 4 * 512 * 200_000 * 4
#: index names understood besides FAISS factory strings
NAMED = ("auto", "flat", "flat_fp16", "ivfpq", "sharded")


def auto_nlist(n: int) -> int:
    """~4 * sqrt(n) inverted lists (FAISS's rule of thumb), rounded to a power of two."""
    return max(1, int(2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))


def chunk_rows_for(chunk_size: int, dim: int) -> int:
    """Rows read (or re-scored) at a time: ``chunk_size``, fewer where that many ``dim``-d float32
    rows would pass :data:`CHUNK_MAX_BYTES` (at least 8192 rows, a gathered store's chunk)."""
    chunk_size = int(chunk_size)
    if 4 * chunk_size * dim <= CHUNK_MAX_BYTES:
        return chunk_size
    return max(min(chunk_size, 8192), CHUNK_MAX_BYTES // (4 * dim) // 8192 * 8192)


def train_size_for(train_size: int, dim: int) -> int:
    """The training sample actually drawn: ``train_size`` capped at :data:`TRAIN_MAX_BYTES`."""
    return max(1, min(int(train_size), TRAIN_MAX_BYTES // (4 * max(int(dim), 1))))


def pca_dim(dim: int, pca="auto") -> int | None:
    """The PCA output size for ``dim``-d descriptors under ``pca`` (``auto``: :data:`PCA_DIM`
    above :data:`PCA_ABOVE` dimensions, e.g. a 32768-d NetVLAD; ``None``/``0``: none; an int:
    that size)."""
    if pca in (None, 0, False, "none"):
        return None
    if pca == "auto":
        return PCA_DIM if dim > PCA_ABOVE else None
    if isinstance(pca, bool) or not isinstance(pca, int) or pca < 1:
        raise ValueError(f"pca must be 'auto', 'none' or a positive number of dimensions, not {pca!r}")
    if pca >= dim:
        raise ValueError(f"pca={pca} must be below the descriptor's {dim} dimensions")
    return pca


def choose_factory(n: int, dim: int, index: str = "auto", nlist: int | None = None, m: int | None = None,
                   nbits: int = 8, pca="auto") -> str:
    """The FAISS factory string for ``n`` database vectors of ``dim`` dimensions.

    ``index`` is one of :data:`NAMED` or a factory string (returned as is);
    ``sharded`` gives ``"sharded"`` (no FAISS index). ``auto`` is exact (flat) while the
    float32 descriptors fit :data:`FLAT_MAX` images and :data:`FLAT_MAX_BYTES`, IVF-PQ
    beyond; IVF-PQ on descriptors of more than :data:`PCA_ABOVE` dimensions first reduces
    them by PCA (``pca``, :func:`pca_dim`).
    """
    if index == "auto":
        index = "flat" if n <= FLAT_MAX and 4 * n * dim <= FLAT_MAX_BYTES else "ivfpq"
        if index == "ivfpq" and m is None and dim % 8 and pca_dim(dim, pca) is None:
            return f"IVF{nlist or auto_nlist(n)},Flat"
    if index == "flat":
        return "Flat"
    if index == "flat_fp16":
        return "SQfp16"
    if index == "sharded":
        return "sharded"
    if index == "ivfpq":
        reduced = pca_dim(dim, pca)
        d = reduced or dim
        m = m or d // 8
        if m < 1 or d % m:
            raise ValueError(f"ivfpq: m={m} sub-quantizers must divide the dimension {d}"
                             + (f" (after PCA from {dim})" if reduced else ""))
        return (f"PCAR{reduced}," if reduced else "") + f"IVF{nlist or auto_nlist(n)},PQ{m}x{nbits}"
    return index


def index_bytes(factory: str, n: int, dim: int) -> float:
    """Bytes an index of ``n`` vectors takes in memory (storage, ids, coarse centroids)."""
    if factory == "sharded":
        return 9.0 * n  # the valid mask and row ids only
    if factory == "Flat":
        return 4.0 * n * dim
    if factory == "SQfp16":
        return 2.0 * n * dim
    pre = re.match(r"PCAR?W?(\d+),", factory)
    pca_bytes = 0.0
    if pre:  # the PCA matrix and mean; the index behind it sees the reduced vectors
        pca_bytes = 4.0 * (dim + 1) * int(pre.group(1))
        dim = int(pre.group(1))
    ivf = re.search(r"IVF(\d+)", factory)
    coarse = 4.0 * int(ivf.group(1)) * dim + pca_bytes if ivf else pca_bytes
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
              rescore: int = 0, n_queries: int = 100_000, pca="auto") -> int:
    """``mem_mb`` for ``stage`` (``build`` or ``search``) of a database of ``n`` images.

    The index as stored, one chunk of descriptors being read (three copies:
    read, normalised, valid rows), the training sample (IVF), and the search's
    queries, candidates and re-scoring batch; plus ~1 GB for Python, PyTorch and
    FAISS, and a 25 % margin. ``n`` unknown (not indexed yet): 16 GB.
    """
    if n is None:
        return 16_000
    factory = choose_factory(n, dim, index, nlist, m, nbits, pca)
    total = 1.0e9 + index_bytes(factory, n, dim) + 3 * 4.0 * min(chunk_rows_for(chunk_size, dim), n) * dim
    if stage == "build":
        if "IVF" in factory:
            total += 3 * 4.0 * min(train_size_for(train_size, dim), n) * dim
    elif stage == "search":
        kk = k * max(1, rescore) if factory not in ("Flat", "SQfp16", "sharded") else k
        total += 16.0 * n  # index id -> database row
        total += n_queries * (2 * 4.0 * dim + kk * 24.0 + k * 120.0)  # queries, candidates, result names
        total += 2 * 4.0 * chunk_rows_for(65_536, dim) * dim  # re-scoring batch
    else:
        raise ValueError(f"stage must be 'build' or 'search', not {stage!r}")
    return int(math.ceil(total * 1.25 / 2**20 / 256) * 256)
