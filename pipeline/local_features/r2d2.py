"""R2D2 (Revaud et al., NeurIPS 2019) loading naver/r2d2's ``r2d2_WASF_N16.pt``.

The network is upstream's ``Quad_L2Net_ConfCFS`` (``nets/patchnet.py``), rebuilt here
with the same module indices so that the checkpoint (``{'net': 'Quad_L2Net_ConfCFS()',
'state_dict': {'module.ops.0.weight', ...}}``) loads as is once ``module.`` is stripped:

- ``ops``: nine 3x3 / 2x2 convolutions without stride. Where L2-Net strides, R2D2 keeps
  full resolution and doubles the dilation of the following layers instead (dilations
  1, 1, 1, 2, 2, 4, 4, 8, 16; padding ``(k - 1) * d // 2`` keeps the size). Each conv
  but the last is followed by a BatchNorm without affine parameters; a ReLU follows the
  first six. The last three (2x2) replace L2-Net's final 8x8 convolution.
- ``clf`` (reliability) and ``sal`` (repeatability): 1x1 convolutions applied to the
  squared 128-d features; reliability is the softmax's second channel of ``clf``,
  repeatability is ``softplus(sal) / (1 + softplus(sal))``.
- descriptors: the 128-d features, L2-normalised per pixel.

Detection follows upstream's ``extract.py``:

- input normalised with the ImageNet mean / std (upstream's ``norm_RGB``);
- image pyramid: scale ``s`` starts at 1 and is divided by ``scale_f`` (2**0.25) at each
  step; each level is the previous level bilinearly resized (``align_corners=False``,
  no antialiasing) to ``round(H s) x round(W s)``. A level is used when
  ``max(min_scale, min_size / max(H, W)) <= s <= min(max_scale, max_size / max(H, W))``
  (with upstream's 0.001 slack); the pyramid stops below the lower bound;
- per level, non-maximum suppression: pixels that are the maximum of repeatability in
  their 3x3 window, with repeatability >= ``repeatability_thr`` and reliability >=
  ``reliability_thr``; their coordinates are scaled back to the input image
  (``x * W / w_level``), their scale is ``32 / s``;
- score = reliability * repeatability; the ``max_keypoints`` highest-scoring keypoints
  over all levels are kept (upstream's ``top_k``), sorted by decreasing score.

One deviation: where no level qualifies (an image whose longer side is below
``min_size``) upstream fails (``torch.cat`` of nothing); here the image is processed at
its own size only.
"""

from __future__ import annotations

import ast

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_file, unwrap
from .base import LocalModel, weights_file

#: upstream's ``tools/dataloader.py`` normalisation (ImageNet statistics)
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)

#: the upstream network class and the constructor arguments our rebuild matches
NET_NAME = "Quad_L2Net_ConfCFS"
NET_DEFAULTS = {
    "dim": 128, "mchan": 4, "relu22": False, "inchan": 3, "dilated": True, "dilation": 1,
    "bn": True, "bn_affine": False,
}


def check_net_string(net: str, path) -> None:
    """Check upstream's ``checkpoint['net']`` (a constructor call that upstream ``eval``s)
    names ``Quad_L2Net_ConfCFS`` with default arguments; raise ValueError otherwise."""
    try:
        call = ast.parse(str(net).strip(), mode="eval").body
        ok = isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == NET_NAME
        ok = ok and not call.args
        for kw in call.keywords if ok else []:
            ok = ok and kw.arg in NET_DEFAULTS and ast.literal_eval(kw.value) == NET_DEFAULTS[kw.arg]
    except (SyntaxError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{path}: checkpoint is for net {net!r}; only {NET_NAME}() (r2d2_WASF_N16 / r2d2_WAF_N16) is supported"
        )


def make_ops(dim: int = 128, mchan: int = 4) -> nn.Sequential:
    """Upstream's dilated ``Quad_L2Net`` trunk; indices (hence state-dict keys) as upstream."""
    # (output channels, kernel, stride of the original L2-Net layer, batch norm, relu)
    spec = [
        (8 * mchan, 3, 1, True, True), (8 * mchan, 3, 1, True, True),
        (16 * mchan, 3, 2, True, True), (16 * mchan, 3, 1, True, True),
        (32 * mchan, 3, 2, True, True), (32 * mchan, 3, 1, True, True),
        (32 * mchan, 2, 2, True, False), (32 * mchan, 2, 2, True, False),
        (dim, 2, 2, False, False),
    ]
    layers: list[nn.Module] = []
    cin, dilation = 3, 1
    for cout, k, stride, bn, relu in spec:
        layers.append(nn.Conv2d(cin, cout, kernel_size=k, padding=(k - 1) * dilation // 2, dilation=dilation))
        if bn:
            layers.append(nn.BatchNorm2d(cout, affine=False))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        dilation *= stride  # a stride becomes a dilation of the following layers
        cin = cout
    return nn.Sequential(*layers)


class R2D2(LocalModel):
    """R2D2 multi-scale detector and descriptor; ``weights`` is ``r2d2_WASF_N16.pt``."""

    default_conf = {
        "weights": None,
        "scale_f": 2**0.25,
        "min_size": 256,
        "max_size": 1024,
        "min_scale": 0.0,
        "max_scale": 1.0,
        "reliability_thr": 0.7,
        "repeatability_thr": 0.7,
    }
    descriptor_dim = 128
    #: upstream's pyramid describes only levels with both sides <= max_size (1024 px)
    size_bound = "max_size"

    def __init__(self, conf=None):
        super().__init__(conf)
        c = self.conf
        mk = c["max_keypoints"]
        if mk is not None and (mk == 0 or mk < -1):
            raise ValueError(f"R2D2: max_keypoints must be positive, -1 or None (all), got {mk}")
        if not c["scale_f"] > 1:
            raise ValueError(f"R2D2: scale_f must be > 1, got {c['scale_f']}")
        if not 0 <= c["min_scale"] <= c["max_scale"] <= 1:
            raise ValueError(f"R2D2: need 0 <= min_scale <= max_scale <= 1, got {c['min_scale']}, {c['max_scale']}")
        self.ops = make_ops(self.descriptor_dim)
        self.clf = nn.Conv2d(self.descriptor_dim, 2, kernel_size=1)  # reliability
        self.sal = nn.Conv2d(self.descriptor_dim, 1, kernel_size=1)  # repeatability
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1), persistent=False)
        self.load_checkpoint(weights_file(c["weights"], "R2D2"))
        self.eval()

    def load_checkpoint(self, path) -> None:
        """Load upstream's ``{'net': ..., 'state_dict': ...}`` file or a plain state dict
        (``module.`` prefixes stripped); a mismatch raises ValueError naming ``path``."""
        path = str(path)
        ckpt = read_file(path, "R2D2 checkpoint")
        if isinstance(ckpt, dict) and "net" in ckpt:
            check_net_string(ckpt["net"], path)
        state, layout = unwrap(ckpt, path, "R2D2 checkpoint", wrapper_keys=("state_dict",))
        load_into(self, state, path, "R2D2 checkpoint", layout, NET_NAME)

    def layers(self) -> list[list]:
        """``(conv, batchnorm or None, relu)`` per convolution of ``ops``."""
        groups = []
        for op in self.ops:
            if isinstance(op, nn.Conv2d):
                groups.append([op, None, False])
            elif isinstance(op, nn.BatchNorm2d):
                groups[-1][1] = op
            elif isinstance(op, nn.ReLU):
                groups[-1][2] = True
        return groups

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image ``[1, 3, h, w]`` -> descriptors ``[1, 128, h, w]`` (L2-normalised),
        reliability and repeatability ``[1, 1, h, w]``.

        Same function as ``ops`` then the heads, computed faster on the CPU: channels-last
        tensors (oneDNN's fast layout), each eval-mode BatchNorm folded into the preceding
        convolution (``w * s``, ``(b - mean) * s`` with ``s = 1 / sqrt(var + eps)``: equal up
        to float rounding), in-place ReLUs and the two 1x1 heads as one convolution.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        for conv, bn, relu in self.layers():
            w, b = conv.weight, conv.bias
            if bn is not None:
                s = torch.rsqrt(bn.running_var + bn.eps)
                w, b = w * s.view(-1, 1, 1, 1), (b - bn.running_mean) * s
            x = F.conv2d(x, w, b, padding=conv.padding, dilation=conv.dilation)
            if relu:
                x = F.relu_(x)
        heads = F.conv2d(
            x * x, torch.cat([self.clf.weight, self.sal.weight]), torch.cat([self.clf.bias, self.sal.bias])
        )
        reliability = F.softmax(heads[:, :2], dim=1)[:, 1:2]
        rep = F.softplus(heads[:, 2:3])
        return F.normalize(x, p=2, dim=1), reliability, rep / (1 + rep)

    def nms(self, reliability: torch.Tensor, repeatability: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, x) of the 3x3 repeatability maxima above both thresholds, in raster order."""
        c = self.conf
        rel, rep = reliability[0, 0], repeatability[0, 0]
        maxima = rep == F.max_pool2d(rep[None], kernel_size=3, stride=1, padding=1)[0]
        maxima &= (rep >= c["repeatability_thr"]) & (rel >= c["reliability_thr"])
        ys, xs = torch.nonzero(maxima, as_tuple=True)
        return ys, xs

    def levels(self, height: int, width: int) -> list[tuple[float, bool]]:
        """Upstream's pyramid loop, dry run: ``(scale, used)`` for every level it resizes to
        (levels above ``max_scale`` / ``max_size`` are resized through but not used)."""
        c = self.conf
        lo = max(c["min_scale"], c["min_size"] / max(height, width))
        hi = min(c["max_scale"], c["max_size"] / max(height, width))
        out, s = [], 1.0
        while s + 0.001 >= lo:
            out.append((s, s - 0.001 <= hi))
            s /= c["scale_f"]
        return out

    @torch.inference_mode()
    def extract_multiscale(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image [3, H, W]`` in [0, 1] -> (``xys [N, 3]`` (x, y, scale), descriptors
        ``[N, 128]``, scores ``[N]``), all detections over the pyramid, unsorted."""
        img = image[None].float().sub(self.mean).div(self.std)
        H, W = img.shape[-2:]
        steps = self.levels(H, W)
        if not any(used for _, used in steps):
            steps = [(1.0, True)]  # image below min_size: upstream fails, we use its own size
        last = max(i for i, (_, used) in enumerate(steps) if used)
        xys, descs, scores = [], [], []
        for i, (s, used) in enumerate(steps[: last + 1]):
            if i:
                # each level resizes the previous one, as upstream does
                img = F.interpolate(img, (round(H * s), round(W * s)), mode="bilinear", align_corners=False)
            if not used:
                continue
            nh, nw = img.shape[-2:]
            desc, rel, rep = self.dense(img)
            y, x = self.nms(rel, rep)
            n = len(y)
            scale = torch.full((n,), 32 / s, device=x.device)
            xys.append(torch.stack([x.float() * W / nw, y.float() * H / nh, scale], dim=1))
            scores.append(rel[0, 0, y, x] * rep[0, 0, y, x])
            descs.append(desc[0, :, y, x].t())
        return torch.cat(xys), torch.cat(descs), torch.cat(scores)

    def _forward(self, image):
        xys, desc, scores = self.extract_multiscale(image)
        order = torch.argsort(scores, descending=True, stable=True)
        mk = self.conf["max_keypoints"]
        if mk is not None and mk > 0:
            order = order[:mk]
        return {"keypoints": xys[order, :2].contiguous(), "descriptors": desc[order], "scores": scores[order]}
