"""pycls' ResNet (Facebook's pycls, as DELG's PyTorch port and CVNet build on it), with a GeM head.

Parameter names are pycls': ``stem.{conv,bn}``, ``s{1..4}.b{i}.{proj,bn,f.{a,b,c}{,_bn}}``,
``head.pool.p``, ``head.fc`` -- the key layout of the ``.pyth`` checkpoints of
feymanpriv/DELG and sungonce/CVNet. BatchNorm eps is pycls' default 1e-5.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class GeM(nn.Module):
    """Generalised mean pooling with a learnt exponent ``p`` (``GeneralizedMeanPoolingP``)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)


class Bottleneck(nn.Module):
    """pycls ``BottleneckTransform``: 1x1, BN, ReLU, 3x3 (strided), BN, ReLU, 1x1, BN."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a_bn(self.a(x)))
        x = F.relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    """pycls ``ResBlock``: ``relu(shortcut(x) + f(x))``, a projection (``proj`` + ``bn``) where the shape changes."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
        super().__init__()
        if w_in != w_out or stride != 1:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = Bottleneck(w_in, w_out, stride, w_b)

    def forward(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        shortcut = self.bn(self.proj(x)) if hasattr(self, "proj") else x
        x = self.f(x) + shortcut
        return F.relu(x) if relu else x


class ResStage(nn.Sequential):
    def __init__(self, w_in: int, w_out: int, stride: int, depth: int, w_b: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", ResBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b))


class Stem(nn.Module):
    """pycls ``ResStemIN``: 7x7/2 convolution, BN, ReLU, 3x3/2 max-pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, stride=2, padding=1)


class GlobalHead(nn.Module):
    """GeM pooling + a linear layer (the "whitening")."""

    def __init__(self, w_in: int, dim: int):
        super().__init__()
        self.pool = GeM()
        self.fc = nn.Linear(w_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


class ResNet(nn.Module):
    """The trunk (``stem``, ``s1``..``s4``) and the GeM + linear ``head`` to ``global_dim``."""

    def __init__(self, depth: int = 50, global_dim: int = 2048, what: str = "ResNet"):
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"{what}: depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
        d1, d2, d3, d4 = STAGE_DEPTHS[depth]
        self.stem = Stem()
        self.s1 = ResStage(64, 256, 1, d1, 64)
        self.s2 = ResStage(256, 512, 2, d2, 128)
        self.s3 = ResStage(512, 1024, 2, d3, 256)
        self.s4 = ResStage(1024, 2048, 2, d4, 512)
        self.head = GlobalHead(2048, global_dim)

    def conv4(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-16, 1024-d ``s3`` map (after its last ReLU)."""
        return self.s3(self.s2(self.s1(self.stem(x))))

    def res3(self, x: torch.Tensor) -> torch.Tensor:
        """The last ``s3`` block's output before its ReLU (CVNet's re-ranking feature)."""
        x = self.s2(self.s1(self.stem(x)))
        *blocks, last = self.s3.children()
        for block in blocks:
            x = block(x)
        return last(x, relu=False)

    def global_descriptor(self, conv4: torch.Tensor) -> torch.Tensor:
        """The (not normalised) global descriptor from :meth:`conv4`'s output."""
        return self.head(self.s4(conv4))
