"""Base class for matchers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..global_features.base import merge_conf


class Matcher(nn.Module):
    """Finds correspondences between the local features of two images.

    ``forward(f0, f1)`` takes two feature dicts as the local extractors produce
    them, as torch tensors: ``keypoints [N, 2]`` (x, y pixels), ``descriptors
    [N, D]``, ``scores [N]`` and ``image_size`` (``[2]``: width, height). It
    returns ``matches [M, 2]`` (int64 indices into f0 and f1) and ``scores [M]``
    (match confidence, higher is better).
    """

    default_conf: dict[str, Any] = {}
    base_conf: dict[str, Any] = {"name": None}

    def __init__(self, conf: dict | None = None):
        super().__init__()
        self.conf = merge_conf({**self.base_conf, **self.default_conf}, conf, type(self).__name__)

    def _forward(self, f0: dict, f1: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, f0: dict, f1: dict) -> dict[str, torch.Tensor]:
        if len(f0["keypoints"]) == 0 or len(f1["keypoints"]) == 0:
            return {"matches": torch.zeros((0, 2), dtype=torch.int64), "scores": torch.zeros(0)}
        out = self._forward(f0, f1)
        return {"matches": out["matches"].long().reshape(-1, 2), "scores": out["scores"].float().reshape(-1)}
