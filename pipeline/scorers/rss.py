"""Rapid Spatial Scoring (Patch-NetVLAD, Hausler et al. CVPR 2021).

For the matches of one level, the displacements between matched positions (on
the patch grid: pixels divided by ``cell_size``, one value or one per level: 16 x
stride for Patch-NetVLAD) are compared with their mean; a match scores
``(x_max - |dx - mean dx|)^2 + (y_max - |dy - mean dy|)^2`` where ``x_max``/``y_max``
are the largest grid indices of the query's patches at that level (upstream's
``Wout - 1``, ``Hout - 1``: the extent of the grid, whatever offset the keypoint
positions have), and
the level's score is the sum over matches divided by the query's number of
features at that level. Levels are z-normalised over the candidates and summed
with ``weights``, as in Patch-NetVLAD (there, lower is better; here the sign is
flipped so that higher is better).
"""

from __future__ import annotations

import numpy as np

from .base import Scorer
from .ransac import zscore_weighted


class RapidSpatialScoring(Scorer):
    default_conf = {"cell_size": 1.0, "weights": [1.0]}

    def score_pair(self, kq, kc, matches, q, c):
        weights = self.conf["weights"]
        cells = self.conf["cell_size"]
        cells = [float(x) for x in cells] if isinstance(cells, list) else [float(cells)] * len(weights)
        if len(cells) != len(weights):
            raise ValueError(f"rapid_spatial: {len(cells)} cell sizes but {len(weights)} weights")
        lq = q.get("levels", np.zeros(len(kq), np.int16))
        lc = c.get("levels", np.zeros(len(kc), np.int16))
        out = np.zeros(len(weights))
        for level in range(len(weights)):
            at_level = lq == level
            keep = at_level[matches[:, 0]] & (lc[matches[:, 1]] == level)
            m = matches[keep]
            if not len(m):
                continue
            cell = cells[level]
            grid_q = np.round(kq[at_level] / cell)
            x_max, y_max = grid_q.max(0) - grid_q.min(0)
            d = np.round(kc[m[:, 1]] / cell) - np.round(kq[m[:, 0]] / cell)
            res = np.abs(d - d.mean(0))
            out[level] = ((x_max - res[:, 0]) ** 2 + (y_max - res[:, 1]) ** 2).sum() / max(1, int(at_level.sum()))
        return out

    def finalize(self, raw):
        return zscore_weighted(raw, self.conf["weights"])
