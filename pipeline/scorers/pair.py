"""Scores of learned pair models (RRT, CVNet), optionally combined with the retrieval similarity.

The matcher stage stores each pair's ``pair_score`` vector; this scorer picks
component ``index`` and returns ``model_weight * score + global_weight * cos``,
where ``cos`` is the cosine similarity of the query's and the candidate's global
descriptors in the retrieval stage (recovered from FAISS's squared L2 distance of
L2-normalised descriptors: ``cos = 1 - d / 2``). RRT ranks by its logit alone
(``global_weight: 0``); CVNet adds the global similarity to its weighted
re-ranking score.
"""

from __future__ import annotations

import numpy as np

from .base import Scorer


class PairScore(Scorer):
    needs = "pair_score"
    default_conf = {"index": 0, "model_weight": 1.0, "global_weight": 0.0}

    def score_query(self, pair_scores, similarity):
        i = self.conf["index"]
        if not 0 <= i < pair_scores.shape[1]:
            raise ValueError(f"pair_score: index {i} but the pair scores have {pair_scores.shape[1]} components")
        s = pair_scores[:, i]
        # a pair that could not be scored (unreadable image) stores -inf: rank it last
        s = np.where(np.isfinite(s), s, -1e9)
        return self.conf["model_weight"] * s + self.conf["global_weight"] * similarity
