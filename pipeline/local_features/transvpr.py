"""TransVPR (Wang et al., CVPR 2022) loading the released ``TransVPR_MSLS.pth`` / ``TransVPR_Pitts30k.pth``.

The network is upstream's ``Extractor_base()`` with a ``POOL`` module added as ``pool``
(``feature_extractor.py``, ``blocks.py`` of RuotongWANG/TransVPR-model-implementation),
rebuilt with the same module names, so that the released files (plain state dicts,
loaded by upstream with ``model.load_state_dict(torch.load(ckpt))``) load as they are:

- ``conv1..conv4``: four ``Conv 3x3 -> BatchNorm -> ReLU -> MaxPool(3, stride 2, pad 1)``
  blocks (64, 128, 256, 512 channels), each halving the resolution;
- ``tokenizer1..tokenizer4`` (``.conv_layer``): patch embeddings of the four maps with
  kernel = stride = 8, 4, 2, 1, so that every map gives the same grid of patches, one
  per 16x16 pixels of the input; each maps its patch to 64 channels and the four are
  concatenated into a 256-d token per patch (no position embedding: upstream builds its
  encoder with ``positional_embedding=False``);
- ``transformer``: a learnt class token (``class_emb``) is prepended, then 6 encoder
  layers (``blocks.<i>``: ``x + proj(attention(pre_norm(x)))`` with 4 heads and a bias-free
  ``qkv``, then ``norm1``, then ``x + linear2(gelu(linear1(x)))`` with 512 hidden units).
  The output of every layer goes through the one shared ``transformer.norm``, giving
  tokens ``[6, 1 + P, 256]``;
- ``pool``: the patch tokens of layers 1, 3, 5 (low, mid, high level) are concatenated
  (768-d); ``attention_pool`` (768 -> 3) and a softmax over the patches give one
  attention map per level; level ``i``'s global feature is its tokens weighted by its
  map; the three are concatenated, L2-normalised, projected by ``fc.1`` (768 -> 256) and
  L2-normalised again: the 256-d global descriptor.

5,402,627 parameters (plus BatchNorm statistics).

Inference follows upstream's ``test_msls.py`` (the only script that extracts local
features; the ``--threshold`` and ``--layer`` defaults):

- the image is resized to 480 x 640 (``H x W``; the pipeline does this, conf
  ``resize: [480, 640]``) and normalised with the ImageNet mean / std;
- multi-level attention: each level's map is min-max normalised over the patches, the
  three are summed and the sum is min-max normalised again (``max_min_norm_tensor``);
- keypoints: the patches whose multi-level attention exceeds ``threshold`` (0.02),
  in raster order (row by row), at the patch centres ``(16 j + 8, 16 i + 8)`` in input
  pixels (upstream's ``get_keypoints``; a 480 x 640 image has a 30 x 40 grid);
- descriptors: the patch tokens of layer ``layer`` (3, the "mid level"), i.e. the output
  of the fourth encoder layer after ``transformer.norm``, NOT L2-normalised
  (``normalize_descriptors = False``: upstream matches the raw tokens by dot product, see
  below; use the ``mnn`` matcher with ``similarity: dot``); scores: the multi-level attention;
- ``global_descriptor``: the output of ``pool`` (256-d, L2-normalised).

Upstream keeps every patch above the threshold, and so does ``max_keypoints: None``
(the default here); a positive ``max_keypoints`` keeps the highest-scoring patches, still
in raster order.

How upstream re-ranks with these features (``match_batch_tensor`` in ``test_msls.py``),
for the matcher and scorer of the pipeline: similarities are the dot products of the
*un-normalised* layer-3 tokens (not cosines); entries of patches at or below the
threshold are set to 0 and mutual nearest neighbours are taken on that matrix (so in
effect mutual nearest neighbours among the kept patches, plus a spurious ``(8, 8) <-> (8, 8)``
pair when the top-left patch is dropped in both images: argmax of an all-zero row and
column); on L2-normalised descriptors (cosines) the matches differ, see
``tests/reference/README_transvpr.md``; a homography is fitted with
``cv2.findHomography(query_points, candidate_points, cv2.RANSAC,
ransacReprojThreshold=24)`` (1.5 patches, in 480 x 640 pixels; OpenCV's default 2000
iterations and 0.995 confidence) and the score is the number of inliers (0 with fewer
than 4 matches); candidates are sorted by decreasing score.

Deviations from upstream:

- an image whose sides are not multiples of 16 (only with a ``resize`` other than the
  default) makes upstream fail (its four patch grids differ in size); here the image is
  cropped to ``16 * (H // 16)`` by ``16 * (W // 16)`` (bottom and right rows dropped) and
  the keypoints are those of the cropped part;
- upstream resizes the float image with ``transforms.Resize`` (bilinear; in the torchvision
  of 2022 without antialiasing); the pipeline resizes the 8-bit image with PIL's bilinear
  filter. Both datasets upstream was tested on (MSLS, Pitts30k) are already 640 x 480, where
  the two agree.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from .base import LocalModel, weights_file

#: upstream's test-time normalisation (ImageNet statistics)
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
PATCH = 16  # input pixels per patch side (four stride-2 poolings)
EMBED_DIM = 256
NUM_LAYERS = 6
NUM_HEADS = 4
MLP_RATIO = 2
#: channels of conv1..conv4 and the patch size of tokenizer1..tokenizer4 on their maps
CONV_CHANNELS = (64, 128, 256, 512)
TOKEN_PATCH = (8, 4, 2, 1)
#: encoder layers whose tokens ``pool`` aggregates (upstream ``POOL(level=[1, 3, 5])``)
POOL_LEVELS = (1, 3, 5)
NUM_PARAMETERS = 5_402_627


class Tokenizer(nn.Module):
    """Patch embedding of one feature map: ``[B, C, h, w]`` -> ``[B, (h/p) (w/p), 64]``."""

    def __init__(self, in_channels: int, patch: int, out_channels: int = EMBED_DIM // 4):
        super().__init__()
        self.conv_layer = nn.Conv2d(in_channels, out_channels, kernel_size=patch, stride=patch, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_layer(x).flatten(2, 3).transpose(-2, -1)


class Attention(nn.Module):
    """Multi-head self-attention with upstream's parameter names (``qkv`` has no bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class EncoderLayer(nn.Module):
    """Upstream's ``TransformerEncoderLayer`` at test time (dropout and drop-path off)."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.linear1 = nn.Linear(dim, hidden)
        self.norm1 = nn.LayerNorm(dim)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(self.pre_norm(x)))
        return x + self.linear2(F.gelu(self.linear1(x)))


class Encoder(nn.Module):
    """Class token + encoder layers; returns every layer's output after the shared ``norm``."""

    def __init__(self, dim: int = EMBED_DIM, num_layers: int = NUM_LAYERS, num_heads: int = NUM_HEADS,
                 mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.class_emb = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([EncoderLayer(dim, num_heads, dim * mlp_ratio) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, P, C]`` patch tokens -> ``[B, layers, 1 + P, C]`` (class token first)."""
        x = torch.cat((self.class_emb.expand(x.shape[0], -1, -1), x), dim=1)
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(self.norm(x))
        return torch.stack(out, dim=-3)


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)


class AttentionPool(nn.Module):
    """Upstream's ``POOL``: multi-level attention maps and the global descriptor."""

    def __init__(self, dim: int = EMBED_DIM, levels=POOL_LEVELS):
        super().__init__()
        self.dim, self.levels = dim, list(levels)
        self.fc = nn.Sequential(L2Norm(), nn.Linear(dim * len(levels), dim), L2Norm())
        self.attention_pool = nn.Linear(dim * len(levels), len(levels))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, layers, 1 + P, C]`` -> (global descriptors ``[B, C]``, attention ``[B, levels, P]``)."""
        x = tokens[:, self.levels]
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)[:, 1:]  # [B, P, C * levels]
        attention = F.softmax(self.attention_pool(x), dim=1).transpose(-1, -2)
        parts = [
            torch.matmul(attention[:, i:i + 1], x[..., i * self.dim:(i + 1) * self.dim]).squeeze(-2)
            for i in range(len(self.levels))
        ]
        return self.fc(torch.cat(parts, dim=-1)), attention


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


class TransVPRNet(nn.Module):
    """The architecture; ``state_dict()`` keys are those of the released files."""

    def __init__(self):
        super().__init__()
        cins = (3,) + CONV_CHANNELS[:-1]
        for i, (cin, cout) in enumerate(zip(cins, CONV_CHANNELS), 1):
            setattr(self, f"conv{i}", _conv_block(cin, cout))
        for i, (c, p) in enumerate(zip(CONV_CHANNELS, TOKEN_PATCH), 1):
            setattr(self, f"tokenizer{i}", Tokenizer(c, p))
        self.transformer = Encoder()
        self.pool = AttentionPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, 16 h, 16 w]`` -> tokens ``[B, 6, 1 + h w, 256]``."""
        seqs = []
        for i in range(1, 5):
            x = getattr(self, f"conv{i}")(x)
            seqs.append(getattr(self, f"tokenizer{i}")(x))
        return self.transformer(torch.cat(seqs, dim=-1))


def min_max_norm(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)`` over the last dimension (upstream's ``max_min_norm_tensor``;
    a constant row gives zeros instead of upstream's NaN)."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def multi_level_attention(attention: torch.Tensor) -> torch.Tensor:
    """``[..., levels, P]`` per-level attention -> ``[..., P]`` fused map in [0, 1]."""
    return min_max_norm(min_max_norm(attention).sum(dim=-2))


def patch_centres(h: int, w: int, device=None) -> torch.Tensor:
    """``[h w, 2]`` (x, y) pixel centres of an ``h x w`` patch grid, in raster order."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float() * PATCH + PATCH // 2


def load_transvpr_weights(net: TransVPRNet, path: str | os.PathLike) -> str:
    """Load a released TransVPR file (or a wrapped / ``module.``-prefixed copy) into ``net``.

    Returns the layout found. Missing or unexpected keys and shape mismatches raise
    :class:`ValueError` naming the file; a missing file raises :class:`FileNotFoundError`.
    BatchNorm ``num_batches_tracked`` counters (unused at inference) may be absent.
    """
    what = "TransVPR checkpoint"
    state, layout = read_state_dict(
        path, what, " (give the path to TransVPR_MSLS.pth or TransVPR_Pitts30k.pth from "
        "RuotongWANG/TransVPR-model-implementation)",
    )
    load_into(net, state, os.fspath(path), what, layout, "Extractor_base() + POOL",
              optional=lambda k: k.endswith("num_batches_tracked"))
    return layout


class TransVPR(LocalModel):
    """TransVPR key-patch descriptors and global descriptor; ``weights`` is a released ``.pth``."""

    normalize_descriptors = False  # upstream matches the raw tokens (dot products)
    default_conf: ClassVar[dict[str, Any]] = {
        "weights": None,
        "resize": [480, 640],  # [H, W], upstream's test size
        "max_keypoints": None,  # upstream keeps every patch above the threshold
        "threshold": 0.02,  # on the multi-level attention (test_msls.py --threshold)
        "layer": 3,  # encoder layer of the local descriptors (test_msls.py --layer)
    }

    def __init__(self, conf=None):
        super().__init__(conf)
        c = self.conf
        mk = c["max_keypoints"]
        if mk is not None and (mk == 0 or mk < -1):
            raise ValueError(f"TransVPR: max_keypoints must be positive, -1 or None (all), got {mk}")
        if not isinstance(c["layer"], int) or not 0 <= c["layer"] < NUM_LAYERS:
            raise ValueError(f"TransVPR: layer must be an encoder layer index 0..{NUM_LAYERS - 1}, got {c['layer']!r}")
        self.net = TransVPRNet()
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1), persistent=False)
        self.layout = load_transvpr_weights(self.net, weights_file(c["weights"], "TransVPR"))
        self.eval()

    @property
    def descriptor_dim(self) -> int:
        return EMBED_DIM

    @torch.inference_mode()
    def extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every patch of ``image [3, H, W]`` in [0, 1]: ``keypoints [P, 2]`` (centres),
        ``tokens [P, 256]`` (layer ``layer``, not normalised), ``attention [P]`` (fused),
        ``level_attention [3, P]`` (softmax maps of layers 1, 3, 5), ``global_descriptor [256]``."""
        h, w = image.shape[-2] // PATCH, image.shape[-1] // PATCH
        if h == 0 or w == 0:
            raise ValueError(f"TransVPR: image {tuple(image.shape[-2:])} is smaller than one {PATCH}x{PATCH} patch")
        x = image[None, :, : h * PATCH, : w * PATCH].float()
        tokens = self.net((x - self.mean) / self.std)
        global_desc, attention = self.net.pool(tokens)
        return {
            "keypoints": patch_centres(h, w, device=image.device),
            "tokens": tokens[0, self.conf["layer"], 1:],
            "attention": multi_level_attention(attention)[0],
            "level_attention": attention[0],
            "global_descriptor": global_desc[0],
        }

    def _forward(self, image):
        c = self.conf
        out = self.extract(image)
        scores = out["attention"]
        keep = torch.nonzero(scores > c["threshold"]).flatten()  # raster order
        mk = c["max_keypoints"]
        if mk is not None and 0 < mk < len(keep):
            top = torch.topk(scores[keep], mk, sorted=False).indices
            keep = keep[top.sort().values]
        return {
            "keypoints": out["keypoints"][keep],
            "descriptors": out["tokens"][keep],
            "scores": scores[keep],
            "global_descriptor": out["global_descriptor"],
        }


def init_weights(net: TransVPRNet) -> None:
    """Upstream's initialisation: He-normal convolutions, truncated-normal (std 0.02) linear
    layers with zero biases, LayerNorms 1 / 0, zero class token; other tensors keep PyTorch's
    defaults (conv biases uniform, BatchNorm 1 / 0 with statistics 0 / 1)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear) and m is not net.pool.attention_pool and m is not net.pool.fc[1]:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.zeros_(net.transformer.class_emb)


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded, randomly initialised TransVPR in the released layout.

    A plain state dict (as ``TransVPR_MSLS.pth``): upstream's key names, float32 tensors,
    int64 ``num_batches_tracked``. Values come from upstream's own initialisation (see
    :func:`init_weights`) after ``torch.manual_seed(seed)``; ``pool``'s two linear layers keep
    PyTorch's default init, as upstream's do (its init hooks run before ``pool`` is added).
    ``conf`` is accepted for the common signature; the architecture does not depend on it.
    The result is NOT a trained model.
    """
    torch.manual_seed(seed)
    net = TransVPRNet()
    init_weights(net)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, path)
