"""The DINOv2 backbone: upstream's parameter names, token layout and position-embedding
interpolation (its numerical parity with facebookresearch/dinov2's ``dinov2_vitb14`` is
checked end to end by ``tests/test_salad.py``, whose fixture ran upstream's hub model)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipeline.global_features.dinov2 import DinoV2


def _tiny(**kw) -> DinoV2:
    torch.manual_seed(0)
    # a 5 x 5 stored grid (img_size 70, patch 14), 2 blocks of width 16
    return DinoV2(**{"embed_dim": 16, "depth": 2, "num_heads": 2, "img_size": 70, **kw}).eval()


def test_vitb14_parameter_names_are_upstreams():
    with torch.device("meta"):
        sd = DinoV2().state_dict()
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"} | {f"blocks.{i}.{k}" for i in range(12) for k in per_block}
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 768)
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 14, 14)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (3072, 768)
    assert sd["mask_token"].shape == (1, 768)
    with torch.device("meta"):
        assert "mask_token" not in DinoV2(mask_token=False).state_dict()
        reg = DinoV2.from_arch("dinov2_vitb14_reg")
    assert reg.state_dict()["register_tokens"].shape == (1, 4, 768)
    assert reg.interpolate_antialias and reg.interpolate_offset == 0.0


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="unknown architecture"):
        DinoV2.from_arch("vith14")


def test_position_embedding_interpolation():
    model = _tiny()
    x = torch.zeros(1, 1 + 25, 16)
    assert model.interpolate_pos_encoding(x, 70, 70) is model.pos_embed  # stored grid: unchanged
    grid = model.pos_embed[:, 1:].reshape(1, 5, 5, 16).permute(0, 3, 1, 2)
    out = model.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 7, 16), 42, 98)  # 3 x 7 patches
    want = F.interpolate(grid, scale_factor=(3.1 / 5, 7.1 / 5), mode="bicubic", antialias=False)
    assert torch.equal(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 21, 16))
    assert torch.equal(out[:, :1], model.pos_embed[:, :1])
    reg = _tiny(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True)
    out = reg.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 7, 16), 42, 98)
    grid = reg.pos_embed[:, 1:].reshape(1, 5, 5, 16).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 7), mode="bicubic", antialias=True)
    assert torch.equal(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 21, 16))


def test_tokens_and_feature_map():
    model = _tiny(num_register_tokens=2)
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        tokens, hw = model.forward_tokens(x, norm=False)
        normed, _ = model.forward_tokens(x)
        fmap, cls = model.feature_map(x)
        feats = model.forward_features(x)
        head = model(x)
    assert hw == (3, 4) and tokens.shape == (2, 1 + 2 + 12, 16)
    torch.testing.assert_close(normed, model.norm(tokens))
    assert fmap.shape == (2, 16, 3, 4) and cls.shape == (2, 16)
    # patches in row-major order after the class token and the registers
    torch.testing.assert_close(fmap[:, :, 1, 2], normed[:, 3 + 1 * 4 + 2])
    torch.testing.assert_close(feats["x_norm_regtokens"], normed[:, 1:3])
    torch.testing.assert_close(feats["x_prenorm"], tokens)
    torch.testing.assert_close(head, normed[:, 0])


def test_size_not_multiple_of_patch_raises():
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        _tiny()(torch.zeros(1, 3, 42, 50))
