"""Bag-of-Queries global descriptor (Ali-bey et al., CVPR 2024), compatible with
amaralibey/Bag-of-Queries and its two released models (``hubconf.py`` ``get_trained_boq``).

Architecture (upstream's ``VPRModel(backbone, aggregator)``):

* backbone ``resnet50``: torchvision ResNet-50 cut after ``layer3`` (upstream's
  ``ResNet(crop_last_block=True)``: ``net = Sequential(conv1, bn1, relu, maxpool, layer1,
  layer2, layer3)``), a 1024-channel map at stride 16;
* backbone ``dinov2``: DINOv2 ViT-B/14 (:class:`~pipeline.global_features.dinov2.DinoV2`,
  the hub's ``dinov2_vitb14``): every block, **without** the final LayerNorm, the class token
  dropped and the patch tokens laid out as a 768-channel map (upstream's ``DinoV2.forward``;
  ``dino.norm`` stays in the model and in the released file but is never applied);
* aggregator ``BoQ``: ``proj_c`` (3x3 conv to ``proj_channels``: 512 for ResNet-50, 384 for
  DINOv2) -> flatten to tokens -> ``norm_input`` (LayerNorm) -> 2 ``BoQBlock``s in cascade,
  each: ``encoder`` (``nn.TransformerEncoderLayer``, post-norm, ReLU, FFN 4x, heads =
  channels / 64) refines the tokens; 64 learnt ``queries`` go through ``self_attn`` + residual
  + ``norm_q`` and then ``cross_attn`` on the refined tokens + ``norm_out``; the 2 x 64 query
  outputs ``[B, 128, C]`` are mixed by ``fc`` (``Linear(128, row_dim)``) along the query axis
  -> ``[B, C, row_dim]`` flattened channel-major -> L2-normalised.

Descriptor size ``output_dim = proj_channels * row_dim``: 512 * 32 = 16384 (ResNet-50) and
384 * 32 = 12288 (DINOv2), the released models (``hubconf.py`` ``AVAILABLE_BACKBONES``).
Upstream's forward also returns the cross-attention maps; only the descriptor is kept.

Checkpoints: the releases ``resnet50_16384.pth`` / ``dinov2_12288.pth`` are plain state dicts of
upstream's ``VPRModel`` (``hubconf.py`` loads them with ``vpr_model.load_state_dict``); our
modules carry the same names, so they load strictly without renaming::

    backbone.net.{0,1,4,5,6}.*                    ResNet-50 conv1, bn1, layer1..3
    backbone.dino.{cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.{i}.*, norm.*}
    aggregator.proj_c.{weight,bias}
    aggregator.norm_input.{weight,bias}
    aggregator.boqs.{i}.encoder.{self_attn.in_proj_*, self_attn.out_proj.*, linear1.*, linear2.*,
                                 norm1.*, norm2.*}
    aggregator.boqs.{i}.{queries, self_attn.*, norm_q.*, cross_attn.*, norm_out.*}
    aggregator.fc.{weight,bias}

``backbone.dino.norm.*`` may be absent (upstream's code before March 2025 replaced that unused
norm by an ``Identity``, so checkpoints trained with it lack the keys); every other key is
required. The other common wrappers (``{'state_dict': ...}``, a Lightning checkpoint,
``module.`` prefixes) load too (:func:`pipeline.checkpoints.read_state_dict`).

Test-time resolution and preprocessing (``conf['resize']``)
-----------------------------------------------------------
Upstream's README gives the transform to use with the released models::

    ToTensor() -> Resize(im_size, BICUBIC, antialias=True) -> Normalize(ImageNet mean/std)
    im_size = (384, 384) for ResNet-50, (322, 322) for DINOv2

(the same sizes as ``train.py``'s ``val_img_size``). Each backbone's default resolution is in
:data:`BACKBONES`, and it applies whenever the conf leaves ``resize`` unset (``null``, the
default of every global model): the image loader then hands over the images as they are, and
the model itself resizes each batch to that ``[H, W]`` with torchvision's antialiased bicubic
``resize`` on the float image *before* normalising, which is upstream's transform exactly
(``model.image_size`` says which size, ``None`` when it does not resize; :func:`model_image_size`
gives it for a conf without building the model). Setting ``resize``
(``[H, W]`` or a longer side) hands resizing to the loader (PIL bilinear) and the model takes
the images at the size they come; the DINOv2 backbone then still needs multiples of 14 px, and
other sizes are resized to the nearest multiples of 14 with the same bicubic resize (Python
``round``, as SALAD's and MegaLoc's wrappers do). The default is decided in the model, not in
``default_conf``, because one ``resize`` default cannot serve two backbones (and the loader
reads the conf as the user wrote it).
"""

from __future__ import annotations

import logging
import os

import torch
import torchvision
import torchvision.transforms.functional as tvf
from torch import nn
from torchvision.transforms import InterpolationMode

from ..checkpoints import load_into, read_state_dict
from ..images import IMAGENET_MEAN, IMAGENET_STD
from .base import GlobalModel
from .dinov2 import DinoV2

logger = logging.getLogger(__name__)

PATCH = 14

#: released configuration per backbone (upstream ``hubconf.py`` ``get_trained_boq``; test size
#: from the README's ``im_size`` and ``train.py``'s ``val_img_size``)
BACKBONES = {
    "resnet50": {"in_channels": 1024, "proj_channels": 512, "output_dim": 16384, "resize": [384, 384]},
    "dinov2": {"in_channels": 768, "proj_channels": 384, "output_dim": 12288, "resize": [322, 322]},
}
#: accepted spellings of the backbone names
ALIASES = {"resnet50": "resnet50", "resnet-50": "resnet50", "dinov2": "dinov2", "dinov2_vitb14": "dinov2",
           "dinov2-vitb14": "dinov2"}
NUM_QUERIES = 64
NUM_LAYERS = 2
HEAD_DIM = 64  # upstream: nheads = channels // 64


def canonical_backbone(name) -> str:
    key = str(name).lower()
    if key not in ALIASES:
        raise ValueError(f"BoQ: unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return ALIASES[key]


def resolve_output_dim(backbone: str, output_dim) -> int:
    """``output_dim`` of the conf (``None``: the released size), checked against the backbone."""
    spec = BACKBONES[backbone]
    if output_dim is None:
        return spec["output_dim"]
    proj = spec["proj_channels"]
    if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < proj or output_dim % proj:
        raise ValueError(
            f"BoQ: output_dim for backbone {backbone} must be a positive multiple of its {proj} projected "
            f"channels (released: {spec['output_dim']}), or null for that; got {output_dim!r}"
        )
    return output_dim


def model_image_size(backbone: str, resize) -> list[int] | None:
    """The ``[H, W]`` a model resizes every image to itself: the backbone's test resolution when
    the conf's ``resize`` is unset (``None``), else ``None`` (the loader resizes)."""
    return list(BACKBONES[canonical_backbone(backbone)]["resize"]) if resize is None else None


class ResNetBackbone(nn.Module):
    """torchvision ResNet-50 up to ``layer3`` as ``net`` (upstream's ``ResNet`` layout)."""

    def __init__(self):
        super().__init__()
        r = torchvision.models.resnet50(weights=None)  # never downloads; weights come from the checkpoint
        self.net = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DinoV2Backbone(nn.Module):
    """``dino``: the hub's ViT-B/14; output: pre-norm patch tokens as ``[B, 768, H/14, W/14]``."""

    def __init__(self):
        super().__init__()
        self.dino = DinoV2.from_arch("vitb14")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dino.feature_map(x, norm=False)[0]


class BoQBlock(nn.Module):
    """One block: refine the tokens, then let the learnt queries read them by cross-attention.

    ``forward(x [B, N, C]) -> (refined x [B, N, C], query outputs [B, Q, C])``. The queries'
    self-attention depends on the weights only (upstream computes it for each image anyway);
    attention maps are not computed.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True
        )
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        q = self.queries.to(x.dtype)
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])
        q = q.expand(x.shape[0], -1, -1)
        out = self.cross_attn(q, x, x, need_weights=False)[0]
        return x, self.norm_out(out)


class BoQAggregator(nn.Module):
    """``[B, in_channels, h, w] -> [B, proj_channels * row_dim]`` (not yet L2-normalised)."""

    def __init__(self, in_channels: int, proj_channels: int, num_queries: int = NUM_QUERIES,
                 num_layers: int = NUM_LAYERS, row_dim: int = 32):
        super().__init__()
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList(
            BoQBlock(proj_channels, num_queries, proj_channels // HEAD_DIM) for _ in range(num_layers)
        )
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_input(self.proj_c(x).flatten(2).transpose(1, 2))  # [B, h*w, C]
        outs = []
        for block in self.boqs:
            x, out = block(x)
            outs.append(out)
        out = torch.cat(outs, dim=1)  # [B, layers * queries, C]
        return self.fc(out.transpose(1, 2)).flatten(1)  # [B, C * row_dim], channel-major


def _file_holds(state: dict) -> str:
    """What a BoQ state dict holds, for error messages (``backbone ..., output_dim ...``)."""
    kind = ("dinov2" if any(k.startswith("backbone.dino.") for k in state)
            else "resnet50" if any(k.startswith("backbone.net.") for k in state) else "unknown")
    fc, proj = state.get("aggregator.fc.weight"), state.get("aggregator.proj_c.weight")
    dim = f", output_dim {fc.shape[0] * proj.shape[0]}" if fc is not None and proj is not None and fc.dim() == 2 else ""
    return f"backbone {kind}{dim}"


def load_boq_checkpoint(model: "BoQ", path: str | os.PathLike) -> str:
    """Load BoQ weights (a released ``.pth`` or a common wrapper) into ``model``; return the
    layout found. Mismatches raise :class:`ValueError` naming the file, the keys, and what the
    file holds versus what the conf asks for."""
    state, layout = read_state_dict(path, "BoQ checkpoint")
    desc = f"conf: backbone {model.backbone_name}, output_dim {model.dim}; file: {_file_holds(state)}"
    load_into(model, state, os.fspath(path), "BoQ checkpoint", layout, desc,
              optional=lambda k: k.startswith("backbone.dino.norm."))
    return layout


class BoQ(GlobalModel):
    """Bag-of-Queries; conf: ``backbone`` (``resnet50`` | ``dinov2``), ``output_dim`` (``null``:
    the released size of that backbone), ``resize`` (``null``: the backbone's test resolution,
    applied by the model; see the module docstring), ``checkpoint``."""

    default_conf = {"backbone": "resnet50", "output_dim": None, "resize": None, "checkpoint": None}

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        self.backbone_name = canonical_backbone(self.conf["backbone"])
        spec = BACKBONES[self.backbone_name]
        self.output_dim = resolve_output_dim(self.backbone_name, self.conf["output_dim"])
        #: the ``[H, W]`` every image is resized to inside the model; ``None`` when the conf's
        #: ``resize`` hands resizing to the loader
        self.image_size = model_image_size(self.backbone_name, self.conf["resize"])
        self.backbone = ResNetBackbone() if self.backbone_name == "resnet50" else DinoV2Backbone()
        proj = spec["proj_channels"]
        self.aggregator = BoQAggregator(spec["in_channels"], proj, row_dim=self.output_dim // proj)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.conf["checkpoint"]:
            load_boq_checkpoint(self, self.conf["checkpoint"])
        else:
            logger.warning("BoQ: no checkpoint given, weights are random")
        self.eval()

    @property
    def dim(self) -> int:
        return self.output_dim

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        return resolve_output_dim(canonical_backbone(conf["backbone"]), conf["output_dim"])

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(H, W)`` the backbone sees for an image of ``height x width`` px."""
        if self.image_size is not None:
            return tuple(self.image_size)
        if self.backbone_name == "dinov2" and (height % PATCH or width % PATCH):
            h, w = round(height / PATCH) * PATCH, round(width / PATCH) * PATCH
            if h == 0 or w == 0:
                raise ValueError(f"BoQ (dinov2): an image of {height}x{width} px is too small for {PATCH} px patches")
            return h, w
        return height, width

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> the normalised backbone input (upstream's test transform)."""
        x = images.to(self.mean.dtype)
        size = self.input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = tvf.resize(x, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        return (x - self.mean) / self.std  # sub-then-div, as torchvision's Normalize

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BoQ expects images [B, 3, H, W], got {tuple(images.shape)}")
        return self.aggregator(self.backbone(self.preprocess(images)))


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded, randomly initialised BoQ in the released layout (``resnet50_16384.pth`` /
    ``dinov2_12288.pth``: a plain ``torch.save``d state dict of upstream's ``VPRModel`` keys,
    float32, int64 ``num_batches_tracked``). ``conf`` picks the variant (``backbone``,
    ``output_dim``; default ResNet-50, 16384). Values: the modules' own initialisation after
    ``torch.manual_seed(seed)`` (queries ~ N(0, 1), as upstream's). NOT a trained model."""
    conf = {k: v for k, v in (conf or {}).items() if k in ("backbone", "output_dim")}
    torch.manual_seed(seed)
    model = BoQ(conf)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
