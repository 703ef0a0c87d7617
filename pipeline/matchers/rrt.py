"""Reranking Transformers (RRT, Tan et al., ICCV 2021), loading the released ``rrt_*.pt`` files.

The network is upstream's ``MatchERT`` (uvavision/RerankingTransformer, ``RRT_GLD/models``),
with its parameter names, so ``rrt_gld_ckpts/r50_gldv1.pt`` etc. (``{'state': state_dict,
'optim': ...}``, as ``experiment.py`` saves them) load without renaming:

- ``remap``: a linear map of the global descriptor (``num_global_features``, 2048 for
  DELG) to the model width ``d_model = num_local_features`` (128, DELG's local
  descriptor size); the remapped global and the local descriptors are L2-normalised;
- ``scale_encoder``: 7 learnt embeddings, one per DELG scale bucket, added to each
  local descriptor; ``seg_encoder``: 6 learnt segment embeddings (0/1: local tokens of
  image 0/1, 2: ``[CLS]``, 3: ``[SEP]``, 4/5: global token of image 0/1);
- the sequence ``[CLS], g0, l0_1..l0_L, [SEP], g1, l1_1..l1_L`` goes through
  ``encoder.layers.<i>`` (6 post-norm transformer encoder layers: 4-head self-attention
  ``self_attn`` with ``in_proj_*`` / ``out_proj``, then ``linear1`` (1024) - ReLU -
  ``linear2``, ``norm1`` / ``norm2``), padded local slots masked out as keys;
- ``classifier`` on the ``[CLS]`` output gives the logit: higher means more likely the
  same place. Position embeddings exist upstream but the released model does not use
  them (``# The final model does not use position embeddings``), so keypoint positions
  play no part. ``dim_K`` / ``seq_len`` only sized a Linformer attention that the final
  model does not use either (no parameters depend on them).

Inputs, prepared as upstream's ``utils/data/dataset.FeatureDataset`` does from DELG files:

- the first ``max_sequence_len`` (500) local features in order of decreasing attention
  ``scores`` (the order DELG writes them; the sort is stable, so stored order breaks ties);
- the scale bucket of each feature: upstream bisects the DELF feature scale
  ``1 / image_scale`` (float32, as TensorFlow computes it) into
  ``[0.5, 0.70710677, 1, 1.41421354, 2, 2.82842708, 4]``. Because these boundaries are
  rounded up, the 7 DELG scales fall into only 4 buckets ({2.0, 1.4142} -> 0,
  {1, 0.7071} -> 2, {0.5, 0.3536} -> 4, 0.25 -> 6; upstream's README notes this and keeps
  it, as the released weights were trained so). Our DELG stores ``scales`` = the image
  scale a feature was found at; each is snapped to the nearest (in log scale) of the TF
  DELG image scales ``delg_scales`` and given that level's upstream bucket;
- the global descriptor from the feature dict's ``global_key`` (``global_descriptor``).

The released weights fit 2048-d global / 128-d local DELG descriptors (TensorFlow DELG);
for other descriptor sizes set ``num_global_features`` / ``num_local_features`` to match
a checkpoint trained on them. The output ``pair_score`` is the raw logit; upstream ranks
the top-100 retrieval candidates by it alone.

``forward_many`` scores one query against several candidates in padded batches of
``batch_size``: candidates are padded (masked) to the longest in the batch; masked keys
get zero attention, so the numbers equal one-pair scoring up to float rounding.
Attention uses ``scaled_dot_product_attention`` (upstream: ``nn.MultiheadAttention``,
the same function).
"""

from __future__ import annotations

import bisect
import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_file, unwrap
from .base import Matcher

#: upstream's bucket boundaries (``FeatureDataset.scales``), in DELF's 1 / image-scale units
RRT_SCALES = (0.5, 0.70710677, 1.0, 1.41421354, 2.0, 2.82842708, 4.0)
#: image scales of TensorFlow DELG (``delg_gld_config.pbtxt``), the features RRT was trained on
DELG_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)


def delf_bucket(image_scale: float) -> int:
    """Upstream's embedding index of a feature found at ``image_scale`` (TF computes the
    DELF scale ``1 / image_scale`` in float32; upstream bisects it)."""
    delf = float(np.float32(1.0) / np.float32(image_scale))
    return max(bisect.bisect_right(RRT_SCALES, delf) - 1, 0)


class EncoderLayer(nn.Module):
    """Upstream's post-norm ``TransformerEncoderLayer`` (DETR style), same parameter names."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)  # holds in_proj_* and out_proj
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.nhead = nhead

    def forward(self, x: torch.Tensor, keep: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """``x [B, T, D]``, ``keep [B, T]`` (False: padding, not attended to). With
        ``first_only`` only token 0 is updated and returned (``[B, 1, D]``)."""
        B, _, D = x.shape
        H = self.nhead
        att = self.self_attn
        w, b = att.in_proj_weight, att.in_proj_bias
        src = x[:, :1] if first_only else x
        q = F.linear(src, w[:D], b[:D])
        k, v = F.linear(x, w[D:], b[D:]).chunk(2, dim=-1)

        def heads(t):  # [B, n, D] -> [B, H, n, D/H]; channel c belongs to head c // (D/H)
            return t.view(B, -1, H, D // H).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep[:, None, None, :])
        out = att.out_proj(out.transpose(1, 2).reshape(B, -1, D))
        y = self.norm1(src + out)
        return self.norm2(y + self.linear2(F.relu(self.linear1(y))))


class Encoder(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The final ``[CLS]`` features ``[B, D]`` (the last layer only computes token 0)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, keep, first_only=i == len(self.layers) - 1)
        return x[:, 0]


class MatchERT(nn.Module):
    """Upstream's ``MatchERT`` with post-norm layers (``normalize_before=False``, as released)."""

    def __init__(self, d_global: int = 2048, d_model: int = 128, nhead: int = 4, num_encoder_layers: int = 6,
                 dim_feedforward: int = 1024):
        super().__init__()
        if d_model % 2 or d_model % nhead:
            raise ValueError(f"RRT: num_local_features {d_model} must be even and divisible by nhead {nhead}")
        self.encoder = Encoder(d_model, nhead, dim_feedforward, num_encoder_layers)
        self.remap = nn.Linear(d_global, d_model)
        self.scale_encoder = nn.Embedding(7, d_model)
        self.seg_encoder = nn.Embedding(6, d_model)
        self.classifier = nn.Linear(d_model, 1)
        self.d_global, self.d_model = d_global, d_model

    def reset_parameters(self) -> None:
        """Upstream's initialisation: Xavier-uniform for every parameter with more than one dimension."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, g0, l0, s0, m0, g1, l1, s1, m1) -> torch.Tensor:
        """Logits ``[B]``. ``g*``: globals ``[B, Dg]``; ``l*``: locals ``[B, L*, D]``; ``s*``:
        scale buckets ``[B, L*]``; ``m*``: ``[B, L*]``, True where a slot is padding."""
        B = g0.shape[0]
        seg = self.seg_encoder.weight
        g0 = F.normalize(self.remap(g0), p=2, dim=-1) + seg[4]
        g1 = F.normalize(self.remap(g1), p=2, dim=-1) + seg[5]
        l0 = F.normalize(l0, p=2, dim=-1) + self.scale_encoder(s0) + seg[0]
        l1 = F.normalize(l1, p=2, dim=-1) + self.scale_encoder(s1) + seg[1]
        cls, sep = seg[2].expand(B, 1, -1), seg[3].expand(B, 1, -1)
        x = torch.cat([cls, g0[:, None], l0, sep, g1[:, None], l1], 1)
        ones = m0.new_ones((B, 2))
        keep = torch.cat([ones, ~m0, ones, ~m1], 1)
        return self.classifier(self.encoder(x, keep)).view(-1)


def load_rrt_weights(net: MatchERT, path) -> str:
    """Load a released RRT checkpoint (``{'state': ..., 'optim': ...}``, a plain state dict,
    ``module.`` prefixes stripped) into ``net``; mismatches raise ValueError naming ``path``."""
    path = str(path)
    what = "RRT checkpoint"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path} (give the path to an rrt_gld_ckpts/*.pt file)")
    state, layout = unwrap(read_file(path, what), path, what, wrapper_keys=("state",))
    desc = f"num_global_features={net.d_global}, num_local_features={net.d_model}, {len(net.encoder.layers)} layers"
    load_into(net, state, path, what, layout, desc)
    return layout


class RRT(Matcher):
    """RRT pair scorer on DELG features (global descriptor + local descriptors and scales)."""

    output = "pair_score"
    default_conf = {  # noqa: RUF012 (the convention of every model here)
        "weights": None,  # path to rrt_gld_ckpts/<r50|r101>_<gldv1|gldv2>.pt (never downloaded)
        "num_global_features": 2048,
        "num_local_features": 128,
        "nhead": 4,
        "num_encoder_layers": 6,
        "dim_feedforward": 1024,
        "max_sequence_len": 500,
        "delg_scales": list(DELG_SCALES),
        "global_key": "global_descriptor",
        "batch_size": 32,
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        if not c["weights"]:
            raise ValueError(
                "RRT: no 'weights' path configured. Weights are never downloaded: take "
                "RRT_GLD/rrt_gld_ckpts/r50_gldv1.pt (or another) from "
                "https://github.com/uvavision/RerankingTransformer and set its path as the matcher's 'weights'."
            )
        if int(c["max_sequence_len"]) < 1 or int(c["batch_size"]) < 1:
            raise ValueError("RRT: max_sequence_len and batch_size must be positive")
        self.net = MatchERT(c["num_global_features"], c["num_local_features"], c["nhead"],
                            c["num_encoder_layers"], c["dim_feedforward"])
        self.layout = load_rrt_weights(self.net, c["weights"])
        levels = [float(s) for s in c["delg_scales"]]
        if not levels or min(levels) <= 0:
            raise ValueError(f"RRT: delg_scales must be positive, got {levels}")
        self.register_buffer("log_levels", torch.tensor(levels, dtype=torch.float64).log(), persistent=False)
        self.register_buffer("level_bucket", torch.tensor([delf_bucket(s) for s in levels]), persistent=False)
        self.eval()

    def scale_buckets(self, scales: torch.Tensor) -> torch.Tensor:
        """Upstream's ``scale_encoder`` index of features found at image ``scales``."""
        d = (scales.to(torch.float64).clamp(min=1e-12).log()[:, None] - self.log_levels[None]).abs()
        return self.level_bucket[d.argmin(1)]

    def prepare_features(self, f: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(global [Dg], locals [n, D], scale buckets [n])`` of one feature dict, the
        first ``max_sequence_len`` features in order of decreasing score."""
        c = self.conf
        dev = self.net.remap.weight.device
        for key in (c["global_key"], "descriptors", "scales", "scores"):
            if key not in f:
                raise ValueError(f"RRT: the features have no {key!r} (RRT needs DELG features: "
                                 "global descriptor, local descriptors, scores and scales)")
        g = torch.as_tensor(f[c["global_key"]]).to(dev, torch.float32).reshape(-1)
        if g.numel() != c["num_global_features"]:
            raise ValueError(f"RRT: {c['global_key']} has {g.numel()} dimensions, the model takes "
                             f"num_global_features={c['num_global_features']}")
        desc = torch.as_tensor(f["descriptors"]).to(dev, torch.float32)
        if desc.ndim != 2 or desc.shape[1] != c["num_local_features"]:
            raise ValueError(f"RRT: descriptors must be [N, {c['num_local_features']}] "
                             f"(num_local_features), got {tuple(desc.shape)}")
        scores = torch.as_tensor(f["scores"]).to(dev, torch.float32).reshape(-1)
        order = torch.argsort(scores, descending=True, stable=True)[: int(c["max_sequence_len"])]
        scales = torch.as_tensor(f["scales"]).to(dev).reshape(-1)[order]
        return g, desc[order], self.scale_buckets(scales)

    def score(self, query: tuple, candidates: list[tuple]) -> torch.Tensor:
        """Logits ``[K]`` of ``query`` against prepared ``candidates`` (one padded batch)."""
        g0, l0, s0 = query
        K, n0, dev = len(candidates), len(l0), l0.device
        n1 = max(len(c[1]) for c in candidates)
        l1 = l0.new_zeros((K, n1, l0.shape[1]))
        s1 = s0.new_zeros((K, n1))
        m1 = torch.ones((K, n1), dtype=torch.bool, device=dev)
        for i, (_, desc, buckets) in enumerate(candidates):
            l1[i, : len(desc)], s1[i, : len(desc)], m1[i, : len(desc)] = desc, buckets, False
        g1 = torch.stack([c[0] for c in candidates])
        m0 = torch.zeros((K, n0), dtype=torch.bool, device=dev)
        return self.net(g0.expand(K, -1), l0.expand(K, -1, -1), s0.expand(K, -1), m0, g1, l1, s1, m1)

    def _forward(self, f0, f1):
        return {"pair_score": self.score(self.prepare_features(f0), [self.prepare_features(f1)])}

    def _forward_many(self, f0, candidates: list) -> list[dict]:
        out = [{"pair_score": torch.tensor([-math.inf])} for _ in candidates]
        if len(f0["keypoints"]) == 0:
            return out  # as forward(): a pair with no local features is not scored
        query = self.prepare_features(f0)
        todo = [(i, self.prepare_features(c)) for i, c in enumerate(candidates) if len(c["keypoints"])]
        bs = int(self.conf["batch_size"])
        for start in range(0, len(todo), bs):
            chunk = todo[start: start + bs]
            logits = self.score(query, [p for _, p in chunk])
            for (i, _), logit in zip(chunk, logits):
                out[i] = {"pair_score": logit.reshape(1)}
        return out


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded random RRT in the released layout: ``{'state': state_dict, 'optim':
    AdamW state}`` as upstream's ``experiment.py`` writes it, float32, upstream's key names.

    Weights follow upstream's initialisation (PyTorch defaults, then Xavier-uniform for
    every matrix) after ``torch.manual_seed(seed)``. ``conf`` may set
    ``num_global_features``, ``num_local_features``, ``nhead``, ``num_encoder_layers`` and
    ``dim_feedforward`` (defaults: the released model). NOT a trained model.
    """
    c = {k: v for k, v in RRT.default_conf.items()}
    c.update(conf or {})
    torch.manual_seed(seed)
    net = MatchERT(c["num_global_features"], c["num_local_features"], c["nhead"],
                   c["num_encoder_layers"], c["dim_feedforward"])
    net.reset_parameters()
    optim = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=5e-4)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save({"state": state, "optim": optim.state_dict()}, path)
