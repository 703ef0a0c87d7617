"""Mutual nearest neighbours on descriptor distance, with optional ratio test and distance threshold."""

from __future__ import annotations

import torch

from .base import Matcher


class MutualNearestNeighbor(Matcher):
    default_conf = {
        "ratio": None,  # Lowe's ratio test on L2 distances (e.g. 0.9); None: off
        "max_distance": None,  # reject pairs with an L2 distance above this; None: off
    }

    def _forward(self, f0, f1):
        d0, d1 = f0["descriptors"].float(), f1["descriptors"].float()
        dist = torch.cdist(d0, d1)
        nn01 = dist.argmin(1)
        nn10 = dist.argmin(0)
        idx0 = torch.arange(len(d0), device=d0.device)
        keep = nn10[nn01] == idx0
        best = dist[idx0, nn01]
        if self.conf["ratio"] is not None and dist.shape[1] > 1:
            two = dist.topk(2, dim=1, largest=False).values
            keep &= two[:, 0] <= self.conf["ratio"] * two[:, 1]
        if self.conf["max_distance"] is not None:
            keep &= best <= self.conf["max_distance"]
        m0 = idx0[keep]
        return {"matches": torch.stack([m0, nn01[keep]], 1), "scores": 1.0 / (1.0 + best[keep])}
