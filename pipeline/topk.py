"""Top-k candidate lists on disk.

The format is the one the thesis's reference code writes (so its stage-1 files are
read as they are): an HDF5 file with

- ``queries_filenames [Q]``: query names;
- ``top_candidates_filenames [Q, k]``: database names of each query's candidates,
  best first;
- ``top_candidates_index [Q, k]``: their row in the database table;
- ``top_candidates_distances [Q, k]``: descriptor distances (ascending);

plus, in files this project writes, a JSON ``meta`` attribute (method conf, k,
index type, skipped queries, ...).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .datasets.names import BadNameError, parse_name
from .io import atomic_path

logger = logging.getLogger(__name__)

KEYS = ("queries_filenames", "top_candidates_filenames", "top_candidates_index", "top_candidates_distances")


class TopKFormatError(ValueError):
    """A top-k file that does not follow the format."""


@dataclass
class TopK:
    query_names: np.ndarray  # [Q] str
    candidate_names: np.ndarray  # [Q, k] str
    candidate_index: np.ndarray  # [Q, k] int64
    distances: np.ndarray  # [Q, k] float32
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.query_names = np.asarray(self.query_names, dtype=object)
        self.candidate_names = np.asarray(self.candidate_names, dtype=object)
        self.candidate_index = np.asarray(self.candidate_index, dtype=np.int64)
        self.distances = np.asarray(self.distances, dtype=np.float32)
        q = len(self.query_names)
        for what, arr in (("candidate names", self.candidate_names), ("candidate indices", self.candidate_index),
                          ("distances", self.distances)):
            if arr.ndim != 2 or arr.shape[0] != q:
                raise TopKFormatError(f"{what} have shape {arr.shape}, expected ({q}, k)")
        if not (self.candidate_names.shape == self.candidate_index.shape == self.distances.shape):
            raise TopKFormatError(
                f"inconsistent shapes: names {self.candidate_names.shape}, index {self.candidate_index.shape}, "
                f"distances {self.distances.shape}"
            )

    @property
    def k(self) -> int:
        return self.candidate_names.shape[1]

    def rows_of(self, names, strict: bool = True) -> np.ndarray:
        """The row of each query name in this list: ``-1`` where it has none, or with ``strict``
        a ValueError naming the first few (lists of one dataset are aligned by query name)."""
        row = {q: i for i, q in enumerate(self.query_names)}
        out = np.fromiter((row.get(q, -1) for q in names), np.int64, count=len(names))
        if strict and (out < 0).any():
            missing = [q for q, i in zip(names, out) if i < 0]
            raise ValueError(f"{len(missing)} queries are not in the list, e.g. {missing[:3]}")
        return out

    def __len__(self):
        return len(self.query_names)


def _decode(arr) -> np.ndarray:
    flat = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(arr).ravel()]
    return np.array(flat, dtype=object).reshape(np.shape(arr))


def write_topk(path, topk: TopK, extra: dict | None = None) -> None:
    """Write ``topk`` atomically; ``extra`` adds datasets (e.g. re-ranking scores)."""
    str_dt = h5py.string_dtype()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(KEYS[0], data=topk.query_names.astype(str_dt), dtype=str_dt)
            f.create_dataset(KEYS[1], data=topk.candidate_names.astype(str_dt), dtype=str_dt)
            f.create_dataset(KEYS[2], data=topk.candidate_index)
            f.create_dataset(KEYS[3], data=topk.distances)
            for key, value in (extra or {}).items():
                f.create_dataset(key, data=value)
            f.attrs["meta"] = json.dumps(topk.meta, default=str)


def read_topk(path, made_here: bool = False) -> TopK:
    """Read and check a top-k file; errors name the file and the problem.

    ``made_here``: the file is one of the pipeline's own outputs, so a damaged one is
    rebuilt by deleting it; a file a user gives is never to be deleted (the advice says so).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: top-k file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        advice = ("a damaged output of the pipeline: delete it and the workflow rebuilds it" if made_here else
                  "damaged, truncated or not a top-k HDF5 file: check it, or copy or download it again")
        raise TopKFormatError(f"{path}: not a readable HDF5 file ({e}); {advice}") from None
    with f:
        missing = [k for k in KEYS if k not in f]
        if missing:
            raise TopKFormatError(f"{path}: missing datasets {missing} (has {sorted(f.keys())})")
        meta = json.loads(f.attrs["meta"]) if "meta" in f.attrs else {}
        try:
            return TopK(_decode(f[KEYS[0]][:]), _decode(f[KEYS[1]][:]), f[KEYS[2]][:], f[KEYS[3]][:], meta)
        except TopKFormatError as e:
            raise TopKFormatError(f"{path}: {e}") from None


def read_extra(path, key: str) -> np.ndarray:
    """An extra dataset written by :func:`write_topk` (e.g. ``rerank_scores``)."""
    with h5py.File(path, "r") as f:
        if key not in f:
            raise TopKFormatError(f"{path}: has no {key!r} dataset (has {sorted(f.keys())})")
        return f[key][:]


def import_topk(src, dst, k: int | None = None) -> TopK:
    """Validate an external top-k file (e.g. the thesis's stage-1 output) and store it.

    Every query and candidate name must be a VG benchmark name (positions are read
    from them); ``k`` optionally truncates the lists.
    """
    src = Path(src)
    topk = read_external_topk(src)
    if k is not None:
        if k > topk.k:
            raise TopKFormatError(f"{src}: has {topk.k} candidates per query, fewer than k={k}")
        topk = TopK(topk.query_names, topk.candidate_names[:, :k], topk.candidate_index[:, :k], topk.distances[:, :k], topk.meta)
    topk.meta = {**topk.meta, "imported_from": str(src), "k": topk.k}
    write_topk(dst, topk)
    logger.info("imported %s: %d queries, k=%d", src, len(topk), topk.k)
    return topk


def read_external_topk(src) -> TopK:
    """A top-k file from elsewhere (a user's, a published one), read and checked: every
    query and candidate name must be a VG benchmark name (positions are read from them)."""
    src = Path(src)
    topk = read_topk(src)
    bad = []
    for name in list(topk.query_names) + list(topk.candidate_names.ravel()):
        try:
            parse_name(name)
        except BadNameError as e:
            bad.append(str(e))
            if len(bad) >= 5:
                break
    if bad:
        raise TopKFormatError(f"{src}: names without positions, e.g.\n  " + "\n  ".join(bad))
    return topk


def _import_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="the top-k HDF5 file")
    src.add_argument("--asset", help="a registered data file (pipeline/assets.yaml), found locally (fetch it first)")
    p.add_argument("--dst", required=True)
    p.add_argument("--k", type=int, default=None)


def _import(a):
    src = a.src
    if a.asset:
        from .assets import find_asset, locate

        asset = find_asset(a.asset)
        src = locate(asset)
        if src is None:
            raise FileNotFoundError(f"{asset.name} ({asset.file}) is not here: "
                                    f"python -m pipeline assets fetch {asset.name}")
    import_topk(src, a.dst, a.k)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"import-topk": (_import_arguments, _import)}
