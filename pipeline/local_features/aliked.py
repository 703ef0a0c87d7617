"""ALIKED (kornia's implementation) loading the upstream checkpoint file.

Keypoint selection follows upstream (Shiaoming/ALIKED's ``DKD``): its ``simple_nms`` keeps
tied maxima and adds two rounds of maxima recovered outside the kept ones' windows,
where kornia 0.9 keeps strict local maxima only (``nms2d``); in top-k mode that changes
~5-14% of the keypoints. ``nms: upstream`` (default) swaps kornia's NMS for upstream's
while our model runs (kornia's DKD is otherwise upstream's: borders, top-k, soft
refinement); ``nms: strict`` keeps kornia's.
"""

from __future__ import annotations

import threading

import torch

from .base import LocalModel, weights_file
from .superpoint import max_pool_nms_mask

_NMS_LOCK = threading.Lock()


def upstream_nms2d(scores: torch.Tensor, kernel_size, mask_only: bool = True) -> torch.Tensor:
    """Drop-in for kornia's ``nms2d(..., mask_only=True)`` with upstream ALIKED's ``simple_nms``."""
    mask = max_pool_nms_mask(scores, int(kernel_size[0]) // 2)
    return mask if mask_only else scores * mask


class ALIKED(LocalModel):
    default_conf = {"model_name": "aliked-n16", "weights": None, "detection_threshold": 0.0, "nms_radius": 2,
                    "nms": "upstream",
                    "resize_max": 1024}  # hloc's aliked-n16 conf  # "upstream" (simple_nms) or "strict" (kornia's nms2d)

    def __init__(self, conf=None):
        super().__init__(conf)
        import kornia.feature as KF

        c = self.conf
        if c["nms"] not in ("upstream", "strict"):
            raise ValueError(f"ALIKED: nms must be 'upstream' or 'strict', got {c['nms']!r}")
        self.net = KF.ALIKED(
            model_name=c["model_name"], max_num_keypoints=c["max_keypoints"] or -1,
            detection_threshold=c["detection_threshold"], nms_radius=c["nms_radius"],
        )
        path = weights_file(c["weights"], "ALIKED")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The upstream file lacks kornia's derived buffer dkd.hw_grid (kornia loads it non-strictly too).
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.endswith("hw_grid")] + list(unexpected)
        if bad:
            raise ValueError(f"{path}: not an ALIKED {c['model_name']} checkpoint (mismatched keys {bad[:5]})")
        self.eval()

    @property
    def descriptor_dim(self) -> int:
        return 128

    def _forward(self, image):
        if self.conf["nms"] == "strict":
            f = self.net(image[None])[0]
        else:
            from kornia.feature.aliked import aliked as kornia_aliked

            with _NMS_LOCK:  # the swap is module-wide: one model call at a time
                original = kornia_aliked.nms2d
                kornia_aliked.nms2d = upstream_nms2d
                try:
                    f = self.net(image[None])[0]
                finally:
                    kornia_aliked.nms2d = original
        return {"keypoints": f.keypoints, "descriptors": f.descriptors, "scores": f.keypoint_scores}
