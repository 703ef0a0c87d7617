"""The number of matches as the score."""

from __future__ import annotations

import numpy as np

from .base import Scorer


class MatchCount(Scorer):
    def score_pair(self, kq, kc, matches, q, c):
        return np.array([float(len(matches))])
