"""Gather database shard stores into one chunked store, in bounded memory.

Extraction writes the database as shards (``retrieval.shard_size`` images each,
one job per shard). The index and the searches read one store instead:
``database.zarr`` with

- ``descriptors [N, D]`` (the shards' dtype), chunks of ``chunk_rows`` rows,
- ``valid [N]``, ``names [N]`` (a string array, never a huge JSON attribute),
- attributes: ``n``, ``dim``, ``n_valid``, ``errors`` (unreadable images), the
  model conf and the shards it was made from (path, rows, the shard's hash).

The copy goes output chunk by output chunk (at most one chunk of descriptors in
memory, whatever the database size), into ``<out>.partial``; each finished chunk
is marked in ``<out>.progress/`` so an interrupted gather resumes where it
stopped, and the store gets its final name only when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from .conf import conf_hash
from .global_store import GlobalStore, open_partial_store, write_names
from .io import atomic_path

logger = logging.getLogger(__name__)

#: attributes every shard of one database must share
SHARED_ATTRS = ("model", "dim", "dtype", "fit_state_hash")


def _check_shards(stores: list[GlobalStore]) -> dict:
    if not stores:
        raise ValueError("no database shard stores to gather")
    first = stores[0]
    for s in stores[1:]:
        for key in SHARED_ATTRS:
            if json.dumps(s.attrs.get(key), sort_keys=True) != json.dumps(first.attrs.get(key), sort_keys=True):
                raise ValueError(
                    f"{s.path}: {key} {s.attrs.get(key)!r} differs from {first.path}'s {first.attrs.get(key)!r}: "
                    "the shards were extracted with different settings; delete the stale ones to re-extract them"
                )
    # shards of a split know their rows: they must tile the database in order
    expected = 0
    for s in stores:
        rows = s.attrs.get("rows")
        if rows is not None and rows[0] != expected:
            raise ValueError(f"{s.path}: holds rows {rows[0]}..{rows[1]} but rows from {expected} were expected next: "
                             "shards missing or out of order")
        expected += len(s)
    return {k: first.attrs.get(k) for k in SHARED_ATTRS}


def gather_stores(shards: list[str | Path], out: str | Path, chunk_rows: int = 8192, progress: bool = True) -> dict:
    """Copy the shard stores, in order, into the single chunked store ``out`` (see the module doc)."""
    out = Path(out)
    if out.exists():
        logger.info("%s exists: nothing to do", out)
        return dict(zarr.open_group(str(out), mode="r").attrs)
    stores = [GlobalStore(p) for p in shards]
    shared = _check_shards(stores)
    lens = np.array([len(s) for s in stores], np.int64)
    bounds = np.concatenate([[0], np.cumsum(lens)])
    n, dim = int(bounds[-1]), stores[0].dim
    dtype = stores[0].descriptors.dtype
    chunk_rows = max(1, min(chunk_rows, max(n, 1)))
    n_chunks = max(1, -(-n // chunk_rows))
    signature = {
        "n": n, "dim": dim, "dtype": str(dtype), "chunk_rows": chunk_rows,
        "shards": [{"path": str(s.path), "n": len(s), "rows": s.attrs.get("rows"),
                    "names_hash": s.attrs.get("names_hash")} for s in stores],
    }
    partial = out.with_name(out.name + ".partial")
    prog = out.with_name(out.name + ".progress")
    group = open_partial_store(partial, prog, signature, n, dim, str(dtype), chunk_rows, with_names=True)
    done = {int(p.name.split("_")[1]) for p in prog.glob("chunk_*")}
    if done:
        logger.info("%s: resuming, %d of %d chunks already copied", out, len(done), n_chunks)
    for c in tqdm(range(n_chunks), desc=f"gather {out.name}", mininterval=2, disable=not progress):
        if c in done:
            continue
        a, b = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        desc = np.zeros((b - a, dim), dtype)
        valid = np.zeros(b - a, bool)
        names = np.empty(b - a, object)
        # the shards overlapping rows a..b
        for si in range(np.searchsorted(bounds, a, "right") - 1, len(stores)):
            lo, hi = max(a, bounds[si]), min(b, bounds[si + 1])
            if lo >= hi:
                if bounds[si] >= b:
                    break
                continue
            s, off = stores[si], int(bounds[si])
            desc[lo - a : hi - a] = s.descriptors[lo - off : hi - off]
            valid[lo - a : hi - a] = s.valid_arr[lo - off : hi - off]
            names[lo - a : hi - a] = s.names_at(np.arange(lo - off, hi - off))
        group["descriptors"][a:b] = desc
        group["valid"][a:b] = valid
        write_names(group, names.tolist(), chunk_rows, start=a, total=n)
        (prog / f"chunk_{c:06d}").touch()
    errors = {}
    for s in stores:
        errors.update(s.attrs.get("errors") or {})
    attrs = {**signature, **shared, "n_valid": int(sum(int(np.asarray(s.valid_arr[:]).sum()) for s in stores)),
             "errors": errors, "names_hash": conf_hash([s.attrs.get("names_hash") for s in stores])}
    group.attrs.update(attrs)
    with atomic_path(out) as tmp:
        partial.rename(tmp)
    shutil.rmtree(prog, ignore_errors=True)
    logger.info("%s: %d descriptors (%d valid) gathered from %d shards", out, n, attrs["n_valid"], len(stores))
    return attrs


def _gather_arguments(p):
    p.add_argument("--out", required=True)
    p.add_argument("--chunk-rows", type=int, default=8192)
    p.add_argument("shards", nargs="+")


def _gather(a):
    gather_stores(a.shards, a.out, chunk_rows=a.chunk_rows)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"gather-global": (_gather_arguments, _gather)}
