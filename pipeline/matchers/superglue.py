"""SuperGlue (Sarlin et al., CVPR 2020), loading the official magicleap release files.

The network follows magicleap/SuperGluePretrainedNetwork ``models/superglue.py`` so that
``superglue_outdoor.pth`` / ``superglue_indoor.pth`` load without renaming:

* keypoints are centred on the image and divided by ``0.7 * max(width, height)``;
* ``kenc.encoder``: a 1x1-conv MLP ``[3, 32, 64, 128, 256, 256]`` (BatchNorm + ReLU between
  layers) on ``(x, y, score)``, added to the descriptors;
* ``gnn.layers.<i>``: 18 attentional propagation layers alternating self / cross
  attention (4 heads; ``attn.proj.{0,1,2}`` for query/key/value, ``attn.merge``, then
  ``mlp`` on ``[x, message]``), each adding its output to the descriptors;
* ``final_proj``, inner products scaled by ``1 / sqrt(descriptor_dim)``;
* log-space Sinkhorn optimal transport (100 iterations) with one extra "dustbin" row and
  column scored ``bin_score``;
* mutual nearest neighbours of the assignment whose probability exceeds
  ``match_threshold``.

The layers are ``Conv1d(kernel_size=1)`` modules, as upstream's, so that parameter names
and shapes are the official ones, but they are applied as ``F.linear`` on ``[N, D]``
descriptors (our extractors' layout; upstream's is ``[B, D, N]``): on CPU that avoids
oneDNN's per-weight convolution set-up, on GPU it keeps cuDNN's TF32 convolutions out.
The channel split into attention heads (channel ``c`` goes to head ``c % 4``) is
upstream's, since the trained weights depend on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from .base import Matcher, pad_features

logger = logging.getLogger(__name__)

NUM_HEADS = 4


def _conv_mlp(channels: Sequence[int]) -> nn.Sequential:
    """1x1 convolutions ``channels[0] -> ... -> channels[-1]``; BatchNorm + ReLU between them."""
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(pairwise(channels)):
        layers.append(nn.Conv1d(c_in, c_out, kernel_size=1, bias=True))
        if i < len(channels) - 2:
            layers += [nn.BatchNorm1d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _pointwise(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 conv (or a sequence of them with BatchNorm/ReLU) to ``x [N, C]``."""
    if isinstance(layers, nn.Conv1d):
        return F.linear(x, layers.weight[..., 0], layers.bias)
    for layer in layers:
        if isinstance(layer, nn.Conv1d):
            x = _pointwise(layer, x)
        elif isinstance(layer, nn.BatchNorm1d) and x.ndim > 2:  # [B, N, C]: normalise the channels
            x = layer(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        else:
            # BatchNorm1d normalises the channels of an [N, C] input as of a [1, C, N] one
            x = layer(x)
    return x


class KeypointEncoder(nn.Module):
    """MLP on ``(x, y, score)`` -> a ``dim``-channel positional embedding."""

    def __init__(self, dim: int, hidden: Sequence[int]):
        super().__init__()
        self.encoder = _conv_mlp([3, *hidden, dim])

    def forward(self, kpts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # kpts [(B,) N, 2] (normalised), scores [(B,) N] -> [(B,) N, dim]
        return _pointwise(self.encoder, torch.cat([kpts, scores[..., None]], dim=-1))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SuperGlue: descriptor_dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.proj = nn.ModuleList(nn.Conv1d(dim, dim, kernel_size=1) for _ in range(3))
        self.merge = nn.Conv1d(dim, dim, kernel_size=1)

    def _heads(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # [..., N, D] -> [..., H, N, D/H]; channel c = d * H + h belongs to head h
        *lead, n, dim = x.shape
        return _pointwise(conv, x).view(*lead, n, dim // self.num_heads, self.num_heads).movedim(-1, -3)

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [(B,) N, D]`` attends to ``source [(B,) S, D]``; ``mask [B, 1, 1, S]``: the real sources."""
        q = self._heads(self.proj[0], x)
        k = self._heads(self.proj[1], source)
        v = self._heads(self.proj[2], source)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q k^T / sqrt(D/H)) v
        return _pointwise(self.merge, out.movedim(-3, -1).reshape(x.shape))


class AttentionalPropagation(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads)
        self.mlp = _conv_mlp([2 * dim, 2 * dim, dim])

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _pointwise(self.mlp, torch.cat([x, self.attn(x, source, mask)], dim=-1))


class AttentionalGNN(nn.Module):
    def __init__(self, dim: int, layer_names: Sequence[str]):
        super().__init__()
        bad = sorted({n for n in layer_names if n not in ("self", "cross")})
        if bad:
            raise ValueError(f"SuperGlue: gnn_layers must be 'self' or 'cross', got {bad}")
        self.names = list(layer_names)
        self.layers = nn.ModuleList(AttentionalPropagation(dim, NUM_HEADS) for _ in self.names)

    def forward(self, d0: torch.Tensor, d1: torch.Tensor, mask0: torch.Tensor | None = None,
                mask1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask0`` / ``mask1`` (``[B, 1, 1, N]``, batched input only): the real points of each image."""
        for layer, name in zip(self.layers, self.names):
            s0, s1 = (d1, d0) if name == "cross" else (d0, d1)
            k0, k1 = (mask1, mask0) if name == "cross" else (mask0, mask1)
            d0, d1 = d0 + layer(d0, s0, k0), d1 + layer(d1, s1, k1)
        return d0, d1


#: log-weight of padded rows / columns in the batched optimal transport: exp() of it is 0
PAD = -1e9


def log_optimal_transport_batch(scores: torch.Tensor, bin_score: torch.Tensor, iters: int,
                                n0: torch.Tensor, n1: torch.Tensor) -> torch.Tensor:
    """:func:`log_optimal_transport` of ``B`` padded score matrices ``[B, M, N]`` at once.

    Pair ``b`` has ``n0[b]`` rows and ``n1[b]`` columns; the dustbins are the last row and
    column. Padded rows and columns get a log mass and couplings of :data:`PAD`, whose
    exponentials are exactly zero, so each pair's transport is the one it gets alone.
    """
    b, m, n = scores.shape
    dev = scores.device
    rows = torch.arange(m, device=dev)[None] < n0[:, None].to(dev)
    cols = torch.arange(n, device=dev)[None] < n1[:, None].to(dev)
    alpha = bin_score.to(scores)
    couplings = scores.new_full((b, m + 1, n + 1), 0.0)
    couplings[:, :m, :n] = scores
    couplings[:, :m, n] = alpha
    couplings[:, m, :] = alpha
    real_r = torch.cat([rows, rows.new_ones((b, 1))], 1)
    real_c = torch.cat([cols, cols.new_ones((b, 1))], 1)
    couplings = couplings.masked_fill(~(real_r[:, :, None] & real_c[:, None, :]), PAD)
    fm, fn = n0.to(scores), n1.to(scores)
    norm = -(fm + fn).log()
    log_mu = torch.cat([norm[:, None].expand(b, m), (fn.log() + norm)[:, None]], 1).masked_fill(~real_r, PAD)
    log_nu = torch.cat([norm[:, None].expand(b, n), (fm.log() + norm)[:, None]], 1).masked_fill(~real_c, PAD)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
    return couplings + u[:, :, None] + v[:, None, :] - norm[:, None, None]


def normalize_keypoints(kpts: torch.Tensor, width, height) -> torch.Tensor:
    """Pixel ``(x, y)`` -> centred on the image, in units of ``0.7 * max(width, height)``."""
    size = torch.stack([torch.as_tensor(width), torch.as_tensor(height)]).to(kpts)
    return (kpts - size / 2) / (size.max() * 0.7)


def log_optimal_transport(scores: torch.Tensor, bin_score: torch.Tensor, iters: int) -> torch.Tensor:
    """Entropic OT with a dustbin row/column, in log space.

    ``scores [M, N]`` -> log assignment ``[M+1, N+1]``: each of the M (N) points carries
    mass 1 and the dustbin row (column) mass N (M); the result is the log of the
    transport plan scaled so that a point's row (column) sums to one.
    """
    m, n = scores.shape
    alpha = bin_score.to(scores).reshape(1, 1)
    couplings = torch.cat(
        [torch.cat([scores, alpha.expand(m, 1)], 1), torch.cat([alpha.expand(1, n), alpha], 1)], 0
    )
    fm, fn = scores.new_tensor(float(m)), scores.new_tensor(float(n))
    norm = -(fm + fn).log()
    log_mu = torch.cat([norm.expand(m), (fn.log() + norm)[None]])
    log_nu = torch.cat([norm.expand(n), (fm.log() + norm)[None]])
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v[None, :], dim=1)
        v = log_nu - torch.logsumexp(couplings + u[:, None], dim=0)
    return couplings + u[:, None] + v[None, :] - norm


class SuperGlueNet(nn.Module):
    """The network alone, with the official parameter names (no weights loaded)."""

    def __init__(
        self,
        descriptor_dim: int = 256,
        keypoint_encoder: Sequence[int] = (32, 64, 128, 256),
        gnn_layers: Sequence[str] = ("self", "cross") * 9,
        sinkhorn_iterations: int = 100,
    ):
        super().__init__()
        self.descriptor_dim = int(descriptor_dim)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.kenc = KeypointEncoder(self.descriptor_dim, list(keypoint_encoder))
        self.gnn = AttentionalGNN(self.descriptor_dim, list(gnn_layers))
        self.final_proj = nn.Conv1d(self.descriptor_dim, self.descriptor_dim, kernel_size=1, bias=True)
        self.bin_score = nn.Parameter(torch.tensor(1.0))

    def forward(self, f0: dict, f1: dict) -> torch.Tensor:
        """Log assignment ``[N0+1, N1+1]`` (last row / column: dustbins) for two feature dicts."""
        w = self.final_proj.weight
        desc = []
        for f in (f0, f1):
            d = torch.as_tensor(f["descriptors"]).to(w)
            if d.ndim != 2 or d.shape[1] != self.descriptor_dim:
                raise ValueError(
                    f"SuperGlue: descriptors must be [N, {self.descriptor_dim}], got {tuple(d.shape)}"
                )
            k = torch.as_tensor(f["keypoints"]).to(w)
            s = torch.as_tensor(f["scores"]).to(w)
            width, height = torch.as_tensor(f["image_size"]).reshape(2).tolist()
            desc.append(d + self.kenc(normalize_keypoints(k, width, height), s))
        d0, d1 = self.gnn(*desc)
        m0, m1 = _pointwise(self.final_proj, d0), _pointwise(self.final_proj, d1)
        scores = (m0 @ m1.t()) / self.descriptor_dim**0.5
        return log_optimal_transport(scores, self.bin_score, self.sinkhorn_iterations)

    def forward_batch(self, f0: dict, f1: dict, n0: torch.Tensor, n1: torch.Tensor) -> torch.Tensor:
        """Log assignments ``[B, M+1, N+1]`` of padded feature batches (``keypoints [B, M, 2]``,
        ``descriptors [B, M, D]``, ``scores [B, M]``, ``image_size [B, 2]``); pair ``b`` has
        ``n0[b]`` / ``n1[b]`` real points, padded rows and columns are to be ignored."""
        w = self.final_proj.weight
        desc, masks = [], []
        for f, n in ((f0, n0), (f1, n1)):
            d = f["descriptors"].to(w)
            if d.shape[-1] != self.descriptor_dim:
                raise ValueError(f"SuperGlue: descriptors must be [N, {self.descriptor_dim}], got {tuple(d.shape[1:])}")
            size = f["image_size"].to(w)  # [B, 2]
            k = (f["keypoints"].to(w) - size[:, None] / 2) / (size.max(1).values[:, None, None] * 0.7)
            desc.append(d + self.kenc(k, f["scores"].to(w)))
            masks.append((torch.arange(d.shape[1], device=d.device)[None] < n.to(d.device)[:, None])[:, None, None])
        d0, d1 = self.gnn(desc[0], desc[1], masks[0], masks[1])
        m0, m1 = _pointwise(self.final_proj, d0), _pointwise(self.final_proj, d1)
        scores = torch.bmm(m0, m1.transpose(1, 2)) / self.descriptor_dim**0.5
        return log_optimal_transport_batch(scores, self.bin_score, self.sinkhorn_iterations, n0, n1)


def mutual_matches(log_assignment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual arg-max pairs of the assignment (dustbins excluded) with probability > threshold."""
    z = log_assignment[:-1, :-1]
    max0, max1 = z.max(1), z.max(0)
    idx0 = torch.arange(z.shape[0], device=z.device)
    mutual = max1.indices[max0.indices] == idx0
    prob = torch.where(mutual, max0.values.exp(), torch.zeros_like(max0.values))
    valid = mutual & (prob > threshold)
    return torch.stack([idx0[valid], max0.indices[valid]], 1), prob[valid]


# --------------------------------------------------------------------------- loading


def load_superglue_weights(net: SuperGlueNet, path: str | os.PathLike) -> str:
    """Load an official SuperGlue file (or a wrapped / ``module.``-prefixed copy) into ``net``.

    Returns the layout found. Missing or unexpected keys and shape mismatches raise
    :class:`ValueError` naming the file; a missing file raises :class:`FileNotFoundError`.
    BatchNorm ``num_batches_tracked`` counters (unused at inference) may be absent.
    """
    state, layout = read_state_dict(
        path, "SuperGlue weights",
        " (give the path to superglue_outdoor.pth or superglue_indoor.pth from magicleap/SuperGluePretrainedNetwork)",
    )
    load_into(net, state, os.fspath(path), "SuperGlue weights", layout,
              f"descriptor_dim={net.descriptor_dim}, {len(net.gnn.layers)} GNN layers",
              optional=lambda k: k.endswith("num_batches_tracked"))  # unused at inference
    return layout


class SuperGlue(Matcher):
    default_conf = {
        "weights": None,  # path to superglue_outdoor.pth / superglue_indoor.pth (never downloaded)
        "descriptor_dim": 256,
        "keypoint_encoder": [32, 64, 128, 256],
        "gnn_layers": ["self", "cross"] * 9,
        "sinkhorn_iterations": 100,
        "match_threshold": 0.2,
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        if not c["weights"]:
            raise ValueError(
                "SuperGlue: no 'weights' path configured. Weights are never downloaded: download "
                "superglue_outdoor.pth (or superglue_indoor.pth) from "
                "https://github.com/magicleap/SuperGluePretrainedNetwork (models/weights/) and set "
                "its path as the matcher's 'weights'."
            )
        self.net = SuperGlueNet(
            c["descriptor_dim"], c["keypoint_encoder"], c["gnn_layers"], c["sinkhorn_iterations"]
        )
        self.layout = load_superglue_weights(self.net, c["weights"])
        self.eval()

    @torch.inference_mode()
    def log_assignment(self, f0: dict, f1: dict) -> torch.Tensor:
        """The optimal-transport log assignment ``[N0+1, N1+1]`` (dustbins last)."""
        return self.net(f0, f1)

    def _forward(self, f0, f1):
        matches, scores = mutual_matches(self.net(f0, f1), self.conf["match_threshold"])
        return {"matches": matches, "scores": scores}

    def pair_bytes(self, n0, n1):
        # Sinkhorn: couplings and two temporaries of (n0+1) x (n1+1); attention: 4 heads x n0 x n1
        return 4 * (n0 + 1) * (n1 + 1) * (4 + NUM_HEADS * 2) + 64 * (n0 + n1) * self.net.descriptor_dim

    def _forward_block(self, pairs):
        keys = ("keypoints", "descriptors", "scores")
        f0, _, n0 = pad_features([p[0] for p in pairs], keys)
        f1, _, n1 = pad_features([p[1] for p in pairs], keys)
        dev = f0["keypoints"].device
        for f, side in ((f0, 0), (f1, 1)):
            f["image_size"] = torch.stack([torch.as_tensor(p[side]["image_size"]).reshape(2) for p in pairs]).to(dev)
        la = self.net.forward_batch(f0, f1, n0, n1)
        out = []
        for b in range(len(pairs)):
            z = la[b]
            a, c = int(n0[b]), int(n1[b])
            # the pair's own rows and columns, dustbins last, as the unbatched assignment
            own = torch.cat([torch.cat([z[:a, :c], z[:a, -1:]], 1), torch.cat([z[-1:, :c], z[-1:, -1:]], 1)], 0)
            matches, scores = mutual_matches(own, self.conf["match_threshold"])
            out.append({"matches": matches, "scores": scores})
        return out


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """A seeded random SuperGlue in the official layout (a plain state dict, as superglue_outdoor.pth)."""
    c = {**SuperGlue.default_conf, **(conf or {})}
    torch.manual_seed(seed)
    net = SuperGlueNet(c["descriptor_dim"], c["keypoint_encoder"], c["gnn_layers"], c["sinkhorn_iterations"])
    torch.save(net.state_dict(), path)
