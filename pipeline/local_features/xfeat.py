"""XFeat (kornia's implementation) loading the upstream ``xfeat.pt`` file."""

from __future__ import annotations

import torch

from .base import LocalModel, weights_file


class XFeat(LocalModel):
    default_conf = {"weights": None, "detection_threshold": 0.05,
                    "resize_max": 1024}  # upstream takes images as given; 1024 as ALIKED

    def __init__(self, conf=None):
        super().__init__(conf)
        import kornia.feature as KF

        path = weights_file(self.conf["weights"], "XFeat")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # xfeat.pt is the bare network; xfeat-lighterglue.pt nests it under extractor.model.net.
        for prefix in ("extractor.model.net.", "net."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.net = KF.XFeat(top_k=self.conf["max_keypoints"] or 4096, detection_threshold=self.conf["detection_threshold"])
        try:
            self.net.net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: not an XFeat checkpoint ({str(e).splitlines()[0]})") from None
        self.eval()

    @property
    def descriptor_dim(self) -> int:
        return 64

    def _forward(self, image):
        f = self.net.detectAndCompute(image[None])[0]
        return {"keypoints": f["keypoints"], "descriptors": f["descriptors"], "scores": f["scores"]}
