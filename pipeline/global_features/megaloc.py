"""MegaLoc global descriptor (Berton & Masone, CVPR-W 2025), compatible with gmberton/MegaLoc.

Upstream's ``megaloc_model.MegaLoc``: a DINOv2 ViT-B/14 (its own self-contained copy: the
same parameters as facebookresearch/dinov2's ``dinov2_vitb14`` minus ``mask_token``; position
embeddings for 518 px, bicubic interpolation with offset 0.1, no antialias), the final
LayerNorm, a SALAD-style optimal-transport aggregator with 64 clusters of 256-d, a 256-d
global token and 512-d hidden MLPs (:class:`~pipeline.global_features.salad.SaladAggregator`)
giving an L2-normalised 16640-d vector, then ``Linear(16640, 8448)`` and L2 normalisation.

Checkpoint: the released ``model.safetensors`` (HuggingFace ``gberton/MegaLoc``, loaded by
upstream's ``hubconf.get_trained_model`` with a strict ``load_state_dict``). Its keys, which
our modules reproduce::

    backbone.{cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*, norm.*}
    aggregator.agg.token_features.{0,2}.*   aggregator.agg.cluster_features.{0,3}.*
    aggregator.agg.score.{0,3}.*            aggregator.agg.dust_bin
    aggregator.linear.{weight,bias}

A ``torch.save``d state dict in the same key layout (and the usual wrappers) loads too, and so
does the first release, ``megaloc.torch`` (GitHub release ``v1.0``, upstream's hubconf until
January 2026: the same network with torch.hub's DINOv2 as ``backbone.model.*``, plus its unused
``mask_token``), whose keys are mapped.

Resolution: upstream's ``forward`` resizes any input whose sides are not multiples of 14 to
the nearest multiples (``round(h / 14) * 14``) with torchvision's bilinear ``resize(...,
antialias=True)``; this model does the same, after ImageNet normalisation (upstream is fed
normalised tensors). The authors evaluate at 322 x 322 with standard ImageNet normalisation
(gmberton/MegaLoc issue #2: the paper's inference resize, confirmed by the author), hence the default
``resize: [322, 322]`` (the loader's PIL bilinear resize; the in-model resize is then a no-op).
Note that gmberton/VPR-methods-evaluation feeds MegaLoc *unresized* images by default
(``parser.py``: no ``image_size`` for ``megaloc``; ``test_dataset.py`` then only normalises),
leaving the in-model rounding to multiples of 14 as the only resize: ``resize: null`` reproduces
that protocol.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..checkpoints import load_into, read_state_dict
from .base import GlobalModel
from .dinov2 import DinoV2
from ..images import IMAGENET_MEAN, IMAGENET_STD
from .salad import (SaladAggregator, lazy_init, materialise,
                    resize_to_patch_multiple, squeeze_scalars)

logger = logging.getLogger(__name__)

NUM_CLUSTERS = 64
CLUSTER_DIM = 256
TOKEN_DIM = 256
MLP_DIM = 512
SALAD_DIM = NUM_CLUSTERS * CLUSTER_DIM + TOKEN_DIM  # 16640
DESCRIPTOR_DIM = 8448


class MegaLocHead(nn.Module):
    """upstream's ``Aggregator``: ``agg`` (optimal-transport aggregation) then ``linear``."""

    def __init__(self, feat_dim: int = DESCRIPTOR_DIM, num_clusters: int = NUM_CLUSTERS,
                 cluster_dim: int = CLUSTER_DIM, token_dim: int = TOKEN_DIM, mlp_dim: int = MLP_DIM,
                 num_channels: int = 768):
        super().__init__()
        self.agg = SaladAggregator(num_channels=num_channels, num_clusters=num_clusters,
                                   cluster_dim=cluster_dim, token_dim=token_dim, mlp_dim=mlp_dim)
        self.linear = nn.Linear(self.agg.out_dim, feat_dim)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.linear(self.agg(inputs))


#: the first release (GitHub ``v1.0/megaloc.torch``, until January 2026) held upstream's
#: earlier ``MegaLocModel``, whose backbone wrapped torch.hub's ``dinov2_vitb14`` as ``.model``
V1_BACKBONE_PREFIX = "backbone.model."


def from_v1_layout(state: dict) -> tuple[dict, bool]:
    """``backbone.model.*`` (the v1.0 ``megaloc.torch`` keys) -> ``backbone.*``, dropping the
    hub ViT's ``mask_token`` (a training-only parameter the current release no longer has)."""
    if not any(k.startswith(V1_BACKBONE_PREFIX) for k in state):
        return state, False
    out = {}
    for k, v in state.items():
        if k.startswith(V1_BACKBONE_PREFIX):
            k = "backbone." + k[len(V1_BACKBONE_PREFIX):]
            if k == "backbone.mask_token":
                continue
        out[k] = v
    return out, True


def load_megaloc_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load MegaLoc weights into ``model``; return the layout found.

    Accepts the current release ``model.safetensors`` (HuggingFace ``gberton/MegaLoc``), the
    first release ``megaloc.torch`` (GitHub ``v1.0``: ``backbone.model.*`` keys, mapped), and
    either in the usual wrappers / with ``module.`` prefixes. Mismatches raise
    :class:`ValueError` naming the file and the keys.
    """
    state, layout = read_state_dict(path, "MegaLoc checkpoint")
    state, v1 = from_v1_layout(state)
    if v1:
        layout += " -> v1.0 megaloc.torch keys (backbone.model.*, mapped)"
    materialise(model)
    state = squeeze_scalars(state, model)
    conf = getattr(model, "conf", None) or MegaLoc.default_conf
    head = (f"SALAD {conf['num_clusters']}x{conf['cluster_dim']} + {conf['token_dim']} token, "
            f"Linear(.., {conf['feat_dim']})")
    load_into(model, state, os.fspath(path), "MegaLoc checkpoint", layout, f"DINOv2 ViT-B/14 + {head}")
    return layout


class MegaLoc(GlobalModel):
    """MegaLoc; the size options are upstream's ``MegaLoc.__init__`` arguments (the released
    model: the defaults)."""

    default_conf = {
        "resize": [322, 322],
        "checkpoint": None,
        "feat_dim": DESCRIPTOR_DIM,
        "num_clusters": NUM_CLUSTERS,
        "cluster_dim": CLUSTER_DIM,
        "token_dim": TOKEN_DIM,
        "mlp_dim": MLP_DIM,
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        sizes = {k: int(self.conf[k]) for k in ("feat_dim", "num_clusters", "cluster_dim", "token_dim", "mlp_dim")}
        bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0]
        if bad:
            raise ValueError(f"MegaLoc: sizes must be positive, got {', '.join(bad)}")
        with lazy_init(bool(self.conf["checkpoint"])):
            # upstream's self-contained ViT has no mask_token (the released file neither)
            self.backbone = DinoV2(mask_token=False)
            self.aggregator = MegaLocHead(**sizes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.conf["checkpoint"]:
            load_megaloc_checkpoint(self, self.conf["checkpoint"])
        else:
            logger.warning("MegaLoc: no checkpoint given, weights are random")
        self.eval()

    @property
    def dim(self) -> int:
        return int(self.conf["feat_dim"])

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        return int(conf["feat_dim"])

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"MegaLoc expects images [B, 3, H, W], got {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std  # torchvision Normalize
        x = resize_to_patch_multiple(x)  # part of upstream's forward
        return self.aggregator(self.backbone.feature_map(x, norm=True))


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded, randomly initialised MegaLoc in the released layout: a safetensors file
    (whatever ``path``'s suffix) with upstream's keys, float32. Values: the modules' own
    initialisation after ``torch.manual_seed(seed)``. ``conf``: size options (default: the
    released sizes). NOT a trained model."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    sizes = {k: v for k, v in (conf or {}).items() if k not in ("checkpoint", "name")}
    model = MegaLoc({**sizes, "checkpoint": None})
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, os.fspath(path))
