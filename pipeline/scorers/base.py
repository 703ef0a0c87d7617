"""Base class for scorers."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..conf import merge_conf


#: pixel frames a scorer can work in
FRAMES = ("original", "model")


class Scorer:
    """Scores a query's candidates from their matches; higher is better.

    ``score_pair(kq, kc, matches, q, c)`` gets the query's and the candidate's
    keypoints (``[N, 2]`` pixels, in the scorer's ``frame``), the matches (``[M, 2]``
    indices into them) and the two feature dicts (for ``levels``,
    ``image_size``, ...) and returns a vector of raw scores (one per level for
    multi-level scorers). ``finalize(raw [K, L])`` turns the K candidates' raw
    scores into one score each; by default it sums the levels.

    ``frame``: the pixels that thresholds and cell sizes are in. ``original`` (default):
    the image files' pixels, as feature stores hold keypoints and image-input matchers
    report positions, whatever size a model described the images at. ``model``: the
    pixels of the image the extractor described (its ``resize``), for methods whose
    authors set thresholds on a fixed input size (Patch-NetVLAD's and TransVPR's 24 px on
    480 x 640); only for index matches (positions of image-input matchers are original).
    """

    default_conf: dict[str, Any] = {}
    base_conf: dict[str, Any] = {"name": None, "frame": "original"}
    #: what the scorer reads from the matches file: "matches" (index pairs or
    #: positions) or "pair_score" (a learned pair model's output)
    needs = "matches"

    def __init__(self, conf: dict | None = None):
        self.conf = merge_conf({**self.base_conf, **self.default_conf}, conf, type(self).__name__)
        if self.conf["frame"] not in FRAMES:
            raise ValueError(f"scorer {self.conf['name']!r}: frame must be one of {FRAMES}, not {self.conf['frame']!r}")

    def score_pair(self, kq: np.ndarray, kc: np.ndarray, matches: np.ndarray, q: dict, c: dict) -> np.ndarray:
        raise NotImplementedError

    def finalize(self, raw: np.ndarray) -> np.ndarray:
        return raw.sum(1)

    def score_query(self, pair_scores: np.ndarray, similarity: np.ndarray) -> np.ndarray:
        """For ``needs = "pair_score"``: one query's ``[K, L]`` pair scores and its
        candidates' retrieval similarities ``[K]`` -> scores ``[K]``."""
        raise NotImplementedError
