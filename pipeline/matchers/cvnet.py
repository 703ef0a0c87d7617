"""CVNet-Rerank (Lee et al., CVPR 2022, "Correlation Verification for Image Retrieval").

A pair model on images: it reads a query and a candidate and returns one re-ranking
score, the probability that the two show the same object / place. The network and
its parameter names follow sungonce/CVNet (``model/CVNet_Rerank_model.py``,
``model/resnet.py``, ``model/CVlearner.py``, ``model/base/*.py``), so the released
``CVPR2022_CVNet_R50.pyth`` / ``CVPR2022_CVNet_R101.pyth`` load strictly, without
renaming. (The released files are not available here; their layout is what upstream's
``core/checkpoint.py`` reads: ``checkpoint['model_state']``, every key of which must be
a key of ``CVNet_Rerank`` with its shape. Other top-level entries, such as pycls'
``epoch`` / ``optimizer_state`` / ``cfg``, are ignored; a plain state dict loads too.)

* ``encoder_q``: pycls' ResNet-50/101 (``stem.conv/bn``, then stages ``s1..s4`` of
  blocks ``b<i>`` with ``proj``/``bn`` shortcuts and bottleneck ``f.a/b/c`` + ``_bn``;
  stride on the 3x3) and the global head ``head.pool.p`` (GeM, learnt p) +
  ``head.fc`` (2048 -> 2048 "whitening"). The global branch (CVNet-Global) is in the
  file and loaded; the re-ranking score does not use ``s4`` or ``head``.
* re-ranking branch: the output of the last block of ``s3`` (stride 16, 1024
  channels; taken *before* that block's ReLU, as upstream's ``extract_feat_res_pycls``
  does) is resized bilinearly (``align_corners=True``) to ``round(h * sqrt(a))`` x
  ``round(w * sqrt(a))`` for the areas ``a`` in (1/4, 1/2, 1), i.e. side factors
  1/2, 1/sqrt(2), 1 (Python's ``round``: halves go to the even integer), and each
  level goes through its own ``conv2ds.<i>`` (3x3, 1024 -> 256, no bias). This
  per-image feature pyramid is what :meth:`CVNet.prepare` computes, once per image.
* cross-scale correlation: for every (query level, candidate level) pair the cosine
  similarity of all position pairs, ``<q, k> / (|q| |k| + 1e-8)``, each 4D map
  resized (bilinear, ``align_corners=True``, query dims then candidate dims) to the
  full-resolution ``(hq, wq, hk, wk)`` and clamped at 0 (ReLU): 9 channels, ordered
  query level major.
* ``cv_learner``: four blocks of center-pivot 4D convolutions (HSNet; a 4D kernel
  approximated by a 2D conv over the query dims at every candidate position plus a 2D
  conv over the candidate dims at every query position), each followed by
  ``GroupNorm(4)`` and ReLU: 9 -> 16 (5^4, stride 2) | 16 -> 16 -> 32 (3^4, strides 1, 2)
  | 32 -> 32 -> 32 -> 64 (strides 1, 1, 2) | 64 -> 64 -> 64 -> 128 (stride 1); a stride
  keeps every s-th position (from 0) in the dims the 2D conv does not see. Then the mean
  over the four dims and ``mlp`` (128 -> 128, ReLU, 128 -> 2).
* score: ``softmax(logits)[1]`` (upstream's ``extract_score_with_featuremap``),
  returned as ``pair_score`` (a 1-vector).

Test-time inference as upstream's ``test/test_model.py`` / ``test/dataset.py``:

* images as read by ``cv2.imread``: **BGR** channel order, ``/ 255``, then
  ``(x - mean) / std`` with the ImageNet statistics in BGR order (mean
  ``[0.406, 0.456, 0.485]``, std ``[0.225, 0.224, 0.229]``). Our inputs are RGB in
  [0, 1]; :func:`normalize` flips them to BGR.
* re-ranking at a single scale, the image as stored (the Revisited Oxford / Paris jpgs,
  longer side 1024 px; queries cropped to their box). The pipeline resizes per
  ``resize``; the default 1024 gives the longer side that upstream's images have and
  bounds the memory of the 4D correlation (at 1024 x 768 it holds 9 x 64 x 48 x 64 x 48
  floats, ~340 MB per pair). ``resize: null`` feeds the images as they are.
* the final ranking of the top-100 global candidates is by
  ``sim_global + 0.5 * score`` (``test/test_utils.py``: ``mix_score(sim_ori, sim_corr,
  ratio)`` with ``mix_ratio = 0.5``), where ``sim_global`` is the dot product of
  CVNet-Global descriptors (multi-scale: scales 0.7071, 1, 1.4142, each L2-normalised,
  averaged, re-normalised). In this pipeline the ``pair_score`` scorer adds the
  *retrieval stage's* cosine similarity instead: ``{name: pair_score, model_weight: 0.5,
  global_weight: 1.0}``. :meth:`CVNet.global_descriptor` gives CVNet-Global's own
  descriptor for whoever wants upstream's similarity.

``forward_many`` scores a query against many candidates in batches of
``batch_size`` (candidates with equal feature-map sizes go together); the results
are those of one pair at a time (to float rounding). Measured on an H200 (torch 2.11,
default TF32 convolutions, 1024 x 701 images): 4 ms per image for ``prepare``, about
1 s per query for 100 candidates (1.11 s at ``batch_size`` 1, 0.99 s at 8), peak
memory 0.7 / 3.9 / 7.6 GB at ``batch_size`` 1 / 8 / 16. With TF32 the logits differ
from a float32 run by ~2e-4 (scores ~2e-5), as upstream's own on such a GPU.

Deviations, only where upstream fails: a feature map so small that a pyramid level
would have 0 rows or columns (upstream: an error) gets 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import WRAPPER_KEYS, load_into, read_file, unwrap
from ..local_features.base import weights_file
from ..pycls_resnet import ResNet as PyclsResNet
from .base import Matcher

#: upstream's ``test/dataset.py`` statistics, in BGR order (cv2.imread)
BGR_MEAN = (0.406, 0.456, 0.485)
BGR_STD = (0.225, 0.224, 0.229)
#: blocks per ResNet stage
#: upstream's ``CVNet_Rerank.scales``: areas; the feature map's sides scale by their square roots
PYRAMID_AREAS = (0.25, 0.5, 1.0)
RERANK_CHANNELS = 256
#: the cosine similarity's ``eps`` (added to the product of the norms)
CORR_EPS = 1e-8
#: upstream's ``mix_ratio``: final score = global similarity + MIX_RATIO * rerank score
MIX_RATIO = 0.5
#: what the released file wraps the state dict in (pycls' ``checkpoint['model_state']``)
FILE_WRAPPER = "model_state"


# --------------------------------------------------------------------------- ResNet (pycls)


class ResNet(PyclsResNet):
    """pycls' ResNet with CVNet's global head; parameter names as upstream's ``model/resnet.py``."""

    def __init__(self, depth: int = 50, reduction_dim: int = 2048):
        if depth not in (50, 101):
            raise ValueError(f"CVNet: depth must be one of [50, 101], got {depth}")
        super().__init__(depth, reduction_dim, what="CVNet")

    def global_from_res3(self, res3: torch.Tensor) -> torch.Tensor:
        """The global descriptor (not normalised) from :meth:`res3`'s output."""
        return self.global_descriptor(F.relu(res3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_from_res3(self.res3(x))


# --------------------------------------------------------------------------- 4D correlation learner


class CenterPivotConv4d(nn.Module):
    """HSNet's center-pivot 4D convolution on ``[B, C, ha, wa, hb, wb]``.

    ``conv1`` runs over the query dims ``(ha, wa)`` at every candidate position kept by
    the candidate stride, ``conv2`` over the candidate dims at every query position
    kept by the query stride; the two are added.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, query_stride: int, key_stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel, stride=query_stride, padding=kernel // 2)
        self.conv2 = nn.Conv2d(c_in, c_out, kernel, stride=key_stride, padding=kernel // 2)
        self.query_stride, self.key_stride = query_stride, key_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        sq, sk = self.query_stride, self.key_stride
        x1 = x[..., ::sk, ::sk] if sk > 1 else x
        _, _, ha, wa, hb, wb = x1.shape
        y1 = self.conv1(x1.permute(0, 4, 5, 1, 2, 3).reshape(b * hb * wb, c, ha, wa))
        y1 = y1.view(b, hb, wb, *y1.shape[1:]).permute(0, 3, 4, 5, 1, 2)
        x2 = x[:, :, ::sq, ::sq] if sq > 1 else x
        _, _, ha, wa, hb, wb = x2.shape
        y2 = self.conv2(x2.permute(0, 2, 3, 1, 4, 5).reshape(b * ha * wa, c, hb, wb))
        y2 = y2.view(b, ha, wa, *y2.shape[1:]).permute(0, 3, 1, 2, 4, 5)
        return (y1 + y2).contiguous()


def _block(c_in: int, channels: Sequence[int], kernels: Sequence[int], strides: Sequence[int]) -> nn.Sequential:
    """``[Conv4d, GroupNorm(4), ReLU]`` per layer (the same stride in query and candidate dims)."""
    layers: list[nn.Module] = []
    for c_out, k, s in zip(channels, kernels, strides):
        layers += [CenterPivotConv4d(c_in, c_out, k, s, s), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers)


class CVLearner(nn.Module):
    """Upstream's ``CVLearner``: 4D conv blocks, mean pooling, a 2-layer MLP -> 2 logits."""

    def __init__(self, c_in: int = len(PYRAMID_AREAS) ** 2):
        super().__init__()
        self.block1 = _block(c_in, [16], [5], [2])
        self.block2 = _block(16, [16, 32], [3, 3], [1, 2])
        self.block3 = _block(32, [32, 32, 64], [3, 3, 3], [1, 1, 2])
        self.block4 = _block(64, [64, 64, 128], [3, 3, 3], [1, 1, 1])
        self.mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))

    def forward(self, corr: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(corr))))
        return self.mlp(x.flatten(2).mean(-1))


# --------------------------------------------------------------------------- the network


def normalize(image: torch.Tensor) -> torch.Tensor:
    """RGB ``[3, H, W]`` in [0, 1] -> upstream's network input ``[1, 3, H, W]`` (BGR, ImageNet-normalised)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"CVNet: expected an RGB image [3, H, W], got {tuple(image.shape)}")
    x = image.flip(0)
    mean = torch.tensor(BGR_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(BGR_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return ((x - mean) / std)[None]


def pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Feature-pyramid level sizes for an ``h x w`` map (Python ``round``: half to even, as upstream)."""
    return [(max(1, round(h * math.sqrt(a))), max(1, round(w * math.sqrt(a)))) for a in PYRAMID_AREAS]


def resize4d(corr: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly (``align_corners=True``) resize ``[B, ha, wa, hb, wb]``: query dims, then candidate dims."""
    b, ha, wa, hb, wb = corr.shape
    oha, owa, ohb, owb = size
    if (ha, wa) != (oha, owa):
        x = corr.reshape(b, ha, wa, hb * wb).permute(0, 3, 1, 2)
        x = F.interpolate(x, (oha, owa), mode="bilinear", align_corners=True)
        corr = x.permute(0, 2, 3, 1).reshape(b, oha, owa, hb, wb)
    if (hb, wb) != (ohb, owb):
        x = corr.reshape(b, oha * owa, hb, wb)
        x = F.interpolate(x, (ohb, owb), mode="bilinear", align_corners=True)
        corr = x.reshape(b, oha, owa, ohb, owb)
    return corr


class CVNetRerank(nn.Module):
    """The network alone (upstream's ``CVNet_Rerank``), official parameter names, no weights loaded."""

    def __init__(self, depth: int = 50, reduction_dim: int = 2048):
        super().__init__()
        self.depth = int(depth)
        self.encoder_q = ResNet(depth, reduction_dim)
        self.conv2ds = nn.ModuleList(
            nn.Conv2d(1024, RERANK_CHANNELS, 3, padding=1, bias=False) for _ in PYRAMID_AREAS
        )
        self.cv_learner = CVLearner(len(PYRAMID_AREAS) ** 2)

    def pyramid(self, res3: torch.Tensor) -> dict:
        """Per-image part of the re-ranking branch: ``res3 [1, 1024, h, w]`` -> the scale-wise maps.

        Returns ``{"size": (h, w), "levels": [(feats [256, n], norms [n], (hs, ws)), ...]}``.
        """
        h, w = res3.shape[-2:]
        levels = []
        for conv, (hs, ws) in zip(self.conv2ds, pyramid_sizes(h, w)):
            x = res3 if (hs, ws) == (h, w) else F.interpolate(res3, (hs, ws), mode="bilinear", align_corners=True)
            f = conv(x)[0].flatten(1)
            levels.append((f, f.norm(dim=0), (hs, ws)))
        return {"size": (int(h), int(w)), "levels": levels}

    def correlation(self, query: dict, keys: Sequence[dict]) -> torch.Tensor:
        """Cross-scale correlation ``[B, 9, hq, wq, hk, wk]`` of a query pyramid and B candidate
        pyramids of one size (query level major, candidate level minor)."""
        hq, wq = query["size"]
        hk, wk = keys[0]["size"]
        if any(k["size"] != (hk, wk) for k in keys):
            raise ValueError("CVNet: candidates batched together must have one feature-map size")
        n = len(PYRAMID_AREAS)
        ref = query["levels"][0][0]
        out = ref.new_empty((len(keys), n * n, hq, wq, hk, wk))
        for i, (fq, nq, (hqs, wqs)) in enumerate(query["levels"]):
            for j in range(n):
                fk = torch.stack([k["levels"][j][0] for k in keys])  # [B, C, nk]
                nk = torch.stack([k["levels"][j][1] for k in keys])  # [B, nk]
                hks, wks = keys[0]["levels"][j][2]
                corr = torch.matmul(fq.t(), fk) / (nq[None, :, None] * nk[:, None, :] + CORR_EPS)
                corr = resize4d(corr.view(len(keys), hqs, wqs, hks, wks), (hq, wq, hk, wk))
                torch.clamp(corr, min=0, out=out[:, i * n + j])
        return out

    def logits(self, query: dict, keys: Sequence[dict]) -> torch.Tensor:
        """``[B, 2]`` logits (class 1: same object) of a query against B same-size candidates."""
        return self.cv_learner(self.correlation(query, keys))


# --------------------------------------------------------------------------- loading


def load_cvnet_weights(net: CVNetRerank, path: str | os.PathLike) -> str:
    """Load a CVNet checkpoint (``{'model_state': ...}`` as released, or a plain / otherwise wrapped
    state dict) into ``net``; returns the layout. Mismatches raise ValueError naming the file."""
    path = os.fspath(path)
    what = "CVNet checkpoint"
    state, layout = unwrap(read_file(path, what), path, what, wrapper_keys=(FILE_WRAPPER, *WRAPPER_KEYS))
    load_into(net, state, path, what, layout, f"CVNet_Rerank ResNet-{net.depth}",
              optional=lambda k: k.endswith("num_batches_tracked"))  # BN counters, unused at inference
    return layout


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded random CVNet-Rerank in the released layout (``{'model_state': state}``).

    Torch's default initialisation under ``torch.manual_seed(seed)`` (BatchNorm: identity,
    running mean 0 / variance 1; GeM ``p`` = 3): finite features and a re-ranking score
    strictly between 0 and 1. NOT a trained model. ``conf`` may set ``depth`` /
    ``reduction_dim``.
    """
    c = {**CVNet.default_conf, **(conf or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CVNetRerank(int(c["depth"]), int(c["reduction_dim"]))
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    torch.save({FILE_WRAPPER: state}, path)


# --------------------------------------------------------------------------- the matcher


class CVNet(Matcher):
    """CVNet-Rerank as an image-input pair model; ``weights`` is ``CVPR2022_CVNet_R50.pyth``."""

    inputs = "images"
    output = "pair_score"
    score_dim = 1
    default_conf: ClassVar[dict[str, Any]] = {
        "weights": None,  # CVPR2022_CVNet_R50.pyth (or _R101 with depth 101); never downloaded
        "resize": 1024,  # longer side, px (upstream: the Revisited Oxford/Paris images as stored)
        "depth": 50,
        "reduction_dim": 2048,  # CVNet-Global's descriptor size (the file's head.fc)
        "batch_size": 8,  # candidates per batch in forward_many (~0.5 GB of GPU memory per pair at 1024 px)
        "global_scales": [0.7071, 1.0, 1.4142],  # global_descriptor only (upstream TEST.SCALE_LIST)
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        path = weights_file(c["weights"], "CVNet")
        if int(c["batch_size"]) < 1:
            raise ValueError(f"CVNet: batch_size must be >= 1, got {c['batch_size']}")
        self.net = CVNetRerank(int(c["depth"]), int(c["reduction_dim"]))
        self.layout = load_cvnet_weights(self.net, path)
        self.eval()

    def _device(self) -> torch.device:
        return self.net.conv2ds[0].weight.device

    @torch.inference_mode()
    def prepare(self, image: torch.Tensor) -> dict:
        """RGB ``[3, H, W]`` in [0, 1] -> the image's feature pyramid (cached by the pipeline)."""
        x = normalize(image.to(self._device(), torch.float32))
        return self.net.pyramid(self.net.encoder_q.res3(x))

    @torch.inference_mode()
    def logits(self, query: dict, candidates: Sequence[dict]) -> torch.Tensor:
        """``[K, 2]`` logits of a prepared query against K prepared candidates (batched by size)."""
        out: list[torch.Tensor | None] = [None] * len(candidates)
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(candidates):
            groups.setdefault(c["size"], []).append(i)
        step = int(self.conf["batch_size"])
        for idx in groups.values():
            for s in range(0, len(idx), step):
                chunk = idx[s : s + step]
                for i, row in zip(chunk, self.net.logits(query, [candidates[i] for i in chunk])):
                    out[i] = row
        return torch.stack(out) if out else torch.zeros((0, 2), device=self._device())

    def _forward(self, p0: dict, p1: dict) -> dict[str, torch.Tensor]:
        return self._forward_many(p0, [p1])[0]

    def _forward_many(self, p0: dict, candidates: list) -> list[dict[str, torch.Tensor]]:
        scores = torch.softmax(self.logits(p0, candidates), dim=1)[:, 1]
        return [{"pair_score": s.reshape(1)} for s in scores]

    @torch.inference_mode()
    def global_descriptor(self, image: torch.Tensor, scales: Sequence[float] | None = None) -> torch.Tensor:
        """CVNet-Global's L2-normalised descriptor ``[reduction_dim]`` of an RGB ``[3, H, W]`` image.

        At each scale the image is resized (upstream: ``cv2.resize`` of the 8-bit image,
        INTER_AREA below 1, INTER_LINEAR above; here antialiased / plain bilinear on the
        float image, so multi-scale descriptors approximate upstream's), the descriptor
        L2-normalised; the mean over the scales is L2-normalised again. ``scales``
        defaults to the conf's ``global_scales``; ``[1.0]`` is upstream's
        ``extract_global_descriptor`` exactly.
        """
        scales = list(self.conf["global_scales"] if scales is None else scales)
        x = normalize(image.to(self._device(), torch.float32))
        h, w = x.shape[-2:]
        descs = []
        for s in scales:
            xs = x
            if s != 1.0:
                size = (max(1, round(h * s)), max(1, round(w * s)))
                xs = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=s < 1.0)
            descs.append(F.normalize(self.net.encoder_q(xs), dim=1))
        return F.normalize(torch.stack(descs).mean(0), dim=1)[0]
