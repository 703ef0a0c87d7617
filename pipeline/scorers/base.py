"""Base class for scorers."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..global_features.base import merge_conf


class Scorer:
    """Scores a query's candidates from their matches; higher is better.

    ``score_pair(kq, kc, matches, q, c)`` gets the query's and the candidate's
    keypoints (``[N, 2]`` pixels of the described images), the matches (``[M, 2]``
    indices into them) and the two feature dicts (for ``levels``,
    ``image_size``, ...) and returns a vector of raw scores (one per level for
    multi-level scorers). ``finalize(raw [K, L])`` turns the K candidates' raw
    scores into one score each; by default it sums the levels.
    """

    default_conf: dict[str, Any] = {}
    base_conf: dict[str, Any] = {"name": None}
    #: what the scorer reads from the matches file: "matches" (index pairs or
    #: positions) or "pair_score" (a learned pair model's output)
    needs = "matches"

    def __init__(self, conf: dict | None = None):
        self.conf = merge_conf({**self.base_conf, **self.default_conf}, conf, type(self).__name__)

    def score_pair(self, kq: np.ndarray, kc: np.ndarray, matches: np.ndarray, q: dict, c: dict) -> np.ndarray:
        raise NotImplementedError

    def finalize(self, raw: np.ndarray) -> np.ndarray:
        return raw.sum(1)

    def score_query(self, pair_scores: np.ndarray, similarity: np.ndarray) -> np.ndarray:
        """For ``needs = "pair_score"``: one query's ``[K, L]`` pair scores and its
        candidates' retrieval similarities ``[K]`` -> scores ``[K]``."""
        raise NotImplementedError
