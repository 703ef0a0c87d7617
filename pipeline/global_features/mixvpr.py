"""MixVPR global descriptor (Ali-bey et al., WACV 2023), compatible with amaralibey/MixVPR.

The network is upstream's ``VPRModel`` as its README builds it for the released weights:

* ``backbone``: a torchvision ResNet-50 run up to ``layer3`` (upstream's
  ``layers_to_crop=[4]``: ``layer4``, ``avgpool`` and ``fc`` are removed), i.e. a
  1024-channel map at stride 16: 20 x 20 for the 320 x 320 test images;
* ``aggregator``: ``mix_depth`` Feature-Mixer layers over the flattened ``in_h * in_w``
  positions of each channel (``x + Linear(ReLU(Linear(LayerNorm(x))))``), then
  ``channel_proj`` (``Linear(in_channels, out_channels)`` across channels) and
  ``row_proj`` (``Linear(in_h * in_w, out_rows)`` across positions); the
  ``out_channels x out_rows`` result, flattened channel-major, is L2-normalised.

Parameter names are upstream's, so the released ``resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt``
loads strictly as it is::

    backbone.model.{conv1,bn1,layer1,layer2,layer3}.…     (no layer4 / fc)
    aggregator.mix.{i}.mix.{0,1,3}.{weight,bias}          LayerNorm, Linear, Linear
    aggregator.channel_proj.{weight,bias}, aggregator.row_proj.{weight,bias}

Despite its ``.ckpt`` name the released file is a plain state dict of those keys (upstream's
README and ``demo.py`` load it with ``model.load_state_dict(torch.load(path))``); a PyTorch
Lightning training checkpoint of ``VPRModel`` (the same keys under ``'state_dict'``) loads too.

Test-time preprocessing upstream: resize to 320 x 320 (aspect not kept), ``ToTensor``,
ImageNet ``Normalize``. The aggregator's sizes fix the input size (16 * in_h x 16 * in_w),
so ``resize`` defaults to ``[320, 320]`` and other input sizes are an error. The resize is
PIL bilinear in upstream's evaluation (``GSVCitiesDataModule.valid_transform`` with
``image_size=(320, 320)``, which gave the published recalls), as in this project's loader;
upstream's ``demo.py`` ``load_image`` uses PIL bicubic instead.
"""

from __future__ import annotations

import logging
import os

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from .base import GlobalModel
from ..images import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

#: the released models: descriptor size -> (out_channels, out_rows) (README "Weights" table;
#: files ``resnet50_MixVPR_{dim}_channels({out_channels})_rows({out_rows}).ckpt``)
RELEASED = {4096: (1024, 4), 512: (256, 2), 128: (64, 2)}
#: Google Drive links of the README's table (no checksums are published)
RELEASE_URLS = {
    4096: "https://drive.google.com/file/d/1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L/view?usp=share_link",
    512: "https://drive.google.com/file/d/1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj/view?usp=share_link",
    128: "https://drive.google.com/file/d/1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz/view?usp=share_link",
}
#: output stride of a ResNet cut after layer3
STRIDE = 16


class ResNetTrunk(nn.Module):
    """A torchvision ResNet-50 kept up to ``layer3`` (upstream's ``ResNet`` backbone with
    ``layers_to_crop=[4]``); the torchvision model sits in ``.model`` as upstream's does."""

    out_channels = 1024

    def __init__(self):
        super().__init__()
        self.model = torchvision.models.resnet50(weights=None)
        # upstream sets these to None: no parameters, no state dict entries
        self.model.avgpool = None
        self.model.fc = None
        self.model.layer4 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer3(m.layer2(m.layer1(x)))


class FeatureMixerLayer(nn.Module):
    """``x + MLP(LayerNorm(x))`` over the last dimension (the ``in_h * in_w`` positions)."""

    def __init__(self, in_dim: int, mlp_ratio: float = 1):
        super().__init__()
        hidden = int(in_dim * mlp_ratio)
        self.mix = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPRAggregator(nn.Module):
    """Upstream's ``MixVPR`` aggregator; returns the flattened descriptor before its L2
    normalisation (:meth:`GlobalModel.forward` applies it)."""

    def __init__(self, in_channels: int = 1024, in_h: int = 20, in_w: int = 20, out_channels: int = 1024,
                 mix_depth: int = 4, mlp_ratio: float = 1, out_rows: int = 4):
        super().__init__()
        self.in_h, self.in_w = in_h, in_w
        hw = in_h * in_w
        self.mix = nn.Sequential(*[FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(hw, out_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x.flatten(2))  # [B, C, h*w]
        x = self.channel_proj(x.permute(0, 2, 1))  # [B, h*w, out_channels]
        x = self.row_proj(x.permute(0, 2, 1))  # [B, out_channels, out_rows]
        return x.flatten(1)


def init_weights(model: "MixVPR") -> None:
    """Upstream's initialisation scheme for a fresh model: torchvision's ResNet init, and in each
    Feature-Mixer truncated-normal (std 0.02) linear weights with zero biases; the two
    projections keep PyTorch's default ``nn.Linear`` init."""
    for m in model.aggregator.mix.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def load_mixvpr_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load MixVPR weights from ``path`` into ``model``; return the layout found.

    Accepts the released plain state dict, a Lightning checkpoint (``{'state_dict': ...}``),
    ``{'model': ...}`` and ``module.`` prefixes. Key or shape mismatches raise
    :class:`ValueError` naming the file and the offending keys.
    """
    state, layout = read_state_dict(path, "MixVPR checkpoint")
    conf = getattr(model, "conf", {})
    load_into(model, state, os.fspath(path), "MixVPR checkpoint", layout,
              f"out_channels={conf.get('out_channels')}, out_rows={conf.get('out_rows')}, "
              f"mix_depth={conf.get('mix_depth')}, in_h x in_w={conf.get('in_h')}x{conf.get('in_w')}")
    return layout


class MixVPR(GlobalModel):
    default_conf = {
        "resize": [320, 320],
        "in_h": 20,
        "in_w": 20,
        "out_channels": 1024,
        "out_rows": 4,
        "mix_depth": 4,
        "mlp_ratio": 1,
        "checkpoint": None,
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        for key in ("in_h", "in_w", "out_channels", "out_rows", "mix_depth"):
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MixVPR: {key} must be a whole number >= 1, got {v!r}")
        if isinstance(c["mlp_ratio"], bool) or not isinstance(c["mlp_ratio"], (int, float)) or c["mlp_ratio"] <= 0:
            raise ValueError(f"MixVPR: mlp_ratio must be a number > 0, got {c['mlp_ratio']!r}")
        self.input_size = (STRIDE * c["in_h"], STRIDE * c["in_w"])
        resize = c["resize"]
        if resize is not None and (isinstance(resize, int) or tuple(resize) != self.input_size):
            raise ValueError(
                f"MixVPR: resize must be {list(self.input_size)} (the aggregator takes a "
                f"{c['in_h']}x{c['in_w']} map at stride {STRIDE}), got {resize!r}"
            )
        self.backbone = ResNetTrunk()
        self.aggregator = MixVPRAggregator(
            ResNetTrunk.out_channels, c["in_h"], c["in_w"], c["out_channels"], c["mix_depth"],
            c["mlp_ratio"], c["out_rows"],
        )
        init_weights(self)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if c["checkpoint"]:
            load_mixvpr_checkpoint(self, c["checkpoint"])
        else:
            logger.warning("MixVPR: no checkpoint given, weights are random")
        self.eval()

    @property
    def dim(self) -> int:
        return self._descriptor_size(self.conf)

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        return int(conf["out_channels"]) * int(conf["out_rows"])

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"MixVPR expects images [B, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"MixVPR takes {self.input_size[0]}x{self.input_size[1]} images (conf resize), "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )
        x = images.to(self.mean.dtype)
        x = (x - self.mean) / self.std  # same sub-then-div as torchvision's Normalize
        return self.aggregator(self.backbone(x))


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded, randomly initialised MixVPR in the released layout.

    A plain state dict, as ``resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt`` (upstream's
    ``VPRModel`` keys ``backbone.model.*`` / ``aggregator.*``, float32 tensors, int64
    ``num_batches_tracked``), values from upstream's initialisation (:func:`init_weights`)
    after ``torch.manual_seed(seed)``. ``conf`` picks another size (e.g.
    ``{"out_channels": 256, "out_rows": 2}`` for the 512-d release). NOT a trained model.
    """
    conf = {k: v for k, v in (conf or {}).items() if k != "checkpoint"}
    torch.manual_seed(seed)
    net = MixVPR(conf)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, path)
