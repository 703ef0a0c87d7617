"""ALIKED (kornia's implementation) loading the upstream checkpoint file."""

from __future__ import annotations

import torch

from .base import LocalModel, weights_file


class ALIKED(LocalModel):
    default_conf = {"model_name": "aliked-n16", "weights": None, "detection_threshold": 0.0, "nms_radius": 2}

    def __init__(self, conf=None):
        super().__init__(conf)
        import kornia.feature as KF

        c = self.conf
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
        f = self.net(image[None])[0]
        return {"keypoints": f.keypoints, "descriptors": f.descriptors, "scores": f.keypoint_scores}
