"""SIFT (OpenCV) with RootSIFT descriptors; needs no weights."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from .base import LocalModel


class SIFT(LocalModel):
    # a fresh cv2.SIFT per call, OpenCV releases the GIL: one image per core in threads
    # (2 threads on 2 cores: 7.4 ms an image against 13.6 ms with OpenCV's own threads)
    cpu_threads_safe = True
    default_conf = {"root": True, "contrast_threshold": 0.02,
                    "resize_max": 1600}  # hloc's sift conf

    @property
    def descriptor_dim(self) -> int:
        return 128

    def _forward(self, image):
        gray = cv2.cvtColor((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)
        n = self.conf["max_keypoints"]
        sift = cv2.SIFT_create(nfeatures=n or 0, contrastThreshold=self.conf["contrast_threshold"])
        kps, desc = sift.detectAndCompute(gray, None)
        if desc is None:
            desc = np.zeros((0, 128), np.float32)
        kps, desc = kps[: n or None], desc[: n or None]
        desc = desc.astype(np.float32)
        if self.conf["root"]:  # RootSIFT: L1-normalise, then square root
            desc = np.sqrt(desc / np.maximum(desc.sum(1, keepdims=True), 1e-8))
        return {
            "keypoints": torch.tensor([k.pt for k in kps], dtype=torch.float32).reshape(-1, 2),
            "descriptors": torch.from_numpy(desc),
            "scores": torch.tensor([k.response for k in kps], dtype=torch.float32),
        }
