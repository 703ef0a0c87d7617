"""DISK (kornia's implementation) loading the upstream checkpoint file."""

from __future__ import annotations

import torch

from .base import LocalModel, weights_file


class DISK(LocalModel):
    default_conf = {"weights": None, "window_size": 5, "score_threshold": 0.0,
                    "resize_max": 1600}  # hloc's disk conf

    def __init__(self, conf=None):
        super().__init__(conf)
        import kornia.feature as KF

        path = weights_file(self.conf["weights"], "DISK")
        # The upstream file was saved on CUDA: always map to the CPU first.
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("extractor", state)
        self.net = KF.DISK()
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a DISK checkpoint ({str(e).splitlines()[0]})") from None
        self.eval()

    @property
    def descriptor_dim(self) -> int:
        return 128

    def _forward(self, image):
        f = self.net(
            image[None], n=self.conf["max_keypoints"] or None, window_size=self.conf["window_size"],
            score_threshold=self.conf["score_threshold"], pad_if_not_divisible=True,
        )[0]
        return {"keypoints": f.keypoints, "descriptors": f.descriptors, "scores": f.detection_scores}
