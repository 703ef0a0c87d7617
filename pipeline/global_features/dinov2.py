"""DINOv2 vision transformer backbone (Oquab et al., 2023), compatible with
facebookresearch/dinov2's checkpoints and with the backbones MegaLoc, SALAD and BoQ build on.

Only inference is implemented (no stochastic depth, no masking at train time, no xFormers):
a plain ``torch`` ViT whose submodules carry upstream's parameter names, so a state dict of
``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')`` (or the released
``dinov2_vitb14_pretrain.pth``) loads into :class:`DinoV2` with ``strict=True``::

    cls_token                      [1, 1, C]
    pos_embed                      [1, 1 + (img_size // patch) ** 2, C]   (518 / 14 -> 37 x 37)
    register_tokens                [1, R, C]       only when num_register_tokens > 0
    mask_token                     [1, C]          only when mask_token=True (upstream has it;
                                                   MegaLoc's self-contained copy does not)
    patch_embed.proj.{weight,bias} Conv2d(3, C, patch, stride=patch)
    blocks.{i}.norm1.{weight,bias}
    blocks.{i}.attn.qkv.{weight,bias}
    blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.ls1.gamma           only when layerscale=True (hub models: init_values=1.0)
    blocks.{i}.norm2.{weight,bias}
    blocks.{i}.mlp.fc1.{weight,bias}
    blocks.{i}.mlp.fc2.{weight,bias}
    blocks.{i}.ls2.gamma
    norm.{weight,bias}

API
---
``DinoV2(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=14, img_size=518,
num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False, layerscale=True,
mask_token=True, qkv_bias=True)`` — the defaults are ``dinov2_vitb14`` as torch.hub builds it;
``DinoV2.from_arch('vitb14')`` (also ``vits14``, ``vitl14``, and ``*_reg`` with 4 registers,
antialiased offset-free interpolation as the hub builds them) builds the other hub models.

* ``model.forward_tokens(x, norm=True) -> (tokens [B, 1 + R + N, C], (h, w))``: every token
  after the last block, with the final LayerNorm (``norm=True``, upstream's ``x_norm``) or
  without (``norm=False``, upstream's ``x_prenorm``). Token 0 is the class token, tokens
  ``1 .. R`` the registers (``model.num_register_tokens``), the last ``N = h * w`` the patches
  in row-major order; ``(h, w) = (H // patch, W // patch)``.
* ``model.feature_map(x, norm=True) -> (patches [B, C, h, w], cls [B, C])``: the same, with the
  patch tokens laid out as a feature map (what SALAD / MegaLoc / BoQ aggregate).
* ``model.forward_features(x)``: upstream's dict (``x_norm_clstoken``, ``x_norm_regtokens``,
  ``x_norm_patchtokens``, ``x_prenorm``, ``masks``); ``model(x)`` the normed class token.
* ``model.prepare_tokens(x)``: patch embedding + class token + interpolated position
  embedding (+ registers), before the blocks; ``model.interpolate_pos_encoding(x, h_px, w_px)``.

``x`` is an ImageNet-normalised float batch ``[B, 3, H, W]`` with ``H`` and ``W`` multiples of
the patch size (ValueError otherwise); resizing is the caller's job.

Position embeddings are resized exactly as upstream's ``interpolate_pos_encoding``: nothing is
done when the patch count equals the stored one and the image is square; otherwise the
``M x M`` grid is resized in float32 with bicubic ``F.interpolate`` using
``scale_factor=((h + offset) / M, (w + offset) / M)`` (``interpolate_offset=0.1``, upstream's
"historical kludge") or ``size=(h, w)`` when the offset is 0, with ``antialias`` from
``interpolate_antialias`` (offset 0.1 / no antialias for the plain hub models and MegaLoc;
offset 0 / antialias for the ``*_reg`` ones), then cast back to the input dtype.
Checked bit-exact against upstream's ``dinov2_vitb14`` and ``dinov2_vits14_reg`` on CPU.
Attention uses ``F.scaled_dot_product_attention`` as upstream's ``Attention`` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: torch.hub names -> (embed_dim, depth, num_heads, num_register_tokens); the ``*_reg`` hub
#: models also interpolate position embeddings differently (:data:`REG_INTERPOLATION`)
ARCHS = {
    "vits14": (384, 12, 6, 0),
    "vitb14": (768, 12, 12, 0),
    "vitl14": (1024, 24, 16, 0),
    "vits14_reg": (384, 12, 6, 4),
    "vitb14_reg": (768, 12, 12, 4),
    "vitl14_reg": (1024, 24, 16, 4),
}
#: upstream's hub builds the register models with antialiased, offset-free interpolation
REG_INTERPOLATION = {"interpolate_antialias": True, "interpolate_offset": 0.0}

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution, flattened to ``[B, h * w, C]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DinoV2: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, heads, N, c/heads] each
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as upstream
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, layerscale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 ViT (inference); see the module docstring for the API and parameter names."""

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 14,
        img_size: int = 518,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        layerscale: bool = True,
        mask_token: bool = True,
        qkv_bias: bool = True,
        in_chans: int = 3,
    ):
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"DinoV2: num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layerscale) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # unused at inference; kept so that upstream's state dicts load strictly
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @classmethod
    def from_arch(cls, arch: str = "vitb14", **kwargs) -> "DinoV2":
        """A hub architecture by name (``vits14``, ``vitb14``, ``vitl14``, ``*_reg``; a
        ``dinov2_`` prefix is accepted), with the hub's interpolation settings; ``kwargs``
        override any constructor argument."""
        key = arch.lower().removeprefix("dinov2_")
        if key not in ARCHS:
            raise ValueError(f"DinoV2: unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
        dim, depth, heads, regs = ARCHS[key]
        interp = REG_INTERPOLATION if regs else {}
        return cls(**{"embed_dim": dim, "depth": depth, "num_heads": heads, "num_register_tokens": regs,
                      **interp, **kwargs})

    # --- tokens -----------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: torch.Tensor, h_px: int, w_px: int) -> torch.Tensor:
        """Position embeddings for the tokens ``x`` ``[B, 1 + N, C]`` of an ``h_px x w_px`` image."""
        n_patches = x.shape[1] - 1
        n_stored = self.pos_embed.shape[1] - 1
        if n_patches == n_stored and h_px == w_px:
            return self.pos_embed
        dtype = x.dtype
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = x.shape[-1]
        h, w = h_px // self.patch_size, w_px // self.patch_size
        m = int(math.sqrt(n_stored))
        if m * m != n_stored:
            raise ValueError(f"DinoV2: pos_embed holds {n_stored} patch positions, not a square grid")
        if self.interpolate_offset:
            # upstream's offset, kept for numerical identity (scale factors, not sizes)
            kwargs = {"scale_factor": (float(h + self.interpolate_offset) / m, float(w + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (h, w)}
        grid = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        if tuple(grid.shape[-2:]) != (h, w):
            raise RuntimeError(f"DinoV2: position grid resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, 1 + R + N, C]``: tokens entering the first block."""
        if x.dim() != 4:
            raise ValueError(f"DinoV2 expects images [B, C, H, W], got {tuple(x.shape)}")
        b, _, h_px, w_px = x.shape
        p = self.patch_size
        if h_px % p or w_px % p:
            raise ValueError(f"DinoV2: image size {h_px}x{w_px} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, h_px, w_px)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def forward_tokens(self, x: torch.Tensor, norm: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """All tokens after the blocks ``[B, 1 + R + N, C]`` (final LayerNorm if ``norm``) and
        the patch grid ``(h, w)``."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        if norm:
            tokens = self.norm(tokens)
        return tokens, (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

    def feature_map(self, x: torch.Tensor, norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch tokens as [B, C, h, w], class token [B, C])``."""
        tokens, (h, w) = self.forward_tokens(x, norm=norm)
        patches = tokens[:, 1 + self.num_register_tokens :]
        fmap = patches.reshape(tokens.shape[0], h, w, self.embed_dim).permute(0, 3, 1, 2)
        return fmap, tokens[:, 0]

    def forward_features(self, x: torch.Tensor) -> dict:
        prenorm, _ = self.forward_tokens(x, norm=False)
        normed = self.norm(prenorm)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
            "x_prenorm": prenorm,
            "masks": None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normed class token ``[B, C]`` (upstream's ``forward`` with an identity head)."""
        return self.forward_tokens(x, norm=True)[0][:, 0]
