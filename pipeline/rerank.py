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
    out = {}
    for key, value in d.items():
        if key == "original_size":
            continue
        if key in ("image_size", "levels"):
            out[key] = torch.as_tensor(np.asarray(value).astype(np.int64)).to(device)
        else:
            out[key] = torch.from_numpy(np.asarray(value, np.float32)).to(device)
    return out


class FeatureSource:
    """Feature dicts of an extractor's store, as torch tensors on the device."""

    def __init__(self, index_file, device):
        self.store, self.device = FeatureStore(index_file), device

    def check(self, names) -> None:
        self.store.check(names)

    def load(self, name: str):
        d = self.store.get(name)
        return _torch_feats(d, self.device) if d is not None else None

    def close(self) -> None:
        self.store.close()


class ImageSource:
    """Images for image-input matchers: float RGB ``[3, H, W]`` on the device, resized per ``resize``.

    An unreadable image is logged and gives ``None`` (its pairs get no matches).
    """

    def __init__(self, root, resize, device):
        self.root, self.resize, self.device = Path(root), resize, device
        self.errors: dict[str, str] = {}

    def check(self, names) -> None:
        missing = [n for n in dict.fromkeys(names) if not (self.root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images are not under {self.root}, e.g. {missing[:3]}")

    def load(self, name: str):
        from .images import ImageReadError, load_uint8, to_float

        try:
            return to_float(load_uint8(self.root / name, self.resize).to(self.device))
        except ImageReadError as e:
            self.errors[name] = str(e)
            logger.warning("skipped: %s", e)
            return None

    def close(self) -> None:
        pass


def _block_arrays(kind: str, results: list[dict]) -> dict[str, np.ndarray]:
    """One block's results as arrays (ragged kinds get ``counts``)."""
    if kind == "pair_score":
        return {"pair_scores": np.stack([r["pair_score"].cpu().numpy().astype(np.float32) for r in results])}
    counts = np.asarray([len(r["scores"]) for r in results], np.int64)
    scores = np.concatenate([r["scores"].cpu().numpy().astype(np.float16) for r in results])
    if kind == "points":
        pts = [torch.cat([r["keypoints0"], r["keypoints1"]], 1).cpu().numpy().astype(np.float32) for r in results]
        return {"points": np.concatenate(pts).reshape(-1, 4), "scores": scores, "counts": counts}
    m = [r["matches"].cpu().numpy().astype(np.int32) for r in results]
    return {"matches": np.concatenate(m).reshape(-1, 2), "scores": scores, "counts": counts}


def match_topk(features: str | Path | None, matcher_conf: dict, topk_path, k: int, out, resolve=lambda n: n,
               device: str = "auto", root=None) -> dict:
    """Run a matcher on every query and its first ``k`` candidates; write the matches file.

    ``features`` is the feature store's index for feature-input matchers; image-input
    matchers (LoFTR, CVNet) read the images under ``root`` instead (``features`` None).
    """
    out = Path(out)
    topk = read_topk(topk_path)
    if k > topk.k:
        raise ValueError(f"{topk_path}: K={k} exceeds the {topk.k} candidates per query")
    dev = pick_device(device)
    matcher = build_matcher(matcher_conf).eval().to(dev)
    kind = matcher.output
    if matcher.inputs == "images":
        if root is None:
            raise ValueError(f"matcher {matcher_conf['name']!r} reads images: give the dataset root")
        source = ImageSource(root, matcher.conf.get("resize"), dev)
    else:
        if features is None:
            raise ValueError(f"matcher {matcher_conf['name']!r} needs local features: give a feature store")
        source = FeatureSource(features, dev)
    qnames = [resolve(n) for n in topk.query_names]
    cnames = [[resolve(n) for n in row[:k]] for row in topk.candidate_names]
    source.check(qnames + [n for row in cnames for n in row])
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    sig = json.dumps({"matcher": matcher_conf, "k": k, "topk": str(topk_path), "features": str(features)}, sort_keys=True)
    sig_file = parts / "signature.json"
    if sig_file.exists() and sig_file.read_text() != sig:
        logger.warning("%s: left over from other settings, starting over", parts)
        for p in parts.glob("block_*.npz"):
            p.unlink()
    sig_file.write_text(sig)
    n_q = len(qnames)
    blocks = range(0, n_q, BLOCK)
    done = {int(p.stem.split("_")[1]) for p in parts.glob("block_*.npz")}
    logger.info("matching %d queries x %d candidates with %s (%s -> %s; %d blocks, %d done)",
                n_q, k, matcher_conf["name"], matcher.inputs, kind, len(blocks), len(done))
    bar = tqdm(total=n_q, desc=f"match {matcher_conf['name']}", mininterval=2, unit="query")
    cache: OrderedDict[str, object] = OrderedDict()

    def prepared(name):
        """The matcher's per-image preparation, computed once while it stays in the cache."""
        if name in cache:
            cache.move_to_end(name)
            return cache[name]
        x = source.load(name)
        with torch.inference_mode():
            cache[name] = matcher.prepare(x) if x is not None else None
        if len(cache) > CACHE:
            cache.popitem(last=False)
        return cache[name]

    for start in blocks:
        if start in done:
            bar.update(min(BLOCK, n_q - start))
            continue
        results, seconds = [], []
        for qi in range(start, min(n_q, start + BLOCK)):
            t0 = time.perf_counter()
            pq = prepared(qnames[qi])
            results += matcher.forward_many(pq, [prepared(n) for n in cnames[qi]])
            seconds.append(time.perf_counter() - t0)
            bar.update(1)
        with atomic_path(parts / f"block_{start:08d}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, seconds=np.asarray(seconds), **_block_arrays(kind, results))
    bar.close()
    source.close()
    # assemble the blocks into the final file
    blocks_data = []
    for start in blocks:
        with np.load(parts / f"block_{start:08d}.npz") as b:
            blocks_data.append({key: b[key] for key in b.files})
    seconds = np.concatenate([b["seconds"] for b in blocks_data])
    info = {"matcher": matcher_conf, "kind": kind, "k": k, "n_queries": n_q,
            "seconds_per_query": float(seconds.mean()) if len(seconds) else 0.0, "device": str(dev),
            "unreadable_images": getattr(source, "errors", {})}
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            if kind == "pair_score":
                f.create_dataset("pair_scores", data=np.concatenate([b["pair_scores"] for b in blocks_data]))
            else:
                counts = np.concatenate([b["counts"] for b in blocks_data])
                info["mean_matches"] = float(counts.mean()) if len(counts) else 0.0
                key, width = ("points", 4) if kind == "points" else ("matches", 2)
                f.create_dataset(key, data=np.concatenate([b[key] for b in blocks_data]).reshape(-1, width),
                                 compression="gzip")
                f.create_dataset("scores", data=np.concatenate([b["scores"] for b in blocks_data]), compression="gzip")
                f.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(counts)]))
            f.create_dataset("seconds", data=seconds)
            f.create_dataset("query_names", data=np.array(qnames, dtype=object), dtype=h5py.string_dtype())
            f.attrs["info"] = json.dumps(info)
    for p in parts.glob("*"):
        p.unlink()
    parts.rmdir()
    logger.info("%s: %.3f s/query%s", out, info["seconds_per_query"],
                f", {info['mean_matches']:.0f} matches per pair" if "mean_matches" in info else "")
    return info


class Matches:
    """Read access to a matches file written by :func:`match_topk`."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self.info = json.loads(f.attrs["info"])
                self.kind = self.info.get("kind", "matches")
                if self.kind == "pair_score":
                    self.pair_scores = f["pair_scores"][:]
                else:
                    self.matches = f["points" if self.kind == "points" else "matches"][:]
                    self.offsets = f["offsets"][:]
                self.seconds = f["seconds"][:]
        except (OSError, KeyError) as e:
            raise ValueError(f"{self.path}: damaged matches file ({e}); delete it to match again") from None
        self.k = self.info["k"]

    def pair(self, qi: int, rank: int) -> np.ndarray:
        """Index pairs ``[M, 2]`` (kind "matches") or positions ``[M, 4]`` (x0, y0, x1, y1; kind "points")."""
        j = qi * self.k + rank
        return self.matches[self.offsets[j] : self.offsets[j + 1]]

    def pair_score(self, qi: int, rank: int) -> np.ndarray:
        return self.pair_scores[qi * self.k + rank]


def similarity_from_distances(distances: np.ndarray) -> np.ndarray:
    """Cosine similarity of L2-normalised descriptors from FAISS's squared L2 distances."""
    return 1.0 - np.asarray(distances, np.float64) / 2.0


def extraction_seconds(features, topk: TopK, k: int, resolve=lambda n: n) -> float | None:
    """Mean over queries of the extraction time of the query and its first ``k`` candidates
    (each candidate counted for every query that re-ranks it, as a query would pay it alone).
    None when the store has no timings (made before they were recorded)."""
    info = json.loads(Path(features).read_text())
    sec = info.get("image_seconds")
    if not sec:
        return None
    per_query = []
    for qi, q in enumerate(topk.query_names):
        names = [resolve(q)] + [resolve(n) for n in topk.candidate_names[qi, :k]]
        per_query.append(sum(sec.get(n, 0.0) for n in names))
    value = float(np.mean(per_query)) if per_query else 0.0
    return None if np.isnan(value) else value


def score_topk(features, matches_path, scorer_conf: dict, topk_path, k: int, out, resolve=lambda n: n,
               meta: dict | None = None) -> TopK:
    """Score the first ``k`` candidates of every query and write the re-ranked top-k file.

    ``features`` (the feature store's index) is needed for index matches only: matches
    of image-input matchers hold positions, and pair scores need no keypoints.
    """
    topk = read_topk(topk_path)
    matches = Matches(matches_path)
    if matches.k < k:
        raise ValueError(f"{matches_path}: holds matches for K={matches.k} candidates, fewer than K={k}")
    if matches.info["n_queries"] != len(topk):
        raise ValueError(f"{matches_path}: made for {matches.info['n_queries']} queries, {topk_path} has {len(topk)}")
    scorer = build_scorer(scorer_conf)
    if scorer.needs != ("pair_score" if matches.kind == "pair_score" else "matches"):
        raise ValueError(
            f"scorer {scorer_conf['name']!r} needs {scorer.needs}, but {matches_path} holds {matches.kind} "
            f"(matcher {matches.info['matcher'].get('name')!r}): pair scores need the pair_score scorer, "
            "matches a geometric scorer"
        )
    store = None
    if matches.kind == "matches":
        if features is None:
            raise ValueError(f"{matches_path} holds index matches: the feature store is needed to score them")
        store = FeatureStore(features)
    extraction = extraction_seconds(features, topk, k, resolve) if features is not None else None
    similarity = similarity_from_distances(topk.distances[:, :k])
    scores = np.zeros((len(topk), k))
    order = np.zeros((len(topk), k), dtype=np.int64)
    seconds = np.zeros(len(topk))
    for qi in tqdm(range(len(topk)), desc=f"score {scorer_conf['name']}", mininterval=2, unit="query"):
        t0 = time.perf_counter()
        if matches.kind == "pair_score":
            raw = np.stack([matches.pair_score(qi, rank) for rank in range(k)]).astype(np.float64)
            scores[qi] = scorer.score_query(raw, similarity[qi])
        else:
            q = store.get(resolve(topk.query_names[qi])) if store else {}
            raw = []
            for rank in range(k):
                m = matches.pair(qi, rank)
                if matches.kind == "points":
                    kq, kc, c = m[:, :2], m[:, 2:], {}
                    m = np.repeat(np.arange(len(m))[:, None], 2, 1)
                else:
                    c = store.get(resolve(topk.candidate_names[qi, rank]))
                    kq, kc = (q["keypoints"] if q is not None else None), (c["keypoints"] if c is not None else None)
                if q is None or c is None or not len(m):
                    raw.append(None)
                    continue
                raw.append(scorer.score_pair(kq, kc, m, q, c))
            width = max((len(r) for r in raw if r is not None), default=1)
            raw = np.array([r if r is not None else np.zeros(width) for r in raw], dtype=np.float64)
            scores[qi] = scorer.finalize(raw)
        # stable sort on -score: ties keep the retrieval order
        order[qi] = np.argsort(-scores[qi], kind="stable")
        seconds[qi] = time.perf_counter() - t0
    if store:
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
        # local features of the query and its K candidates (image-input matchers: inside matching)
        "seconds_per_query_extraction": extraction,
        "skipped_queries": topk.meta.get("skipped_queries", []),
    }
    out_topk = TopK(topk.query_names, new_names, new_index, new_dist, info)
    write_topk(out, out_topk, extra={"rerank_scores": np.take_along_axis(scores, order, 1)})
    return out_topk
