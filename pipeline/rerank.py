"""Stage 2: re-rank each query's top-K candidates with local features.

Three steps, each materialised on disk so that a change re-runs only what it affects:

1. ``needed_images``: the queries plus the union of their top-K candidates; their
   local features are extracted once per extractor (:mod:`pipeline.local_store`).
2. ``match_topk``: matches of every (query, candidate) pair for one extractor and
   matcher, in a store keyed by the pair (:mod:`pipeline.match_store`): a pair is
   matched once whichever retrieval and K ask for it; parts are written atomically,
   so an interrupted run resumes. Blocks of pairs are read from the feature store by
   a background thread while the matcher runs the block before, batched as the
   matcher can (:meth:`pipeline.matchers.base.Matcher.match_block`).
3. ``score_topk``: a scorer turns each pair's matches into a score; candidates
   are re-ordered by it (ties keep the retrieval order) and written as a new
   top-k file, so the same evaluation applies to retrieval and re-ranking.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pickle
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .args import json_arg
from .gpus import pick_device
from .local_store import FeatureStore, described_keypoints, writer_token
from .match_store import MatchView, PartWriter, scan, store_dir, write_view
from .matchers import build_matcher
from .scorers import build_scorer
from .topk import TopK, read_topk, write_topk

logger = logging.getLogger(__name__)

BLOCK_PAIRS = 512  # pairs per block handed to the matcher (it batches within a block)
CACHE = 512  # images whose features stay on the device while matching (neighbouring queries share candidates)
IMAGES = "images"  # the features of image-input matchers, in store names


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
        t = read_topk(path, made_here=True)
        if k > t.k:
            raise ValueError(f"{path}: re-ranking K={k} exceeds the {t.k} candidates per query")
        for n in t.query_names:
            names[resolve(n)] = None
        for n in t.candidate_names[:, :k].ravel():
            names[resolve(n)] = None
    return list(names)


def _host_feats(d: dict) -> dict:
    """A feature dict as CPU tensors (what the loader thread hands to the device).

    Matchers get the keypoints in the frame of the image the extractor described, the
    frame of ``image_size`` (LightGlue and SuperGlue normalise positions by it): the
    store's original-image keypoints are mapped back (:func:`described_keypoints`)."""
    out = {}
    d = {**d, "keypoints": described_keypoints(d)}
    for key, value in d.items():
        if key == "original_size":
            continue
        if key in ("image_size", "levels"):
            out[key] = torch.as_tensor(np.asarray(value).astype(np.int64))
        else:
            out[key] = torch.from_numpy(np.asarray(value, np.float32))
    return out


class FeatureSource:
    """Feature dicts of an extractor's store: read on the host (``load_host``, in the loader
    thread), then moved to the device (``to_device``)."""

    def __init__(self, index_file, device):
        self.store, self.device = FeatureStore(index_file), torch.device(device)
        self.pin = self.device.type == "cuda"
        self.lock = threading.Lock()  # the store's open-file cache is not thread-safe

    def check(self, names) -> None:
        self.store.check(names)

    def load_host(self, name: str):
        with self.lock:
            d = self.store.get(name)
        if d is None:
            return None
        t = _host_feats(d)
        return {k: v.pin_memory() for k, v in t.items()} if self.pin else t

    def to_device(self, x):
        return {k: v.to(self.device, non_blocking=True) for k, v in x.items()}

    def load(self, name: str):
        x = self.load_host(name)
        return self.to_device(x) if x is not None else None

    def close(self) -> None:
        self.store.close()


class ImageSource:
    """Images for image-input matchers: float RGB ``[3, H, W]`` on the device, resized per the
    matcher's ``resize`` / ``resize_max``; ``sizes[name]`` = ((described w, h), (original w, h)),
    to report positions in original-image pixels (:meth:`to_original`).

    An unreadable image is logged and gives ``None`` (its pairs get no matches).
    """

    def __init__(self, root, resize, device, resize_max=None):
        self.root, self.resize, self.resize_max, self.device = Path(root), resize, resize_max, torch.device(device)
        self.errors: dict[str, str] = {}
        self.sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}

    def check(self, names) -> None:
        missing = [n for n in dict.fromkeys(names) if not (self.root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images are not under {self.root}, e.g. {missing[:3]}")

    def load_host(self, name: str):
        from .images import ImageReadError, load_uint8_sized

        try:
            x, original = load_uint8_sized(self.root / name, self.resize, self.resize_max)
        except ImageReadError as e:
            self.errors[name] = str(e)
            logger.warning("skipped: %s", e)
            return None
        self.sizes[name] = ((x.shape[2], x.shape[1]), original)
        return x.pin_memory() if self.device.type == "cuda" else x

    def to_device(self, x):
        from .images import to_float

        return to_float(x.to(self.device, non_blocking=True))

    def load(self, name: str):
        x = self.load_host(name)
        return self.to_device(x) if x is not None else None

    def to_original(self, pair: tuple[str, str], result: dict) -> dict:
        """A ``points`` result with positions in the two images' original pixels."""
        from .images import to_original_frame

        if "keypoints0" not in result:
            return result
        out = dict(result)
        for side, name in enumerate(pair):
            if name not in self.sizes:  # unreadable: no positions to map
                continue
            described, original = self.sizes[name]
            out[f"keypoints{side}"] = to_original_frame(np.asarray(result[f"keypoints{side}"]), described, original)
        return out

    def close(self) -> None:
        pass


def _prefetch(source, blocks, depth: int = 2):
    """Yield ``(block, {name: host data})`` for each block of pairs, read by a background
    thread while the caller matches the block before (hloc's overlap of I/O and compute).
    Images already handed out in the last few blocks are not read again (``None``: reuse)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    recent: OrderedDict[str, None] = OrderedDict()

    def work():
        try:
            for block in blocks:
                data = {}
                for q_name, c_name in block:
                    for name in (q_name, c_name):
                        if name in data:
                            continue
                        if name in recent:
                            recent.move_to_end(name)
                            data[name] = REUSE
                        else:
                            data[name] = source.load_host(name)
                            recent[name] = None
                            if len(recent) > CACHE // 2:
                                recent.popitem(last=False)
                while not stop.is_set():
                    try:
                        q.put((block, data), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    t = threading.Thread(target=work, name="match-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


#: marks an image the prefetcher handed out recently (the consumer's cache holds it)
REUSE = object()


def input_size(features_conf: dict | None, matcher_conf: dict) -> dict:
    """The image-size settings a re-ranking method's model ran at, defaults filled in: the
    extractor's (or, with no extractor, the image-input matcher's) ``resize`` and
    ``resize_max``, plus a bound the model applies itself (e.g. ``{"max_edge": 1600}``)."""
    from .conf import merge_conf

    if features_conf:
        from .local_features import get_model_class
        from .local_store import model_conf_full, split_conf

        full = model_conf_full(split_conf(features_conf)[0])
        cls = get_model_class(full["name"])
        out = {"resize": full.get("resize"), "resize_max": full.get("resize_max")}
        if cls.size_bound:
            out[cls.size_bound] = full.get(cls.size_bound)
        return out
    from .matchers import get_matcher_class

    cls = get_matcher_class(matcher_conf["name"])
    full = merge_conf({**cls.base_conf, **cls.default_conf}, matcher_conf, f"matcher {matcher_conf['name']}")
    return {"resize": full.get("resize"), "resize_max": full.get("resize_max")}


def _to_numpy(r: dict) -> dict:
    return {k: v.cpu().numpy() for k, v in r.items()}


def match_topk(features: str | Path | None, matcher_conf: dict, topk_path, k: int, out, resolve=lambda n: n,
               device: str = "auto", root=None, store_base=None) -> dict:
    """Match every query with its first ``k`` candidates; write the view file ``out``.

    Pairs are matched into the pair-keyed store under ``store_base`` (default: a
    ``pairs`` folder beside ``out``; see :mod:`pipeline.match_store`): only pairs that no
    earlier run (another K, another retrieval) matched are matched now. ``features`` is the
    feature store's index for feature-input matchers; image-input matchers (LoFTR, CVNet)
    read the images under ``root`` instead (``features`` None).
    """
    out = Path(out)
    topk = read_topk(topk_path, made_here=True)
    if k > topk.k:
        raise ValueError(f"{topk_path}: K={k} exceeds the {topk.k} candidates per query")
    dev = pick_device(device)
    matcher = build_matcher(matcher_conf).eval().to(dev)
    kind = matcher.output
    if matcher.inputs == "images":
        if root is None:
            raise ValueError(f"matcher {matcher_conf['name']!r} reads images: give the dataset root")
        source = ImageSource(root, matcher.conf.get("resize"), dev, matcher.conf.get("resize_max"))
        features_id = IMAGES
    else:
        if features is None:
            raise ValueError(f"matcher {matcher_conf['name']!r} needs local features: give a feature store")
        source = FeatureSource(features, dev)
        features_id = Path(source.store.folder).name
    qnames = [resolve(n) for n in topk.query_names]
    cnames = [[resolve(n) for n in row[:k]] for row in topk.candidate_names]
    source.check(qnames + [n for row in cnames for n in row])
    folder = store_dir(store_base if store_base is not None else out.parent / "pairs", matcher_conf, features_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conf.json").write_text(json.dumps({"matcher": matcher_conf, "features": features_id}, indent=2,
                                                 sort_keys=True))
    index = scan(folder)
    wanted = list(dict.fromkeys((q, c) for q, row in zip(qnames, cnames) for c in row))
    todo = [p for p in wanted if p not in index]
    logger.info("matching %d queries x %d candidates with %s (%s -> %s): %d pairs, %d in %s already, %d to match",
                len(qnames), k, matcher_conf["name"], matcher.inputs, kind, len(wanted), len(wanted) - len(todo),
                folder, len(todo))
    t_start = time.perf_counter()
    if todo:
        writer = PartWriter(folder, kind, writer_token())
        blocks = [todo[i: i + BLOCK_PAIRS] for i in range(0, len(todo), BLOCK_PAIRS)]
        cache: OrderedDict[str, object] = OrderedDict()
        bar = tqdm(total=len(todo), desc=f"match {matcher_conf['name']}", mininterval=2, unit="pair")
        for block, data in _prefetch(source, blocks):
            t0 = time.perf_counter()
            prepared = {}
            with torch.inference_mode():
                for name, x in data.items():
                    if x is REUSE and name in cache:
                        cache.move_to_end(name)
                        prepared[name] = cache[name]
                        continue
                    if x is REUSE:  # dropped from the cache since: read it again
                        x = source.load_host(name)
                    prepared[name] = cache[name] = matcher.prepare(source.to_device(x)) if x is not None else None
                    if len(cache) > CACHE:
                        cache.popitem(last=False)
                results = matcher.match_block([(prepared[q], prepared[c]) for q, c in block])
                results = [_to_numpy(r) for r in results]  # waits for the device
                if kind == "points":  # positions in original-image pixels
                    results = [source.to_original(p, r) for p, r in zip(block, results)]
            each = (time.perf_counter() - t0) / len(block)
            writer.add(block, results, [each] * len(block))
            bar.update(len(block))
        writer.flush()
        bar.close()
        index = scan(folder)
    source.close()
    missing = [p for p in wanted if p not in index]
    if missing:
        raise RuntimeError(f"{folder}: {len(missing)} pairs were not stored, e.g. {missing[:2]}")
    info = {"matcher": matcher_conf, "kind": kind, "features": str(features) if features else None,
            "device": str(dev), "pairs": len(wanted), "pairs_matched_this_run": len(todo),
            "pairs_reused": len(wanted) - len(todo), "match_seconds_this_run": time.perf_counter() - t_start,
            "unreadable_images": getattr(source, "errors", {})}
    if kind == "points":
        info["points_frame"] = "original"
    info = write_view(out, folder, index, qnames, cnames, info)
    logger.info("%s: %.3f s/query%s (%d pairs matched now, %d reused)", out, info["seconds_per_query"],
                f", {info['mean_matches']:.0f} matches per pair" if "mean_matches" in info else "",
                len(todo), len(wanted) - len(todo))
    return info


#: the match stage's output is a view into the pair-keyed store
Matches = MatchView


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


def feature_bytes_per_image(features) -> float | None:
    """Disk bytes of a feature store per image it holds (what caching local features for a
    database costs: times 1e6 for a million images). None for a store without the record."""
    info = json.loads(Path(features).read_text())
    n = len(info.get("images") or {})
    return float(info["store_bytes"]) / n if n and info.get("store_bytes") is not None else None


#: images whose keypoints a scoring process keeps in memory
SCORE_CACHE = 4096


class QueryScorer:
    """Scores one query's candidates from the stored matches (one per process of a pool)."""

    def __init__(self, features, matches_path, scorer_conf: dict, qnames: list[str], cnames: list[list[str]],
                 similarity: np.ndarray):
        self.matches = Matches(matches_path)
        self.scorer = build_scorer(scorer_conf)
        self.store = FeatureStore(features) if self.matches.kind == "matches" else None
        self.qnames, self.cnames, self.similarity = qnames, cnames, similarity
        self.cache: OrderedDict[str, dict | None] = OrderedDict()

    def __call__(self, qi: int) -> tuple[np.ndarray, float]:
        """``(scores [K], seconds)`` of query ``qi``."""
        t0 = time.perf_counter()
        matches, scorer, store, k = self.matches, self.scorer, self.store, len(self.cnames[qi])
        if matches.kind == "pair_score":
            raw = np.stack([matches.pair_score(qi, rank) for rank in range(k)]).astype(np.float64)
            return scorer.score_query(raw, self.similarity[qi]), time.perf_counter() - t0
        q = self._features(self.qnames[qi]) if store else {}
        raws = []
        for rank in range(k):
            m = matches.pair(qi, rank)
            if matches.kind == "points":
                kq, kc, c = m[:, :2], m[:, 2:], {}
                m = np.repeat(np.arange(len(m))[:, None], 2, 1)
            else:
                c = self._features(self.cnames[qi][rank])
                kq, kc = self._keypoints(q), self._keypoints(c)
            if q is None or c is None or not len(m):
                raws.append(None)
                continue
            raws.append(scorer.score_pair(kq, kc, m, q, c))
        width = max((len(r) for r in raws if r is not None), default=1)
        raw = np.array([r if r is not None else np.zeros(width) for r in raws], dtype=np.float64)
        return scorer.finalize(raw), time.perf_counter() - t0

    def _features(self, name: str):
        """An image's features without descriptors (scorers use positions), from a cache:
        neighbouring queries share candidates."""
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        d = self.cache[name] = self.store.get(name, exclude=("descriptors",))
        if len(self.cache) > SCORE_CACHE:
            self.cache.popitem(last=False)
        return d

    def _keypoints(self, feats):
        """Keypoints in the scorer's frame (stores hold original-image pixels)."""
        if feats is None:
            return None
        return described_keypoints(feats) if self.scorer.conf["frame"] == "model" else feats["keypoints"]

    def close(self):
        if self.store:
            self.store.close()


_WORKER: QueryScorer | None = None


def _worker_init(args_file: str):
    global _WORKER
    cv2.setNumThreads(1)  # one process per core already
    with open(args_file, "rb") as f:
        _WORKER = QueryScorer(*pickle.load(f))


def _worker_score(qi: int):
    return qi, *_WORKER(qi)


def _worker_up() -> bool:
    return _WORKER is not None


#: whether the main process scores queries too while the pool works (tests turn it off
#: to send every query through the pool)
MAIN_SCORES = True


def _score_in_processes(args, n: int, workers: int, scores, seconds, bar) -> int:
    """Score queries ``0..n-1`` in this process and ``workers - 1`` others.

    Starting a process costs seconds (it imports torch), as much as scoring a small
    top-k: so this process scores queries from the front of the list from the start,
    while the pool, once up, takes queries from the back (a few in flight per process);
    they meet in the middle. A cheap scorer is done before the pool has started, an
    expensive one keeps every process busy. Every query is scored by exactly one
    process with the same per-pair seeds, so the scores are those of one process.

    A worker that dies (killed for memory, a crash in its set-up) breaks the pool: the
    queries it had are scored here, with a warning, instead of waiting for them forever.
    Returns how many queries the pool scored.
    """
    # spawned, not forked: a fork of a process that ran OpenMP / torch threads can hang
    ctx = mp.get_context("spawn")
    logger.info("scoring %d queries in %d processes", n, workers)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one process per core
    one = QueryScorer(*args)
    front, back, in_pool = 0, n, 0
    pending: dict = {}  # future -> query index
    rest: list[int] = []  # queries of a broken pool, left to this process
    # the scorer's arguments (all queries' candidate names: megabytes at SF-XL scale) go
    # through a file: through the spawn pipe, a start would block this process until the
    # child had imported torch and read them
    tmp = tempfile.TemporaryDirectory(prefix="vg-score-")
    args_file = Path(tmp.name) / "args.pkl"
    args_file.write_bytes(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
    others = set(mp.active_children())  # children that are not the pool's (left alone when it stops)
    pool = ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_worker_init, initargs=(str(args_file),))
    try:
        up = pool.submit(_worker_up)  # answered once a worker has initialised
        broken = None
        while front < back or pending:
            for f in [f for f in pending if f.done()]:
                qi = pending.pop(f)
                try:
                    _, scores[qi], seconds[qi] = f.result()
                except BrokenProcessPool as e:
                    broken, _ = e, rest.append(qi)
                    continue
                in_pool += 1
                bar.update(1)
            if broken is None and up.done() and up.exception() is not None:
                broken = up.exception()
            if broken is not None:
                rest += list(pending.values())
                pending.clear()
                break
            # queries go to the pool only once it is up: a query queued to a pool still
            # starting would wait there after this process had scored all the others
            while up.done() and front < back and len(pending) < 2 * (workers - 1):
                back -= 1
                pending[pool.submit(_worker_score, back)] = back
            if front < back and MAIN_SCORES:
                scores[front], seconds[front] = one(front)
                front += 1
                bar.update(1)
            else:
                wait(list(pending) or [up], timeout=0.05, return_when=FIRST_COMPLETED)
        if broken is not None:
            rest += list(range(front, back))
            logger.warning("scoring pool broke (%s): %d queries scored in this process instead",
                           repr(broken), len(rest))
            for qi in sorted(rest):
                scores[qi], seconds[qi] = one(qi)
                bar.update(1)
    finally:
        _stop_pool(pool, others)  # idle, or still starting up when this process scored everything
        tmp.cleanup()
        one.close()
        cv2.setNumThreads(threads)
    logger.info("%d of %d queries scored in the pool", in_pool, n)
    return in_pool


def _stop_pool(pool: ProcessPoolExecutor, others: set) -> None:
    """Shut the pool down without waiting for workers still importing torch: its workers are
    this process's children started since the pool was made (``others``: the ones before)."""
    procs = [p for p in mp.active_children() if p not in others]
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)


def score_topk(features, matches_path, scorer_conf: dict, topk_path, k: int, out, resolve=lambda n: n,
               meta: dict | None = None, workers: int = 1, merge_into=None) -> TopK:
    """Score the first ``k`` candidates of every query and write the re-ranked top-k file.

    ``features`` (the feature store's index) is needed for index matches only: matches
    of image-input matchers hold positions, and pair scores need no keypoints.
    ``workers`` > 1 scores queries in that many processes (RANSAC is seeded per pair, so
    the scores are the ones one process gives). ``merge_into``: the full retrieval list, when
    ``topk_path`` holds only the queries a gate sent (:func:`merge_reranked`).
    """
    topk = read_topk(topk_path, made_here=True)
    matches = Matches(matches_path)
    if len(topk) == 0:  # a gate that sent no query: nothing was matched, nothing to score
        k = matches.k
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
    if matches.kind == "points" and scorer.conf["frame"] != "original":
        raise ValueError(f"scorer {scorer_conf['name']!r}: frame {scorer.conf['frame']!r} needs index matches of a "
                         f"feature store; {matches_path} holds positions of an image-input matcher, which are in "
                         "original-image pixels (use frame: original)")
    if matches.kind == "matches" and features is None:
        raise ValueError(f"{matches_path} holds index matches: the feature store is needed to score them")
    extraction = extraction_seconds(features, topk, k, resolve) if features is not None else None
    similarity = similarity_from_distances(topk.distances[:, :k])
    qnames = [resolve(n) for n in topk.query_names]
    cnames = [[resolve(n) for n in row[:k]] for row in topk.candidate_names]
    args = (str(features) if features is not None else None, str(matches_path), scorer_conf, qnames, cnames, similarity)
    scores = np.zeros((len(topk), k))
    seconds = np.zeros(len(topk))
    bar = tqdm(total=len(topk), desc=f"score {scorer_conf['name']}", mininterval=2, unit="query")
    workers = max(1, min(int(workers), len(topk)))
    if len(topk) == 0:
        pass  # a gate that sent no query
    elif workers == 1:
        one = QueryScorer(*args)
        for qi in range(len(topk)):
            scores[qi], seconds[qi] = one(qi)
            bar.update(1)
        one.close()
    else:
        _score_in_processes(args, len(topk), workers, scores, seconds, bar)
    bar.close()
    # stable sort on -score: ties keep the retrieval order
    order = np.argsort(-scores, axis=1, kind="stable")
    idx = np.arange(len(topk))[:, None]
    new_names = topk.candidate_names.copy()
    new_index = topk.candidate_index.copy()
    new_dist = topk.distances.copy()
    new_names[:, :k] = topk.candidate_names[idx, order]
    new_index[:, :k] = topk.candidate_index[idx, order]
    new_dist[:, :k] = topk.distances[idx, order]
    info = {
        **(meta or {}), "scorer": scorer_conf, "rerank_k": k, "retrieval_topk": str(topk_path),
        "seconds_per_query_scoring": float(seconds.mean()) if len(seconds) else 0.0,
        "seconds_per_query_matching": matches.seconds_per_query(k),
        # local features of the query and its K candidates (image-input matchers: inside matching)
        "seconds_per_query_extraction": extraction,
        "feature_bytes_per_image": feature_bytes_per_image(features) if features is not None else None,
        "skipped_queries": topk.meta.get("skipped_queries", []),
    }
    out_topk = TopK(topk.query_names, new_names, new_index, new_dist, info)
    out_scores = np.take_along_axis(scores, order, 1)
    if merge_into is not None:  # a gate sent only these queries: the others keep the retrieval's order
        out_topk, out_scores = merge_reranked(read_topk(merge_into, made_here=True), out_topk, out_scores,
                                              topk.meta.get("gate"))
    write_topk(out, out_topk, extra={"rerank_scores": out_scores})
    return out_topk


def merge_reranked(full: TopK, part: TopK, part_scores: np.ndarray, gate: dict | None = None) -> tuple[TopK, np.ndarray]:
    """The full retrieval list with the re-ranked rows of the queries a gate sent (``part``);
    the others keep the retrieval's order (scores NaN). Times per query become means over
    every query (a query not re-ranked costs nothing but the gate: ``gate``, its record)."""
    try:
        rows = full.rows_of(list(part.query_names))
    except ValueError as err:
        raise ValueError(f"gated queries not in the retrieval list: {err}") from None
    names, index, dist = full.candidate_names.copy(), full.candidate_index.copy(), full.distances.copy()
    scores = np.full((len(full), part_scores.shape[1] if part_scores.ndim == 2 else 0), np.nan)
    names[rows], index[rows], dist[rows] = part.candidate_names, part.candidate_index, part.distances
    if len(rows):
        scores[rows] = part_scores
    share = len(part) / max(len(full), 1)
    meta = dict(part.meta)
    for key in ("seconds_per_query_scoring", "seconds_per_query_matching", "seconds_per_query_extraction"):
        if meta.get(key) is not None:
            meta[key] = float(meta[key]) * share
    gate = dict(gate or {})
    meta["gate"] = gate
    meta["seconds_per_query_gate"] = float(gate.get("seconds", 0.0)) / max(len(full), 1)
    meta["fraction_reranked"] = share
    meta["skipped_queries"] = full.meta.get("skipped_queries", [])
    return TopK(full.query_names, names, index, dist, meta), scores


def name_resolver(root, index_dir):
    """Names of a top-k file -> dataset-relative names (:class:`NameResolver`; identity without a root)."""
    return NameResolver(root, index_dir) if root else (lambda n: n)


def _match_arguments(p):
    p.add_argument("--features", default=None, help="feature store index (JSON); none for image-input matchers")
    p.add_argument("--conf", type=json_arg, required=True, help="matcher conf (JSON)")
    p.add_argument("--topk", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--root", default=None)
    p.add_argument("--index-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--store-base", default=None,
                   help="folder of the pair-keyed match stores (default: 'pairs' beside --out)")


def _match(a):
    match_topk(a.features, a.conf, a.topk, a.k, a.out, name_resolver(a.root, a.index_dir), a.device, root=a.root,
               store_base=a.store_base)


def _score_arguments(p):
    p.add_argument("--features", default=None, help="feature store index (JSON), for index matches")
    p.add_argument("--matches", required=True)
    p.add_argument("--conf", type=json_arg, required=True, help="scorer conf (JSON)")
    p.add_argument("--topk", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--meta", type=json_arg, default={})
    p.add_argument("--root", default=None)
    p.add_argument("--index-dir", default=None)
    p.add_argument("--workers", type=int, default=1, help="processes scoring queries in parallel")
    p.add_argument("--merge-into", default=None,
                   help="the full retrieval list (--topk holds the queries a gate sent; the others keep their order)")


def _score(a):
    score_topk(a.features, a.matches, a.conf, a.topk, a.k, a.out, name_resolver(a.root, a.index_dir), a.meta,
               workers=a.workers, merge_into=a.merge_into)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"match": (_match_arguments, _match), "score": (_score_arguments, _score)}
