"""Matches of (query, candidate) pairs, stored once per features + matcher, keyed by the pair.

hloc keys matches by the pair of image names; so does this store. A pair is matched once
whichever retrieval proposed it and at whatever K: raising a method's K matches only the
new pairs, and two retrievals that propose the same pair share its matches.

A store is a folder (:func:`store_dir`: the matcher's name and a hash of its conf with
the defaults filled in, plus the feature store it reads) of immutable HDF5 part files
``part_<writer>_NNNNNN.h5``, each holding a few thousand pairs as ragged arrays:

- ``pairs [P, 2]`` (query name, candidate name), ``counts [P]``, ``seconds [P]`` (the
  matcher's time for the pair: its share of the batch it ran in);
- kind ``matches``: ``matches [T, 2]`` int32 indices into the two images' keypoints and
  ``scores [T]`` float16; kind ``points``: ``points [T, 4]`` float32 (x0, y0, x1, y1 in
  pixels of the original image files, image-input matchers) and ``scores``; kind ``pair_score``: ``pair_scores [P, L]``.

Parts are written to a temporary name and renamed when complete, so a killed run leaves
whole parts only and a re-run matches only the pairs no part holds. Each writer names its
parts with its own token, so several jobs (two retrievals of one dataset) may add to one
store at once; a pair both matched is kept once (the first part in name order). Readers
open parts read-only without HDF5 file locking.

The match stage's own output, ``matches/{retrieval}/{features}+{matcher}.h5``, is a
*view*: the top-k file's pairs at its K, each pointing to its part and rows
(:class:`MatchView`), with the per-query matching seconds.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from .io import atomic_path

logger = logging.getLogger(__name__)

#: pairs per part file
PART_PAIRS = 4096
#: parts a reader keeps in memory
MAX_PARTS = 8
#: matcher conf entries that change how fast, not what, a matcher matches
NOT_HASHED = ("batch_size", "trust")


def store_dir(base, matcher_conf: dict, features: str) -> Path:
    """The store folder for a matcher conf (defaults filled in) reading ``features``
    (the feature store's folder name, which carries its own conf hash, or ``images``)."""
    from .conf import conf_hash, merge_conf
    from .matchers import get_matcher_class

    cls = get_matcher_class(matcher_conf["name"])
    base_conf = {**cls.base_conf, **cls.default_conf}
    if cls.inputs == "images":
        base_conf.setdefault("resize", None)
    full = merge_conf(base_conf, matcher_conf, f"matcher {matcher_conf['name']}")
    full = {k: v for k, v in full.items() if k not in NOT_HASHED}
    if cls.output == "points":  # positions in original-image pixels (earlier stores: the matcher's input)
        full["points_frame"] = "original"
    return Path(base) / f"{matcher_conf['name']}-{conf_hash({'matcher': full, 'features': features})}"


def _arrays(kind: str, results: list[dict]) -> dict[str, np.ndarray]:
    """One part's results as arrays (ragged kinds get ``counts``)."""
    if kind == "pair_score":
        scores = np.stack([np.asarray(r["pair_score"], np.float32).reshape(-1) for r in results])
        return {"pair_scores": scores, "counts": np.ones(len(results), np.int64)}
    counts = np.asarray([len(r["scores"]) for r in results], np.int64)
    scores = np.concatenate([np.asarray(r["scores"], np.float32) for r in results]).astype(np.float16)
    if kind == "points":
        pts = [np.concatenate([np.asarray(r["keypoints0"]), np.asarray(r["keypoints1"])], 1).reshape(-1, 4)
               for r in results]
        return {"points": np.concatenate(pts).astype(np.float32).reshape(-1, 4), "scores": scores, "counts": counts}
    m = [np.asarray(r["matches"]).reshape(-1, 2) for r in results]
    return {"matches": np.concatenate(m).astype(np.int32).reshape(-1, 2), "scores": scores, "counts": counts}


def write_part(path: Path, kind: str, pairs: list[tuple[str, str]], results: list[dict], seconds) -> None:
    """One part file (temporary name, then renamed)."""
    arrays = _arrays(kind, results)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = kind
            f.create_dataset("pairs", data=np.array(pairs, dtype=object).reshape(-1, 2), dtype=h5py.string_dtype())
            f.create_dataset("seconds", data=np.asarray(seconds, np.float32))
            for key, value in arrays.items():
                f.create_dataset(key, data=value)


def scan(folder: Path) -> dict[tuple[str, str], tuple[str, int, int, int]]:
    """``(query, candidate) -> (part name, row, offset, count)`` of every pair in the store's
    complete parts (a pair in several parts: the first part in name order)."""
    index: dict[tuple[str, str], tuple[str, int, int, int]] = {}
    for part in sorted(Path(folder).glob("part_*.h5")):
        try:
            with h5py.File(part, "r", locking=False) as f:
                names = f["pairs"].asstr()[()]
                counts = f["counts"][()]
        except (OSError, KeyError) as e:
            raise ValueError(f"{part}: damaged match part ({e}); delete it to match its pairs again") from None
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for row, (q, c) in enumerate(names):
            index.setdefault((q, c), (part.name, row, int(offsets[row]), int(counts[row])))
    return index


class PartWriter:
    """Collects results and writes a part of :data:`PART_PAIRS` pairs at a time."""

    def __init__(self, folder: Path, kind: str, token: str, part_pairs: int | None = None):
        self.folder, self.kind, self.token = Path(folder), kind, token
        self.part_pairs = part_pairs or PART_PAIRS
        self.pairs: list[tuple[str, str]] = []
        self.results: list[dict] = []
        self.seconds: list[float] = []
        self.n_parts = 0

    def add(self, pairs, results, seconds) -> None:
        self.pairs += pairs
        self.results += results
        self.seconds += list(seconds)
        if len(self.pairs) >= self.part_pairs:
            self.flush()

    def flush(self) -> None:
        if not self.pairs:
            return
        write_part(self.folder / f"part_{self.token}_{self.n_parts:06d}.h5", self.kind, self.pairs, self.results,
                   self.seconds)
        self.n_parts += 1
        self.pairs, self.results, self.seconds = [], [], []


class PartReader:
    """Reads pairs' matches from a store's parts, keeping the :data:`MAX_PARTS` last used
    parts' arrays in memory (parts are small and read in order by the scorers)."""

    def __init__(self, folder: Path, kind: str, max_parts: int = MAX_PARTS):
        self.folder, self.kind, self.max_parts = Path(folder), kind, max(1, max_parts)
        self._parts: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def _part(self, name: str) -> dict[str, np.ndarray]:
        part = self._parts.get(name)
        if part is not None:
            self._parts.move_to_end(name)
            return part
        while len(self._parts) >= self.max_parts:
            self._parts.popitem(last=False)
        key = {"matches": "matches", "points": "points", "pair_score": "pair_scores"}[self.kind]
        path = self.folder / name
        try:
            with h5py.File(path, "r", locking=False) as f:
                part = {"data": f[key][()]}
        except (OSError, KeyError) as e:
            raise ValueError(f"{path}: damaged or missing match part ({e}); delete it and the matches "
                             "files that point to it to match again") from None
        self._parts[name] = part
        return part

    def get(self, part: str, row: int, offset: int, count: int) -> np.ndarray:
        data = self._part(part)["data"]
        return data[row] if self.kind == "pair_score" else data[offset: offset + count]


class MatchView:
    """The matches of one top-k file's pairs at its K (the match stage's output file).

    ``pair(qi, rank)``: index pairs ``[M, 2]`` (kind ``matches``) or positions ``[M, 4]``
    (kind ``points``); ``pair_score(qi, rank)``: the pair model's output vector.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self.info = json.loads(f.attrs["info"])
                if "store" not in self.info:
                    raise KeyError("no store: made by an older version of the pipeline")
                self.parts = f["parts"].asstr()[()].tolist()
                self.part_of = f["part"][()]
                self.row = f["row"][()]
                self.offset = f["offset"][()]
                self.count = f["count"][()]
                self.seconds = f["seconds"][()]
                self.pair_seconds = f["pair_seconds"][()]
        except (OSError, KeyError) as e:
            raise ValueError(f"{self.path}: damaged matches file ({e}); delete it to match again") from None
        self.kind = self.info.get("kind", "matches")
        self.k = self.info["k"]
        self.folder = self.path.parent / self.info["store"]
        self._reader = PartReader(self.folder, self.kind)

    def seconds_per_query(self, k: int | None = None) -> float:
        """Mean over queries of the matching seconds of their first ``k`` pairs (default: all)."""
        if not len(self.seconds):
            return 0.0
        k = self.k if k is None else min(k, self.k)
        return float(self.pair_seconds.reshape(-1, self.k)[:, :k].sum(1).mean())

    def _get(self, qi: int, rank: int) -> np.ndarray:
        j = qi * self.k + rank
        return self._reader.get(self.parts[self.part_of[j]], int(self.row[j]), int(self.offset[j]),
                                int(self.count[j]))

    def pair(self, qi: int, rank: int) -> np.ndarray:
        return self._get(qi, rank)

    def pair_score(self, qi: int, rank: int) -> np.ndarray:
        return self._get(qi, rank)


def write_view(out, folder: Path, index: dict, qnames: list[str], cnames: list[list[str]], info: dict) -> dict:
    """The view file of ``qnames`` x ``cnames`` (each row K candidates), every pair in ``index``."""
    folder = Path(folder)
    k = len(cnames[0]) if cnames else 0
    parts: dict[str, int] = {}
    n = len(qnames) * k
    part_of = np.zeros(n, np.int32)
    row = np.zeros(n, np.int64)
    offset = np.zeros(n, np.int64)
    count = np.zeros(n, np.int64)
    locs = []
    for qi, q in enumerate(qnames):
        for rank, c in enumerate(cnames[qi]):
            part, r, off, cnt = index[(q, c)]
            j = qi * k + rank
            part_of[j] = parts.setdefault(part, len(parts))
            row[j], offset[j], count[j] = r, off, cnt
            locs.append((part, r))
    # each query's matching seconds: the sum of its pairs' (as a query alone would pay them)
    pair_seconds = _pair_seconds(folder, locs) if n else np.zeros(0)
    seconds = pair_seconds.reshape(len(qnames), k).sum(1) if n else np.zeros(len(qnames))
    # the store's path relative to the view: a work folder can be moved or read from anywhere
    info = {**info, "k": k, "n_queries": len(qnames), "store": os.path.relpath(folder, Path(out).parent),
            "seconds_per_query": float(seconds.mean()) if len(seconds) else 0.0}
    if info.get("kind") != "pair_score" and n:
        info["mean_matches"] = float(count.mean())
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("parts", data=np.array(list(parts), dtype=object), dtype=h5py.string_dtype())
            for key, value in (("part", part_of), ("row", row), ("offset", offset), ("count", count),
                               ("seconds", seconds), ("pair_seconds", pair_seconds)):
                f.create_dataset(key, data=value)
            f.create_dataset("query_names", data=np.array(qnames, dtype=object), dtype=h5py.string_dtype())
            f.attrs["info"] = json.dumps(info)
    return info


def _pair_seconds(folder: Path, locs: list[tuple[str, int]]) -> np.ndarray:
    by_part: dict[str, np.ndarray] = {}
    for part in dict.fromkeys(p for p, _ in locs):
        with h5py.File(folder / part, "r", locking=False) as f:
            by_part[part] = f["seconds"][()]
    return np.asarray([by_part[p][r] for p, r in locs], np.float64)
