"""The ``inliers`` gate signal: a re-ranking method's own score of each query's retrieval top-1.

"To Match or Not to Match" (CVPR Workshops 2025) finds that the inliers between a query and
its top-1 predict whether re-ranking will help; SUE (CVPR 2024) ranks that signal first
(AUC-PR 0.93-0.97). The probe runs the gated method's own stage 2 on ONE pair per query:

1. local features of the queries and their top-1 candidates, into the dataset's shared
   feature store (:func:`pipeline.extract_local.extract_local`: images it already holds are
   not extracted again);
2. the (query, top-1) pairs matched into the shared pair-keyed match store
   (:func:`pipeline.rerank.match_topk`);
3. each pair scored by the method's scorer (:func:`pipeline.rerank.score_topk`, K = 1):
   RANSAC inliers for the RANSAC scorers, the model's logit for RRT, CVNet's score.

The score is the confidence (higher = surer); queries below the threshold go to stage 2,
whose extraction and matching then find the probe's images and pairs already stored and
redo none of them. What the probe costs (one pair per query) is the gate's cost.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from .extract_local import extract_local
from .io import write_json
from .rerank import match_topk, name_resolver, needed_images, score_topk
from .topk import TopK, read_extra, write_topk

logger = logging.getLogger(__name__)

#: what a probe needs (the gate rule passes it as JSON): the method's confs and where its
#: dataset's images and stores are
PROBE_KEYS = ("matcher", "scorer", "root", "pair_base")
PROBE_OPTIONAL = {"features": None, "feature_base": None, "index_dir": None, "device": "auto"}


def check_probe(probe: dict) -> dict:
    missing = [k for k in PROBE_KEYS if not probe.get(k)]
    if missing:
        raise ValueError(f"the inliers gate's probe lacks {', '.join(missing)} (keys: {PROBE_KEYS} "
                         f"and optionally {sorted(PROBE_OPTIONAL)})")
    unknown = sorted(set(probe) - set(PROBE_KEYS) - set(PROBE_OPTIONAL))
    if unknown:
        raise ValueError(f"the inliers gate's probe: unknown keys {unknown}")
    out = {**PROBE_OPTIONAL, **probe}
    if out["features"] and not out["feature_base"]:
        raise ValueError("the inliers gate's probe: 'features' needs 'feature_base' (the feature stores' folder)")
    return out


def top1_list(topk: TopK) -> TopK:
    """Each query with its retrieval top-1 only."""
    return TopK(list(topk.query_names), topk.candidate_names[:, :1], topk.candidate_index[:, :1],
                topk.distances[:, :1], {**topk.meta, "k": 1})


def probe_top1(topk: TopK, probe: dict, workdir: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """The method's score of every query's top-1 (in ``topk``'s query order) and what it cost:
    ``{"seconds", "pairs", "extracted", "matched"}``. Queries whose pair could not be scored
    (an unreadable image) get ``-inf``: least sure, so the gate re-ranks them."""
    probe = check_probe(probe)
    t0 = time.perf_counter()
    n = len(topk)
    if n == 0:
        return np.zeros(0), {"seconds": 0.0, "pairs": 0}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="probe_") as tmp:
        tmp = Path(tmp)
        top1_path = tmp / "top1.h5"
        write_topk(top1_path, top1_list(topk))
        resolve = name_resolver(probe["root"], probe["index_dir"])
        features_index = None
        if probe["features"]:
            names = needed_images([(top1_path, 1)], resolve)
            resolve.check(names)
            index = extract_local(probe["features"], probe["root"], names, probe["feature_base"], probe["device"])
            features_index = tmp / "features.json"
            write_json(features_index, index)
        matches = tmp / "matches.h5"
        match_topk(features_index, probe["matcher"], top1_path, 1, matches, resolve, probe["device"],
                   root=probe["root"], store_base=probe["pair_base"])
        scored_path = tmp / "scored.h5"
        scored = score_topk(features_index, matches, probe["scorer"], top1_path, 1, scored_path, resolve)
        scores = read_extra(scored_path, "rerank_scores")[:, 0].astype(np.float64)
    rows = scored.rows_of(list(topk.query_names), strict=False)
    conf = np.where(rows >= 0, scores[np.maximum(rows, 0)], -np.inf)
    conf[~np.isfinite(conf)] = -np.inf
    info = {"seconds": time.perf_counter() - t0, "pairs": n}
    logger.info("inliers probe: %d top-1 pairs scored in %.1f s", n, info["seconds"])
    return conf, info
