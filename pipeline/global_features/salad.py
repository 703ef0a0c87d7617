"""SALAD global descriptor (Izquierdo & Civera, CVPR 2024), compatible with serizba/salad.

DINOv2 ViT-B/14 (:class:`~pipeline.global_features.dinov2.DinoV2`, every block, final
LayerNorm) gives a class token ``t`` and a patch feature map; the SALAD aggregator
(:class:`SaladAggregator`) turns them into

* a global scene token: ``Linear(768, 512) -> ReLU -> Linear(512, 256)``, L2-normalised;
* local features ``Conv1x1(768, 512) -> Dropout -> ReLU -> Conv1x1(512, 128)`` and
  patch-to-cluster scores ``Conv1x1(768, 512) -> Dropout -> ReLU -> Conv1x1(512, 64)``;
  the scores plus a learnt dust-bin row go through 3 log-domain Sinkhorn iterations
  (optimal transport, as upstream's ``get_matching_probs``); the dust bin is dropped and
  each of the 64 clusters sums its patches' features weighted by the transport plan,
  each cluster's 128-d sum L2-normalised (channel-major flattening, upstream's layout);
* ``[token (256), clusters (64 * 128)]`` -> 8448-d, L2-normalised.

Checkpoint: upstream's release ``dino_salad.ckpt`` (despite the name, a plain state dict of
upstream's ``VPRModel``: ``eval.py`` and ``hubconf.py`` load it with
``model.load_state_dict(torch.load(path))``). Its keys, which our modules reproduce so that it
loads strictly without renaming::

    backbone.model.{cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.{i}.*, norm.*}
    aggregator.token_features.{0,2}.{weight,bias}
    aggregator.cluster_features.{0,3}.{weight,bias}
    aggregator.score.{0,3}.{weight,bias}
    aggregator.dust_bin

A PyTorch Lightning training checkpoint (``{'state_dict': ..., 'epoch': ...}``, e.g.
CliqueMining's ``cliquemining.ckpt``, same architecture) and the other common wrappers load too
(:func:`pipeline.checkpoints.read_state_dict`).

Test-time preprocessing (upstream README: ``eval.py --image_size 322 322``; ``eval.py``'s
``input_transform``: ``T.Resize((322, 322), BILINEAR)`` on the PIL image, ``ToTensor``,
ImageNet ``Normalize``): the conf's ``resize: [322, 322]`` has the loader resize with PIL
bilinear; the model normalises. Sizes that are not multiples of 14 (``resize: null``) are
rounded to the nearest multiples of 14 inside the model with torchvision's antialiased bilinear
resize, as gmberton/VPR-methods-evaluation's ``ResizingWrapper('dino_v2_resize')`` does around
SALAD (no-op at 322 x 322). The image must give more than 64 patches (e.g. >= 126 x 126 px):
the transport problem has 64 clusters plus a dust bin for the patches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torchvision.transforms.functional as tvf
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from ..images import IMAGENET_MEAN, IMAGENET_STD
from .base import GlobalModel
from .dinov2 import DinoV2

logger = logging.getLogger(__name__)

PATCH = 14

#: the released model (serizba/salad hubconf.py ``dinov2_salad`` / eval.py ``load_model``)
NUM_CHANNELS = 768
NUM_CLUSTERS = 64
CLUSTER_DIM = 128
TOKEN_DIM = 256
DESCRIPTOR_DIM = NUM_CLUSTERS * CLUSTER_DIM + TOKEN_DIM  # 8448
SINKHORN_ITERS = 3


def sinkhorn_log(scores: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, num_iters: int,
                 reg: float = 1.0) -> torch.Tensor:
    """Log-domain Sinkhorn scaling of ``scores [B, M, N]`` towards row / column log-masses
    ``log_a [B, M]`` and ``log_b [B, N]``; returns the log transport plan ``[B, M, N]``."""
    scores = scores / reg
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(scores + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(scores + u.unsqueeze(2), dim=1)
    return scores + u.unsqueeze(2) + v.unsqueeze(1)


def transport_probs(scores: torch.Tensor, dust_bin: torch.Tensor, num_iters: int = SINKHORN_ITERS,
                    reg: float = 1.0) -> torch.Tensor:
    """Patch-to-cluster assignment ``[B, m, n]`` from ``scores [B, m, n]`` (m clusters, n patches).

    A dust-bin row (the learnt ``dust_bin`` score) is appended; every row and column has mass
    ``1 / (n + m)`` except the dust bin, which takes the ``n - m`` remaining; after Sinkhorn the
    plan is rescaled by ``n + m`` (upstream's ``get_matching_probs``), exponentiated, and the
    dust-bin row is dropped.
    """
    b, m, n = scores.shape
    if n <= m:
        raise ValueError(
            f"SALAD aggregation needs more image patches than clusters: {n} patches for {m} clusters "
            f"(an image of at least {PATCH * math.ceil(math.sqrt(m + 1))} x {PATCH * math.ceil(math.sqrt(m + 1))} px)"
        )
    dust = dust_bin.to(scores.dtype).expand(b, 1, n)
    aug = torch.cat((scores, dust), dim=1)
    norm = -torch.tensor(math.log(n + m), device=scores.device)
    log_a = norm.expand(m + 1).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_b = norm.expand(n).contiguous()
    log_plan = sinkhorn_log(aug, log_a.expand(b, -1), log_b.expand(b, -1), num_iters, reg)
    return torch.exp(log_plan - norm)[:, :-1, :]


class SaladAggregator(nn.Module):
    """SALAD's optimal-transport aggregation (upstream's ``SALAD`` / MegaLoc's ``FeatureAggregator``).

    ``forward((features [B, C, h, w], token [B, C])) -> [B, token_dim + num_clusters * cluster_dim]``,
    L2-normalised. Submodule names and Sequential indices are upstream's.
    """

    def __init__(self, num_channels: int = NUM_CHANNELS, num_clusters: int = NUM_CLUSTERS,
                 cluster_dim: int = CLUSTER_DIM, token_dim: int = TOKEN_DIM, mlp_dim: int = 512,
                 dropout: float = 0.3):
        super().__init__()
        self.num_channels, self.num_clusters = num_channels, num_clusters
        self.cluster_dim, self.token_dim = cluster_dim, token_dim

        def drop() -> nn.Module:  # index 1 of the conv MLPs (no parameters; identity in eval)
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.token_features = nn.Sequential(
            nn.Linear(num_channels, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, token_dim)
        )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, mlp_dim, 1), drop(), nn.ReLU(), nn.Conv2d(mlp_dim, cluster_dim, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, mlp_dim, 1), drop(), nn.ReLU(), nn.Conv2d(mlp_dim, num_clusters, 1)
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    @property
    def out_dim(self) -> int:
        return self.token_dim + self.num_clusters * self.cluster_dim

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, token = inputs
        local = self.cluster_features(features).flatten(2)  # [B, l, n]
        scores = self.score(features).flatten(2)  # [B, m, n]
        token = self.token_features(token)  # [B, g]
        probs = transport_probs(scores, self.dust_bin)  # [B, m, n]
        # cluster j's l-d vector: sum over patches of feature * assignment (upstream's
        # repeat-multiply-sum, as one batched product)
        clusters = torch.bmm(local, probs.transpose(1, 2).to(local.dtype))  # [B, l, m]
        desc = torch.cat(
            (F.normalize(token, p=2, dim=-1), F.normalize(clusters, p=2, dim=1).flatten(1)), dim=-1
        )
        return F.normalize(desc, p=2, dim=-1)


def resize_to_patch_multiple(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to the nearest multiples of ``patch`` (Python ``round``), with
    torchvision's antialiased bilinear ``resize``; unchanged if already multiples. This is
    MegaLoc's ``forward`` and VPR-methods-evaluation's ``ResizingWrapper('dino_v2_resize')``."""
    h, w = images.shape[-2:]
    if h % patch == 0 and w % patch == 0:
        return images
    h, w = round(h / patch) * patch, round(w / patch) * patch
    if h == 0 or w == 0:
        raise ValueError(f"image of {tuple(images.shape[-2:])} px is too small for {patch} px patches")
    return tvf.resize(images, [h, w], antialias=True)


class SaladBackbone(nn.Module):
    """upstream's ``models.backbones.DINOv2`` wrapper (``.model``: the hub ViT-B/14) with
    ``norm_layer=True, return_token=True``: all blocks, final norm, ``(feature map, cls)``."""

    def __init__(self):
        super().__init__()
        self.model = DinoV2()  # dinov2_vitb14 as torch.hub builds it (with mask_token)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.feature_map(x, norm=True)


def lazy_init(skip: bool):
    """Build modules on the ``meta`` device (no memory, no random init) when ``skip``: their
    weights are about to come from a checkpoint (which must then fill every parameter:
    :func:`pipeline.checkpoints.load_into` requires every key), after ``to_empty``."""
    return torch.device("meta") if skip else contextlib.nullcontext()


def materialise(module: nn.Module) -> None:
    """Allocate (uninitialised) CPU storage for the submodules built by :func:`lazy_init`
    (children only: the model's own normalisation buffers are real and stay)."""
    for child in module.children():
        if any(t.is_meta for t in (*child.parameters(), *child.buffers())):
            child.to_empty(device="cpu")


def squeeze_scalars(state: dict, model: nn.Module) -> dict:
    """A 1-element ``[1]`` tensor in ``state`` where ``model`` has a 0-d parameter (the dust bin)
    becomes 0-d, as ``nn.Module.load_state_dict`` itself accepts (upstream loads that way)."""
    expected = model.state_dict()
    return {
        k: v.reshape(()) if k in expected and expected[k].dim() == 0 and tuple(v.shape) == (1,) else v
        for k, v in state.items()
    }


def load_salad_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load SALAD weights (``dino_salad.ckpt`` or a Lightning checkpoint) into ``model``;
    return the layout found. Mismatches raise :class:`ValueError` naming the file and keys."""
    state, layout = read_state_dict(path, "SALAD checkpoint")
    materialise(model)
    state = squeeze_scalars(state, model)
    load_into(model, state, os.fspath(path), "SALAD checkpoint", layout,
              "DINOv2 ViT-B/14 + SALAD 64x128 + 256 token")
    return layout


class SALAD(GlobalModel):
    default_conf = {"resize": [322, 322], "checkpoint": None}

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        with lazy_init(bool(self.conf["checkpoint"])):
            self.backbone = SaladBackbone()
            self.aggregator = SaladAggregator()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.conf["checkpoint"]:
            load_salad_checkpoint(self, self.conf["checkpoint"])
        else:
            logger.warning("SALAD: no checkpoint given, weights are random")
        self.eval()

    @property
    def dim(self) -> int:
        return DESCRIPTOR_DIM

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        return DESCRIPTOR_DIM

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SALAD expects images [B, 3, H, W], got {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std  # torchvision Normalize
        x = resize_to_patch_multiple(x)
        return self.aggregator(self.backbone(x))


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded, randomly initialised SALAD in the released ``dino_salad.ckpt`` layout (a
    plain ``torch.save``d state dict with upstream's ``VPRModel`` keys, float32). Values: the
    modules' own initialisation after ``torch.manual_seed(seed)``. ``conf`` is accepted for the
    common signature (the released architecture is fixed). NOT a trained model."""
    torch.manual_seed(seed)
    model = SALAD()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
