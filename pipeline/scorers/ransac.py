"""RANSAC inlier counts (OpenCV), single- and multi-scale.

``model`` is the transformation fitted: ``homography`` (8 degrees of freedom; the
thesis's default) or ``affine`` (6, as DELG verifies its matches).

RANSAC is seeded (``cv2.setRNGSeed`` before every estimate), so two runs give the
same scores. ``method`` picks OpenCV's estimator: ``ransac`` (the thesis: 24 px,
2000 iterations), ``magsac`` (USAC MAGSAC++) or another USAC variant.
"""

from __future__ import annotations

import cv2
import numpy as np

from .base import Scorer

METHODS = {
    "ransac": cv2.RANSAC,
    "magsac": cv2.USAC_MAGSAC,
    "usac_default": cv2.USAC_DEFAULT,
    "usac_accurate": cv2.USAC_ACCURATE,
    "lmeds": cv2.LMEDS,
}


MODELS = ("homography", "affine")
DIRECTIONS = ("query_to_candidate", "candidate_to_query")


def homography_inliers(p0: np.ndarray, p1: np.ndarray, method: str, threshold: float, max_iters: int,
                       confidence: float, seed: int, model: str = "homography") -> int:
    """Inliers of a homography (or affine map) fitted to ``p0 -> p1`` (0 below 4 / 3 points)."""
    return int(inlier_mask(p0, p1, method, threshold, max_iters, confidence, seed, model).sum())


def inlier_mask(p0: np.ndarray, p1: np.ndarray, method: str = "ransac", threshold: float = 24.0,
                max_iters: int = 2000, confidence: float = 0.995, seed: int = 0, model: str = "homography") -> np.ndarray:
    """Boolean ``[M]``: which correspondences ``p0 -> p1`` the fitted model keeps (for figures too)."""
    if len(p0) < (4 if model == "homography" else 3):
        return np.zeros(len(p0), bool)
    cv2.setRNGSeed(seed)
    if model == "affine":
        _, mask = cv2.estimateAffine2D(
            p0.astype(np.float64), p1.astype(np.float64), method=METHODS[method], ransacReprojThreshold=threshold,
            maxIters=max_iters, confidence=confidence, refineIters=0,
        )
    else:
        _, mask = cv2.findHomography(
            p0.astype(np.float64), p1.astype(np.float64), METHODS[method], threshold,
            maxIters=max_iters, confidence=confidence,
        )
    return np.zeros(len(p0), bool) if mask is None else mask.ravel().astype(bool)


class RansacInliers(Scorer):
    default_conf = {"method": "ransac", "threshold": 24.0, "max_iters": 2000, "confidence": 0.995, "seed": 0,
                    "model": "homography",
                    "min_matches": None,  # score 0 below this many matches (DELG: 4); None: the model's minimum
                    # fit query -> candidate (threshold in candidate pixels), or candidate -> query with the
                    # matches in candidate order (Patch-NetVLAD's local_matcher.py)
                    "direction": "query_to_candidate"}

    def __init__(self, conf=None):
        super().__init__(conf)
        if self.conf["method"] not in METHODS:
            raise ValueError(f"ransac: unknown method {self.conf['method']!r}; choose from {sorted(METHODS)}")
        if self.conf["model"] not in MODELS:
            raise ValueError(f"ransac: unknown model {self.conf['model']!r}; choose from {list(MODELS)}")
        if self.conf["direction"] not in DIRECTIONS:
            raise ValueError(f"ransac: direction must be one of {DIRECTIONS}, got {self.conf['direction']!r}")

    def match_mask(self, kq, kc, matches, threshold) -> np.ndarray:
        """Boolean ``[M]`` (in the order of ``matches``): the matches one RANSAC fit at
        ``threshold`` keeps, with this scorer's direction, point order and seed."""
        c_ = self.conf
        matches = np.asarray(matches, np.int64).reshape(-1, 2)
        args = (c_["method"], threshold, c_["max_iters"], c_["confidence"], c_["seed"], c_["model"])
        if c_["direction"] == "candidate_to_query":  # fitted in candidate order (Patch-NetVLAD)
            order = np.argsort(matches[:, 1], kind="stable")
            ms = matches[order]
            out = np.zeros(len(matches), bool)
            out[order] = inlier_mask(kc[ms[:, 1]], kq[ms[:, 0]], *args)
            return out
        return inlier_mask(kq[matches[:, 0]], kc[matches[:, 1]], *args)

    def inliers(self, kq, kc, matches, threshold) -> int:
        return int(self.match_mask(kq, kc, matches, threshold).sum())

    def inlier_mask(self, kq, kc, matches, q: dict | None = None, c: dict | None = None) -> np.ndarray:
        """Boolean ``[M]``: the matches this scorer counts as inliers (figures draw these;
        :meth:`score_pair` is their count)."""
        c_ = self.conf
        if c_["min_matches"] is not None and len(matches) < c_["min_matches"]:
            return np.zeros(len(matches), bool)
        return self.match_mask(kq, kc, matches, c_["threshold"])

    def score_pair(self, kq, kc, matches, q, c):
        return np.array([float(self.inlier_mask(kq, kc, matches, q, c).sum())])


class MultiScaleRansac(RansacInliers):
    """Patch-NetVLAD's multi-scale RANSAC: per keypoint level (patch size), inliers
    divided by the query's keypoints at that level, each level z-normalised over the
    query's candidates, then summed with ``weights``. ``thresholds`` gives each
    level's reprojection threshold (Patch-NetVLAD: 1.5 x stride x 16 px)."""

    default_conf = {**RansacInliers.default_conf, "weights": [1.0], "thresholds": None}

    def level_masks(self, kq, kc, matches, q: dict | None, c: dict | None):
        """``(level, matches of that level [M] bool, their inliers [M] bool)`` per level: one
        RANSAC fit per keypoint level, at that level's threshold."""
        c_ = self.conf
        matches = np.asarray(matches, np.int64).reshape(-1, 2)
        lq = np.asarray((q or {}).get("levels", np.zeros(len(kq), np.int16)))
        lc = np.asarray((c or {}).get("levels", np.zeros(len(kc), np.int16)))
        for level in range(len(c_["weights"])):
            keep = (lq[matches[:, 0]] == level) & (lc[matches[:, 1]] == level)
            inl = np.zeros(len(matches), bool)
            thr = c_["thresholds"][level] if c_["thresholds"] else c_["threshold"]
            if c_["min_matches"] is None or keep.sum() >= c_["min_matches"]:
                inl[np.flatnonzero(keep)] = self.match_mask(kq, kc, matches[keep], thr)
            yield level, keep, inl

    def inlier_mask(self, kq, kc, matches, q: dict | None = None, c: dict | None = None) -> np.ndarray:
        """The union of the per-level inliers."""
        out = np.zeros(len(matches), bool)
        for _, _, inl in self.level_masks(kq, kc, matches, q, c):
            out |= inl
        return out

    def score_pair(self, kq, kc, matches, q, c):
        lq = q.get("levels", np.zeros(len(kq), np.int16))
        out = np.zeros(len(self.conf["weights"]))
        for level, _, inl in self.level_masks(kq, kc, matches, q, c):
            out[level] = int(inl.sum()) / max(1, int((lq == level).sum()))
        return out

    def finalize(self, raw):
        return zscore_weighted(raw, self.conf["weights"])


def zscore_weighted(raw: np.ndarray, weights) -> np.ndarray:
    """Per level (column): (x - mean) / std over the candidates, then the weighted sum."""
    if raw.shape[1] != len(weights):
        raise ValueError(f"{raw.shape[1]} levels but {len(weights)} weights")
    std = raw.std(0)
    z = (raw - raw.mean(0)) / np.where(std > 0, std, 1.0)
    return z @ np.asarray(weights, dtype=np.float64)
