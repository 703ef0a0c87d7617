"""Nearest neighbours on descriptor distance: mutual (default) or one-directional, with
optional ratio test, distance threshold and per-level matching.

- ``mutual: false`` keeps every feature of the first image whose nearest neighbour in
  the second is within the thresholds (DELG's KD-tree matching with a distance bound);
- ``by_level: true`` matches features only with features of the same ``levels`` value
  (Patch-NetVLAD matches each patch size separately);
- ``similarity: dot`` finds neighbours by the largest dot product instead of the smallest
  L2 distance (the same on L2-normalised descriptors; TransVPR matches its raw tokens so).
"""

from __future__ import annotations

import torch

from .base import Matcher


class MutualNearestNeighbor(Matcher):
    default_conf = {
        "ratio": None,  # Lowe's ratio test on L2 distances (e.g. 0.9); None: off
        "max_distance": None,  # reject pairs with an L2 distance above this; None: off
        "mutual": True,  # False: nearest neighbour from image 0 to image 1 only
        "by_level": False,  # match within each keypoint level (patch size) separately
        "similarity": "l2",  # "l2": smallest distance; "dot": largest dot product
    }

    def __init__(self, conf=None):
        super().__init__(conf)
        if self.conf["similarity"] not in ("l2", "dot"):
            raise ValueError(f"mnn: similarity must be 'l2' or 'dot', got {self.conf['similarity']!r}")
        if self.conf["similarity"] == "dot" and (self.conf["ratio"] is not None or self.conf["max_distance"] is not None):
            raise ValueError("mnn: ratio and max_distance are L2 tests; they do not apply with similarity: dot")

    def _match(self, d0, d1):
        dist = -(d0 @ d1.t()) if self.conf["similarity"] == "dot" else torch.cdist(d0, d1)
        nn01 = dist.argmin(1)
        idx0 = torch.arange(len(d0), device=d0.device)
        keep = torch.ones(len(d0), dtype=torch.bool, device=d0.device)
        if self.conf["mutual"]:
            keep &= dist.argmin(0)[nn01] == idx0
        best = dist[idx0, nn01]
        if self.conf["ratio"] is not None and dist.shape[1] > 1:
            two = dist.topk(2, dim=1, largest=False).values
            keep &= two[:, 0] <= self.conf["ratio"] * two[:, 1]
        if self.conf["max_distance"] is not None:
            keep &= best <= self.conf["max_distance"]
        return idx0[keep], nn01[keep], best[keep]

    def _forward(self, f0, f1):
        d0, d1 = f0["descriptors"].float(), f1["descriptors"].float()
        if not self.conf["by_level"]:
            m0, m1, best = self._match(d0, d1)
        else:
            if "levels" not in f0 or "levels" not in f1:
                raise ValueError("mnn with by_level: the features have no 'levels'")
            parts = []
            for level in torch.unique(f0["levels"]):
                i0 = torch.nonzero(f0["levels"] == level).flatten()
                i1 = torch.nonzero(f1["levels"] == level).flatten()
                if len(i0) and len(i1):
                    a, b, d = self._match(d0[i0], d1[i1])
                    parts.append((i0[a], i1[b], d))
            if not parts:
                return self.empty()
            m0, m1, best = (torch.cat(x) for x in zip(*parts))
        return {"matches": torch.stack([m0, m1], 1), "scores": 1.0 / (1.0 + best)}
