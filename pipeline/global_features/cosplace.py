"""CosPlace global descriptor (Berton et al., CVPR 2022), compatible with gmberton/CosPlace.

The network is a torchvision backbone cut before its pooling/classifier, followed by
``L2Norm -> GeM -> Flatten -> Linear -> L2Norm``. Submodule layout and parameter names
follow the official checkpoints (``backbone.<i>.…``, ``aggregation.1.p``,
``aggregation.3.weight``/``bias``), so those ``.pth`` files load without renaming.
"""

from __future__ import annotations

import logging
import os

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from ..images import IMAGENET_MEAN, IMAGENET_STD
from .base import GlobalModel

logger = logging.getLogger(__name__)


#: canonical backbone name -> channels of the last kept feature map
BACKBONE_CHANNELS = {
    "ResNet18": 512,
    "ResNet50": 2048,
    "ResNet101": 2048,
    "ResNet152": 2048,
    "VGG16": 512,
    "EfficientNet_B0": 1280,
    "EfficientNet_B1": 1280,
    "EfficientNet_B2": 1408,
    "EfficientNet_B3": 1536,
    "EfficientNet_B4": 1792,
    "EfficientNet_B5": 2048,
    "EfficientNet_B6": 2304,
    "EfficientNet_B7": 2560,
}
_CANONICAL = {name.lower(): name for name in BACKBONE_CHANNELS}


def canonical_backbone(name: str) -> str:
    """``resnet50`` / ``ResNet50`` / ``RESNET50`` -> ``ResNet50``."""
    key = str(name).lower().replace("-", "_")
    if key not in _CANONICAL:
        raise ValueError(
            f"CosPlace: unknown backbone {name!r}; choose one of {sorted(BACKBONE_CHANNELS)}"
        )
    return _CANONICAL[key]


def build_backbone(name: str) -> tuple[nn.Sequential, int]:
    """Randomly initialised torchvision backbone, cut as CosPlace does (never downloads)."""
    name = canonical_backbone(name)
    net = getattr(torchvision.models, name.lower())(weights=None)
    if name.startswith("VGG"):
        # conv layers up to conv5_3; its ReLU and the last max-pool are dropped
        layers = list(net.features.children())[:-2]
    else:
        # ResNet: drop avgpool + fc; EfficientNet: drop avgpool + classifier
        layers = list(net.children())[:-2]
    return nn.Sequential(*layers), BACKBONE_CHANNELS[name]


class L2Norm(nn.Module):
    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=self.dim)


class GeM(nn.Module):
    """Generalised-mean pooling over the whole feature map with a learnt exponent ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        powered = x.clamp(min=self.eps).pow(self.p)
        pooled = F.avg_pool2d(powered, (x.size(-2), x.size(-1)))
        return pooled.pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.detach().flatten()[0].item():.4f}, eps={self.eps}"


class Flatten(nn.Module):
    """``[B, C, 1, 1] -> [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"Flatten expects a 1x1 map, got {tuple(x.shape)}")
        return x[:, :, 0, 0]


def load_cosplace_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load CosPlace weights from ``path`` into ``model``; return the layout found.

    Accepts a plain state dict (official release / ``best_model.pth``), the training
    checkpoint ``{'model_state_dict': ...}``, ``{'state_dict': ...}``, ``{'model': ...}``
    and ``module.``-prefixed keys. Key or shape mismatches raise :class:`ValueError`
    naming the file and the offending keys.
    """
    state, layout = read_state_dict(path, "CosPlace checkpoint")
    conf = getattr(model, "conf", {})
    load_into(model, state, os.fspath(path), "CosPlace checkpoint", layout,
              f"backbone={conf.get('backbone')}, fc_output_dim={conf.get('fc_output_dim')}")
    return layout


class CosPlace(GlobalModel):
    default_conf = {"backbone": "ResNet50", "fc_output_dim": 512, "checkpoint": None}

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        self.backbone_name = canonical_backbone(self.conf["backbone"])
        fc_dim = int(self.conf["fc_output_dim"])
        if fc_dim <= 0:
            raise ValueError(f"CosPlace: fc_output_dim must be positive, got {fc_dim}")
        self.backbone, features_dim = build_backbone(self.backbone_name)
        self.aggregation = nn.Sequential(
            L2Norm(), GeM(), Flatten(), nn.Linear(features_dim, fc_dim), L2Norm()
        )
        # not persistent: official checkpoints have no such entries
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.conf["checkpoint"]:
            load_cosplace_checkpoint(self, self.conf["checkpoint"])
        else:
            logger.warning("%s: no checkpoint given, weights are random", type(self).__name__)
        self.eval()

    @property
    def dim(self) -> int:
        return int(self.conf["fc_output_dim"])

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        return int(conf["fc_output_dim"])

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CosPlace expects images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.mean.dtype)
        x = (x - self.mean) / self.std  # same sub-then-div as torchvision's Normalize
        return self.aggregation(self.backbone(x))
