"""Deterministic, framework-independent filling of a model state dict.

Used both by ``make_cosplace_reference.py`` (run against the upstream CosPlace code)
and by ``tests/test_cosplace.py`` (run against our implementation): given the same
key names, shapes and seed, both sides get bit-identical tensors. Values come from
``numpy.random.default_rng(seed)`` consumed in sorted key order, so neither torch's
RNG nor any module's init code is involved.

Only numpy and torch are needed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: std of GeM's ``p`` around 3.0
GEM_P_NOISE = 0.05
#: multiplier on the He std of conv/linear weights. With BN in eval mode nothing
#: re-normalises the residual stream, so at gain 1.0 the ResNet-50 feature map reaches
#: ~2e5 (ResNet-18 ~8e2) on ImageNet-normalised noise; at 0.7 it stays below ~60
#: (ResNet-18 ~30), finite and well inside float32's comfortable range.
DEFAULT_GAIN = 0.7
#: std of every other floating tensor (class / register tokens, position embeddings, queries)
OTHER_STD = 0.02


def _norm_prefixes(keys) -> set[str]:
    """Prefixes (``a.b.`` of ``a.b.running_mean``) of batch-norm layers."""
    return {k[: -len("running_mean")] for k in keys if k.endswith("running_mean")}


def seeded_state_dict(
    template: dict[str, torch.Tensor], seed: int, gain: float = DEFAULT_GAIN
) -> dict[str, torch.Tensor]:
    """Return a new state dict with the keys, shapes and dtypes of ``template``.

    * conv / linear weights (>= 2 dims): N(0, gain * sqrt(2 / fan_in)), He init
    * their biases: N(0, 0.05)
    * batch-norm weight: U(0.5, 1.5), bias: N(0, 0.1), running_mean: N(0, 0.1),
      running_var: U(0.5, 1.5), num_batches_tracked: copied from ``template``
    * GeM exponent (a 1-element tensor named ``...p``): 3.0 + N(0, 0.05)
    * any other 1-d ``weight`` (affine norms without running stats): U(0.5, 1.5)
    * LayerScale factors (a 1-d tensor named ``...gamma``): U(0.5, 1.5)
    * any other floating tensor (tokens, position embeddings, learnt queries, scalars such as
      an optimal-transport dust bin): N(0, 0.02), ViT's initialisation scale

    Keys are visited in sorted order with one ``np.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    bn = _norm_prefixes(template)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(template):
        ref = template[key]
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(ref).__name__}")
        shape = tuple(ref.shape)
        prefix, _, leaf = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        if leaf == "num_batches_tracked":
            out[key] = ref.detach().clone()
            continue
        if leaf == "running_mean":
            arr = rng.normal(0.0, 0.1, shape)
        elif leaf == "running_var":
            arr = rng.uniform(0.5, 1.5, shape)
        elif leaf == "p" and ref.numel() == 1:
            arr = 3.0 + rng.normal(0.0, GEM_P_NOISE, shape)
        elif leaf == "weight" and ref.dim() >= 2:
            fan_in = int(np.prod(shape[1:]))
            arr = rng.normal(0.0, gain * math.sqrt(2.0 / fan_in), shape)
        elif leaf == "weight" and ref.dim() == 1:
            arr = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias":
            arr = rng.normal(0.0, 0.1 if prefix in bn else 0.05, shape)
        elif leaf == "gamma" and ref.dim() == 1:
            arr = rng.uniform(0.5, 1.5, shape)
        else:
            arr = rng.normal(0.0, OTHER_STD, shape)
        if not ref.is_floating_point():
            raise TypeError(f"{key}: expected a floating point tensor, got {ref.dtype}")
        out[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
    return out
