"""Stage 2: re-rank each query's top-K candidates with local features.

Three steps, each materialised on disk so that a change re-runs only what it affects:

1. ``needed_images``: the queries plus the union of their top-K candidates; their
   local features are extracted once per extractor (:mod:`pipeline.local_store`).
2. ``match_topk``: matches of every (query, candidate) pair for one extractor and
   matcher, stored ragged in one HDF5 file (``matches [T, 2]``, ``scores [T]``,
   ``offsets [Q*K + 1]``). Work is done in blocks of queries written atomically,
   so an interrupted run resumes.
3. ``score_topk``: a scorer turns each pair's matches into a score; candidates
   are re-ordered by it (ties keep the retrieval order) and written as a new
   top-k file, so the same evaluation applies to retrieval and re-ranking.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from .extract_global import pick_device
from .io import atomic_path
from .local_store import FeatureStore
from .matchers import build_matcher
from .scorers import build_scorer
from .topk import TopK, read_topk, write_topk

logger = logging.getLogger(__name__)

BLOCK = 16  # queries per resumable block of matching
CACHE = 512  # images whose features stay on the device while matching (neighbouring queries share candidates)


class NameResolver:
    """Maps top-k names to image paths relative to the dataset root.

    Our own top-k files hold root-relative names already; imported ones (the
    thesis's) hold bare file names, found through the dataset's index tables.
    """

    def __init__(self, root, index_dir=None):
        self.root = Path(root)
        self.by_base: dict[str, str] = {}
        if index_dir is not None:
            from .datasets.index import read_table

            for split in ("database", "queries"):
                for name in read_table(Path(index_dir) / f"{split}.csv").name:
                    self.by_base.setdefault(Path(name).name, name)

    def __call__(self, name: str) -> str:
        if "/" in name or not self.by_base:
            return name
        return self.by_base.get(name, name)

    def check(self, names) -> None:
        missing = [n for n in names if not (self.root / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images of the top-k lists are not under {self.root}, e.g. {missing[:3]}"
            )


def needed_images(topks: list[tuple[str | Path, int]], resolve=lambda n: n) -> list[str]:
    """Queries plus the union of their first K candidates, over several top-k files."""
    names: dict[str, None] = {}
    for path, k in topks:
        t = read_topk(path)
        if k > t.k:
            raise ValueError(f"{path}: re-ranking K={k} exceeds the {t.k} candidates per query")
        for n in t.query_names:
            names[resolve(n)] = None
        for n in t.candidate_names[:, :k].ravel():
            names[resolve(n)] = None
    return list(names)


def _torch_feats(d: dict, device) -> dict:
    return {
        "keypoints": torch.from_numpy(d["keypoints"]).float().to(device),
        "descriptors": torch.from_numpy(d["descriptors"].astype(np.float32)).to(device),
        "scores": torch.from_numpy(d["scores"].astype(np.float32)).to(device),
        "image_size": torch.as_tensor(d["image_size"]).to(device),
        **({"levels": torch.from_numpy(d["levels"].astype(np.int64)).to(device)} if "levels" in d else {}),
    }


def match_topk(features: str | Path, matcher_conf: dict, topk_path, k: int, out, resolve=lambda n: n,
               device: str = "auto") -> dict:
    """Match every query with its first ``k`` candidates; write the ragged matches file."""
    out = Path(out)
    topk = read_topk(topk_path)
    if k > topk.k:
        raise ValueError(f"{topk_path}: K={k} exceeds the {topk.k} candidates per query")
    store = FeatureStore(features)
    qnames = [resolve(n) for n in topk.query_names]
    cnames = [[resolve(n) for n in row[:k]] for row in topk.candidate_names]
    store.check(qnames + [n for row in cnames for n in row])
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    sig = json.dumps({"matcher": matcher_conf, "k": k, "topk": str(topk_path), "features": str(features)}, sort_keys=True)
    sig_file = parts / "signature.json"
    if sig_file.exists() and sig_file.read_text() != sig:
        logger.warning("%s: left over from other settings, starting over", parts)
        for p in parts.glob("block_*.npz"):
            p.unlink()
    sig_file.write_text(sig)
    dev = pick_device(device)
    matcher = build_matcher(matcher_conf).eval().to(dev)
    n_q = len(qnames)
    blocks = range(0, n_q, BLOCK)
    done = {int(p.stem.split("_")[1]) for p in parts.glob("block_*.npz")}
    logger.info("matching %d queries x %d candidates (%d blocks, %d done)", n_q, k, len(blocks), len(done))
    bar = tqdm(total=n_q, desc=f"match {matcher_conf['name']}", mininterval=2, unit="query")
    cache: OrderedDict[str, dict | None] = OrderedDict()

    def feats(name):
        """Features on the device, read from the store once while they stay in the cache."""
        if name in cache:
            cache.move_to_end(name)
            return cache[name]
        d = store.get(name)
        cache[name] = _torch_feats(d, dev) if d is not None else None
        if len(cache) > CACHE:
            cache.popitem(last=False)
        return cache[name]

    for start in blocks:
        if start in done:
            bar.update(min(BLOCK, n_q - start))
            continue
        matches, scores, counts, seconds = [], [], [], []
        for qi in range(start, min(n_q, start + BLOCK)):
            t0 = time.perf_counter()
            fq = feats(qnames[qi])
            for name in cnames[qi]:
                fc = feats(name)
                if fq is None or fc is None:  # an unreadable image matches nothing
                    m = {"matches": torch.zeros((0, 2), dtype=torch.int64), "scores": torch.zeros(0)}
                else:
                    m = matcher(fq, fc)
                matches.append(m["matches"].cpu().numpy().astype(np.int32))
                scores.append(m["scores"].cpu().numpy().astype(np.float16))
                counts.append(len(m["matches"]))
            seconds.append(time.perf_counter() - t0)
            bar.update(1)
        with atomic_path(parts / f"block_{start:08d}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, matches=np.concatenate(matches).reshape(-1, 2), scores=np.concatenate(scores),
                         counts=np.asarray(counts, np.int64), seconds=np.asarray(seconds))
    bar.close()
    store.close()
    # assemble the blocks into the final file
    allm, alls, allc, alls_t = [], [], [], []
    for start in blocks:
        with np.load(parts / f"block_{start:08d}.npz") as b:
            allm.append(b["matches"]), alls.append(b["scores"]), allc.append(b["counts"]), alls_t.append(b["seconds"])
    counts = np.concatenate(allc)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    seconds = np.concatenate(alls_t)
    info = {"matcher": matcher_conf, "k": k, "n_queries": n_q, "seconds_per_query": float(seconds.mean()),
            "mean_matches": float(counts.mean()) if len(counts) else 0.0, "device": str(dev)}
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("matches", data=np.concatenate(allm).reshape(-1, 2), compression="gzip")
            f.create_dataset("scores", data=np.concatenate(alls), compression="gzip")
            f.create_dataset("offsets", data=offsets)
            f.create_dataset("seconds", data=seconds)
            f.create_dataset("query_names", data=np.array(qnames, dtype=object), dtype=h5py.string_dtype())
            f.attrs["info"] = json.dumps(info)
    for p in parts.glob("*"):
        p.unlink()
    parts.rmdir()
    logger.info("%s: %.3f s/query, %.0f matches per pair", out, info["seconds_per_query"], info["mean_matches"])
    return info


class Matches:
    """Read access to a matches file written by :func:`match_topk`."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self.matches = f["matches"][:]
                self.offsets = f["offsets"][:]
                self.seconds = f["seconds"][:]
                self.info = json.loads(f.attrs["info"])
        except (OSError, KeyError) as e:
            raise ValueError(f"{self.path}: damaged matches file ({e}); delete it to match again") from None
        self.k = self.info["k"]

    def pair(self, qi: int, rank: int) -> np.ndarray:
        j = qi * self.k + rank
        return self.matches[self.offsets[j] : self.offsets[j + 1]]


def score_topk(features, matches_path, scorer_conf: dict, topk_path, k: int, out, resolve=lambda n: n,
               meta: dict | None = None) -> TopK:
    """Score the first ``k`` candidates of every query and write the re-ranked top-k file."""
    topk = read_topk(topk_path)
    matches = Matches(matches_path)
    if matches.k < k:
        raise ValueError(f"{matches_path}: holds matches for K={matches.k} candidates, fewer than K={k}")
    if matches.info["n_queries"] != len(topk):
        raise ValueError(f"{matches_path}: made for {matches.info['n_queries']} queries, {topk_path} has {len(topk)}")
    store = FeatureStore(features)
    scorer = build_scorer(scorer_conf)
    scores = np.zeros((len(topk), k))
    order = np.zeros((len(topk), k), dtype=np.int64)
    seconds = np.zeros(len(topk))
    for qi in tqdm(range(len(topk)), desc=f"score {scorer_conf['name']}", mininterval=2, unit="query"):
        t0 = time.perf_counter()
        q = store.get(resolve(topk.query_names[qi]))
        raw = []
        for rank in range(k):
            c = store.get(resolve(topk.candidate_names[qi, rank]))
            m = matches.pair(qi, rank)
            if q is None or c is None or not len(m):
                raw.append(None)
                continue
            raw.append(scorer.score_pair(q["keypoints"], c["keypoints"], m, q, c))
        width = max((len(r) for r in raw if r is not None), default=1)
        raw = np.array([r if r is not None else np.zeros(width) for r in raw], dtype=np.float64)
        scores[qi] = scorer.finalize(raw)
        # stable sort on -score: ties keep the retrieval order
        order[qi] = np.argsort(-scores[qi], kind="stable")
        seconds[qi] = time.perf_counter() - t0
    store.close()
    idx = np.arange(len(topk))[:, None]
    new_names = topk.candidate_names.copy()
    new_index = topk.candidate_index.copy()
    new_dist = topk.distances.copy()
    new_names[:, :k] = topk.candidate_names[idx, order]
    new_index[:, :k] = topk.candidate_index[idx, order]
    new_dist[:, :k] = topk.distances[idx, order]
    info = {
        **(meta or {}), "scorer": scorer_conf, "rerank_k": k, "retrieval_topk": str(topk_path),
        "seconds_per_query_scoring": float(seconds.mean()),
        "seconds_per_query_matching": matches.info["seconds_per_query"],
        "skipped_queries": topk.meta.get("skipped_queries", []),
    }
    out_topk = TopK(topk.query_names, new_names, new_index, new_dist, info)
    write_topk(out, out_topk, extra={"rerank_scores": np.take_along_axis(scores, order, 1)})
    return out_topk
