"""SALAD against descriptors computed by the upstream serizba/salad code.

The fixture ``tests/fixtures/salad_reference.npz`` was made by
``tests/reference/make_salad_reference.py`` (see ``tests/reference/README.md``): upstream's
``VPRModel`` (DINOv2 ViT-B/14 from facebookresearch/dinov2 + SALAD) with weights from
``seeded_state_dict``. Here the same seed fills *our* model's state dict (so key names and
shapes must be the released ``dino_salad.ckpt``'s), which is saved like the release (a plain
``torch.save``d state dict) and loaded through the conf. The ViT-B is built and seeded once.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from pipeline.global_features.salad import (
    DESCRIPTOR_DIM, SALAD, load_salad_checkpoint, transport_probs, write_random_checkpoint,
)
from pipeline.images import target_size
from tests.reference.random_state import seeded_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "salad_reference.npz")
# the ViT is the same op sequence as upstream's (measured difference 0); the aggregator's
# weighted sum is one batched matmul where upstream multiplies and sums: measured max
# difference ~1e-8 on unit-norm 8448-d descriptors (entries up to ~0.05)
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _template() -> dict:
    """Our model's state dict on the meta device: names, shapes, dtypes, no memory."""
    with torch.device("meta"):
        return SALAD().state_dict()


@pytest.fixture(scope="module")
def seeded(ref, tmp_path_factory):
    """The fixture's seed applied to our state dict, saved as the release is; the model loaded."""
    template = _template()
    sd = seeded_state_dict(template, int(ref["weight_seed"]))
    # seeded_state_dict stores the 0-d dust bin as [1] (numpy); the release has it 0-d
    sd = {k: v.reshape(template[k].shape) for k, v in sd.items()}
    path = tmp_path_factory.mktemp("salad") / "dino_salad.ckpt"
    torch.save(sd, path)
    model = SALAD({"name": "salad", "checkpoint": str(path)})
    return sd, path, model


def _images(ref) -> torch.Tensor:
    # 8-bit pixels; /255 is exactly what upstream's ToTensor does
    return torch.from_numpy(ref["input_uint8"]).float().div(255)


def _run(model, images):
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def native(ref, seeded):
    """Both images cropped to 112 x 154 (multiples of 14): upstream eval.py's path."""
    h, w = (int(v) for v in ref["native_crop"])
    return _run(seeded[2], _images(ref)[:, :, :h, :w])


def test_matches_upstream_native(ref, seeded, native):
    assert not seeded[2].training
    expected = ref["native_output"]
    assert native.shape == expected.shape == (2, DESCRIPTOR_DIM)
    np.testing.assert_allclose(native.numpy(), expected, rtol=0, atol=ATOL)
    # the two images must not collapse to the same descriptor, or the check is vacuous
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_matches_upstream_through_resizing_wrapper(ref, seeded):
    """120 x 165 px is no multiple of 14: resized inside to 126 x 168, as VPR-methods-evaluation's
    ResizingWrapper does around upstream SALAD (image 1 only, to keep the test fast)."""
    out = _run(seeded[2], _images(ref)[1:]).numpy()
    np.testing.assert_allclose(out, ref["wrapped_output"][1:], rtol=0, atol=ATOL)
    assert np.abs(ref["wrapped_output"][1] - ref["native_output"][1]).max() > 100 * ATOL


def test_shape_and_unit_norm(seeded, native):
    assert seeded[2].dim == DESCRIPTOR_DIM == SALAD.descriptor_size() == 8448
    assert native.shape == (2, 8448) and native.dtype == torch.float32
    torch.testing.assert_close(native.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)


def test_default_resolution_is_322():
    """upstream README: eval.py --image_size 322 322; the loader resizes to exactly that."""
    assert SALAD.default_conf["resize"] == [322, 322]
    assert target_size(640, 480, SALAD.default_conf["resize"]) == (322, 322)
    assert 322 % 14 == 0  # 23 x 23 patches: the in-model resize is a no-op there


def test_too_few_patches_raises():
    scores = torch.zeros(1, 64, 64)  # 8 x 8 = 64 patches (a 112 x 112 image) for 64 clusters
    with pytest.raises(ValueError, match="more image patches than clusters"):
        transport_probs(scores, torch.tensor(1.0))
    probs = transport_probs(torch.randn(2, 64, 65), torch.tensor(1.0))
    assert probs.shape == (2, 64, 65) and torch.isfinite(probs).all()


def _tagged(sd: dict) -> dict:
    """Small stand-ins with a distinct value per key: one stored row, broadcast over the leading
    dims (tiny files that still load quickly)."""
    return {
        k: torch.tensor(i / 1000) if not sd[k].dim() else torch.full(sd[k].shape[-1:], i / 1000).expand(sd[k].shape)
        for i, k in enumerate(sorted(sd))
    }


@contextlib.contextmanager
def _borrowed(seeded):
    """The module's model, for a test that loads other files into it; its seeded weights are
    put back afterwards (one ViT-B in memory, no second allocation)."""
    sd, _, model = seeded
    try:
        yield model
    finally:
        model.load_state_dict(sd)


def test_write_random_checkpoint_loads(seeded, tmp_path):
    p = tmp_path / "salad_seed0.ckpt"
    write_random_checkpoint(p, seed=0)
    state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    assert list(state) == list(_template())  # the release's layout: a plain state dict, upstream's keys
    assert state["aggregator.dust_bin"].shape == ()
    with _borrowed(seeded) as model:
        assert load_salad_checkpoint(model, p) == "plain state_dict"
        for k in ("backbone.model.pos_embed", "backbone.model.mask_token", "aggregator.dust_bin"):
            assert torch.equal(model.state_dict()[k], state[k]), k


def test_other_layouts_load(seeded, tmp_path):
    """A Lightning training checkpoint (CliqueMining's ``cliquemining.ckpt``), ``{'model': ...}``,
    DataParallel prefixes, a ``[1]``-shaped dust bin (load_state_dict accepts it too)."""
    sd = _tagged(_template())
    layouts = {
        "lightning.ckpt": {
            "epoch": 3, "global_step": 4000, "pytorch-lightning_version": "2.0.0",
            "state_dict": sd, "hyper_parameters": {"agg_arch": "SALAD"},
        },
        "model.pth": {"model": sd},
        "module.pth": {f"module.{k}": v for k, v in sd.items()},
        "dust_bin_1d.ckpt": {**sd, "aggregator.dust_bin": sd["aggregator.dust_bin"].reshape(1)},
    }
    probe = ["backbone.model.cls_token", "backbone.model.blocks.11.ls2.gamma", "aggregator.dust_bin",
             "aggregator.score.3.bias"]
    with _borrowed(seeded) as model:
        for name, obj in layouts.items():
            p = tmp_path / name
            torch.save(obj, p)
            load_salad_checkpoint(model, p)
            loaded = model.state_dict()
            for k in probe:
                assert torch.equal(loaded[k], sd[k].contiguous()), (name, k)


def test_missing_key_raises(tmp_path):
    bad = _tagged(_template())
    del bad["aggregator.dust_bin"]
    p = tmp_path / "missing_key.ckpt"
    torch.save(bad, p)
    with pytest.raises(ValueError, match="missing_key.ckpt") as err:
        SALAD({"checkpoint": str(p)})
    assert "aggregator.dust_bin" in str(err.value)


def test_unexpected_key_raises(tmp_path):
    p = tmp_path / "extra_key.ckpt"
    torch.save({**_tagged(_template()), "loss_fn.weight": torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="extra_key.ckpt.*loss_fn.weight"):
        SALAD({"checkpoint": str(p)})


def test_wrong_shape_raises(tmp_path):
    sd = _tagged(_template())
    sd["aggregator.cluster_features.3.weight"] = torch.zeros(256, 512, 1, 1)  # MegaLoc's 256-d clusters
    p = tmp_path / "wrong_shape.ckpt"
    torch.save(sd, p)
    with pytest.raises(ValueError, match="wrong_shape.ckpt") as err:
        SALAD({"checkpoint": str(p)})
    assert "aggregator.cluster_features.3.weight" in str(err.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        SALAD({"checkpoint": str(tmp_path / "nope.ckpt")})
