"""Base class for local feature extractors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conf import merge_conf


def weights_file(path, model: str) -> Path:
    """Check a configured weights path; raise naming the model and the path."""
    if not path:
        raise ValueError(f"{model}: no 'weights' path configured (weights are never downloaded)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{model}: weights file {path} not found; set the path to the upstream checkpoint in config.yaml"
        )
    return path


class LocalModel(nn.Module):
    """Detects and describes keypoints in one image.

    ``forward(image)`` takes a float RGB tensor ``[3, H, W]`` in [0, 1] and returns a
    dict of tensors: ``keypoints [N, 2]`` (x, y pixels), ``descriptors [N, D]``
    (L2-normalised, unless the class sets ``normalize_descriptors = False`` because its
    authors match the raw vectors, as TransVPR does) and ``scores [N]``.
    """

    normalize_descriptors: bool = True

    default_conf: dict[str, Any] = {}
    #: ``resize`` (None | longer side | [H, W]) and ``resize_max`` (longer side at most, never
    #: enlarged; :func:`pipeline.images.target_size`): what the loader feeds the model. Each
    #: extractor sets its own documented default (README, "Image sizes"); keypoints are
    #: stored in the original image's pixels whatever the size.
    base_conf: dict[str, Any] = {"name": None, "max_keypoints": 1024, "resize": None, "resize_max": None,
                                 "trust": False}  # trust: see pipeline.checkpoints; not hashed

    #: the conf key of a size bound the model applies itself (upstream's own resizing, e.g.
    #: D2-Net's ``max_edge``), for models whose default ``resize_max`` is None
    size_bound: str | None = None
    #: whether, on a CPU, several images may be described at once in threads (the model
    #: runs outside the GIL and keeps no state between calls, e.g. OpenCV's SIFT): the
    #: store extracts with one thread per core, results identical to one at a time
    cpu_threads_safe: bool = False

    def __init__(self, conf: dict | None = None):
        super().__init__()
        self.conf = merge_conf({**self.base_conf, **self.default_conf}, conf, type(self).__name__)

    @property
    def descriptor_dim(self) -> int:
        raise NotImplementedError

    def _forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        out = self._forward(image)
        out["descriptors"] = out["descriptors"].float()
        if self.normalize_descriptors:
            out["descriptors"] = nn.functional.normalize(out["descriptors"], dim=-1)
        return out
