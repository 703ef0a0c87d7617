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

from .base import Matcher, pad_features


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

    def pair_bytes(self, n0, n1):
        return 16 * n0 * n1 + 1024 * (n0 + n1)

    def _forward_block(self, pairs):
        """All pairs as one padded batch: distances past an image's features (and, with
        ``by_level``, across levels) are infinite, so every pair gets its own matches."""
        c = self.conf
        keys = ("keypoints", "descriptors") + (("levels",) if c["by_level"] else ())
        if c["by_level"] and any("levels" not in f for p in pairs for f in p):
            raise ValueError("mnn with by_level: the features have no 'levels'")
        f0, v0, n0 = pad_features([p[0] for p in pairs], keys)
        f1, v1, n1 = pad_features([p[1] for p in pairs], keys)
        d0, d1 = f0["descriptors"], f1["descriptors"]
        if c["similarity"] == "dot":
            dist = -torch.bmm(d0, d1.transpose(1, 2))
        else:
            dist = torch.cdist(d0, d1)
        allowed = v0[:, :, None] & v1[:, None, :]
        if c["by_level"]:
            allowed &= f0["levels"][:, :, None] == f1["levels"][:, None, :]
        dist = dist.masked_fill(~allowed, float("inf"))
        best, nn01 = dist.min(2)
        idx0 = torch.arange(dist.shape[1], device=dist.device)[None].expand(len(pairs), -1)
        keep = v0 & torch.isfinite(best)
        if c["mutual"]:
            keep &= dist.argmin(1).gather(1, nn01) == idx0
        if c["ratio"] is not None and dist.shape[2] > 1:
            two = dist.topk(2, dim=2, largest=False).values
            # as on its own: no ratio test where the other image (or level) has a single feature
            keep &= (two[..., 0] <= c["ratio"] * two[..., 1]) | ~torch.isfinite(two[..., 1])
        if c["max_distance"] is not None:
            keep &= best <= c["max_distance"]
        out = []
        for b in range(len(pairs)):
            m0 = idx0[b][keep[b]]
            if c["by_level"]:  # in level order, as matching level by level returns them
                m0 = m0[torch.argsort(f0["levels"][b][m0], stable=True)]
            m1, d = nn01[b][m0], best[b][m0]
            out.append({"matches": torch.stack([m0, m1], 1), "scores": 1.0 / (1.0 + d)})
        return out
