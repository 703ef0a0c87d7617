"""MegaLoc against descriptors computed by the upstream gmberton/MegaLoc code.

The fixture ``tests/fixtures/megaloc_reference.npz`` was made by
``tests/reference/make_megaloc_reference.py`` (see ``tests/reference/README.md``): upstream's
``megaloc_model.MegaLoc`` with weights from ``seeded_state_dict``, fed a 120 x 165 batch
(so its in-``forward`` resize to 126 x 168 is checked too). Here the same seed fills *our*
model's state dict (so key names and shapes must be the released ``model.safetensors``'s),
which is saved as safetensors, like the release, and loaded through the conf.

CI checks the ``small`` case (the released ViT-B/14 and 64 clusters, a smaller head:
``cluster_dim=32, feat_dim=512``): the released head's ``Linear(16640, 8448)`` has 140 M
weights, too slow to seed on CI's CPUs; the ``released`` case is a ``slow`` test.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.global_features.megaloc import (
    DESCRIPTOR_DIM, MegaLoc, load_megaloc_checkpoint, write_random_checkpoint,
)
from pipeline.images import target_size
from tests.reference.random_state import seeded_state_dict
from .test_salad import _tagged  # the same tiny stand-in checkpoints

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "megaloc_reference.npz")
SIZES = ("feat_dim", "num_clusters", "cluster_dim", "token_dim", "mlp_dim")
# upstream's attention is an explicit softmax(q k^T * scale) v, ours (and facebookresearch/
# dinov2's) scaled_dot_product_attention; the aggregator's weighted sum is one batched matmul
# where upstream multiplies and sums: measured max difference ~1e-8 on unit-norm descriptors
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _conf(ref, case: str) -> dict:
    return {k: int(ref[f"{case}_{k}"]) for k in SIZES}


def _template(conf: dict | None = None) -> dict:
    """Our model's state dict on the meta device: names, shapes, dtypes, no memory."""
    with torch.device("meta"):
        return MegaLoc(conf).state_dict()


def _images(ref) -> torch.Tensor:
    # 8-bit pixels; /255 is exactly what upstream's ToTensor does
    return torch.from_numpy(ref["input_uint8"]).float().div(255)


def _run(model, images):
    with torch.no_grad():
        return model(images)


def _seeded_model(ref, case: str, tmp_dir):
    """The fixture's seed applied to our state dict, saved as safetensors like the release;
    the model loaded through the conf."""
    conf = _conf(ref, case)
    template = _template(conf)
    sd = seeded_state_dict(template, int(ref[f"{case}_weight_seed"]))
    # seeded_state_dict stores the 0-d dust bin as [1] (numpy); the release has it 0-d
    sd = {k: v.reshape(template[k].shape) for k, v in sd.items()}
    path = tmp_dir / "model.safetensors"
    save_file(sd, str(path))
    return sd, path, MegaLoc({"name": "megaloc", **conf, "checkpoint": str(path)})


@pytest.fixture(scope="module")
def small(ref, tmp_path_factory):
    sd, path, model = _seeded_model(ref, "small", tmp_path_factory.mktemp("megaloc_small"))
    return sd, path, model, _run(model, _images(ref))


def _check_case(ref, case, out):
    expected = ref[f"{case}_output"]
    assert out.shape == expected.shape == (2, int(ref[f"{case}_feat_dim"]))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=ATOL)
    # the two images must not collapse to the same descriptor, or the check is vacuous
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_matches_upstream_small_head(ref, small):
    """120 x 165 px input: resized inside to 126 x 168 as upstream's forward does."""
    assert not small[2].training
    _check_case(ref, "small", small[3])


@pytest.mark.slow
def test_matches_upstream_released_sizes(ref, tmp_path):
    _, _, model = _seeded_model(ref, "released", tmp_path)
    assert model.dim == DESCRIPTOR_DIM
    _check_case(ref, "released", _run(model, _images(ref)))


def test_shape_and_unit_norm(ref, small):
    model, out = small[2], small[3]
    assert model.dim == 512 and out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    assert MegaLoc.descriptor_size() == DESCRIPTOR_DIM == 8448  # the released model
    assert MegaLoc.descriptor_size({"feat_dim": 512}) == 512


def test_default_conf_is_the_release():
    conf = MegaLoc.default_conf
    assert {k: conf[k] for k in SIZES} == {
        "feat_dim": 8448, "num_clusters": 64, "cluster_dim": 256, "token_dim": 256, "mlp_dim": 512,
    }
    sd = _template()
    assert sd["aggregator.linear.weight"].shape == (8448, 64 * 256 + 256)
    assert "backbone.mask_token" not in sd and sd["backbone.pos_embed"].shape == (1, 1 + 37 * 37, 768)


def test_default_resolution_is_322():
    """The authors evaluate at 322 x 322 (gmberton/MegaLoc issue #2); the loader resizes to it."""
    assert MegaLoc.default_conf["resize"] == [322, 322]
    assert target_size(640, 480, MegaLoc.default_conf["resize"]) == (322, 322)


@contextlib.contextmanager
def _borrowed(small):
    """The module's model, for a test that loads other files into it; its seeded weights are
    put back afterwards (one ViT-B in memory, no second allocation)."""
    sd, _, model, _ = small
    try:
        yield model
    finally:
        model.load_state_dict(sd)


def test_write_random_checkpoint_loads(ref, small, tmp_path):
    conf = _conf(ref, "small")
    p = tmp_path / "megaloc_seed0.safetensors"
    write_random_checkpoint(p, seed=0, conf=conf)
    state = load_file(str(p))  # the release's format: safetensors, upstream's keys
    assert set(state) == set(_template(conf)) and state["aggregator.agg.dust_bin"].shape == ()
    with _borrowed(small) as model:
        load_megaloc_checkpoint(model, p)
        for k in ("backbone.pos_embed", "aggregator.agg.dust_bin", "aggregator.linear.weight"):
            assert torch.equal(model.state_dict()[k], state[k]), k


def test_other_layouts_load(ref, small, tmp_path):
    """A torch.save'd state dict in the same keys, the first release's layout, ``{'state_dict':
    ...}``, DataParallel prefixes, a ``[1]``-shaped dust bin (load_state_dict accepts it too)."""
    sd = _tagged(_template(_conf(ref, "small")))
    v1 = {("backbone.model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
    v1["backbone.model.mask_token"] = torch.zeros(1, 768)
    layouts = {
        "plain.pth": sd,
        "megaloc.torch": v1,  # the v1.0 GitHub release's keys (torch.hub DINOv2 as backbone.model)
        "state_dict.pth": {"state_dict": {**sd, "aggregator.agg.dust_bin": sd["aggregator.agg.dust_bin"].reshape(1)}},
        "module.pth": {f"module.{k}": v for k, v in sd.items()},
    }
    probe = ["backbone.cls_token", "backbone.blocks.11.ls2.gamma", "aggregator.agg.dust_bin", "aggregator.linear.bias"]
    with _borrowed(small) as model:
        for name, obj in layouts.items():
            p = tmp_path / name
            torch.save(obj, p)
            layout = load_megaloc_checkpoint(model, p)
            assert ("v1.0" in layout) == (name == "megaloc.torch"), layout
            loaded = model.state_dict()
            for k in probe:
                assert torch.equal(loaded[k], sd[k].contiguous()), (name, k)


def _write(sd: dict, path) -> str:
    torch.save(sd, path)  # not safetensors: that format stores the broadcast stand-ins in full
    return str(path)


def test_missing_key_raises(tmp_path):
    bad = {k: v for k, v in _tagged(_template({"feat_dim": 8, "cluster_dim": 2})).items() if k != "aggregator.agg.dust_bin"}
    p = _write(bad, tmp_path / "missing_key.pth")
    with pytest.raises(ValueError, match="missing_key.pth") as err:
        MegaLoc({"feat_dim": 8, "cluster_dim": 2, "checkpoint": p})
    assert "aggregator.agg.dust_bin" in str(err.value)


def test_unexpected_key_raises(tmp_path):
    sd = _tagged(_template({"feat_dim": 8, "cluster_dim": 2}))
    sd["backbone.mask_token"] = torch.zeros(1, 768)  # facebookresearch/dinov2's, not MegaLoc's
    p = _write(sd, tmp_path / "extra_key.pth")
    with pytest.raises(ValueError, match="extra_key.pth.*backbone.mask_token"):
        MegaLoc({"feat_dim": 8, "cluster_dim": 2, "checkpoint": p})


def test_wrong_shape_raises(tmp_path):
    """A released-size file refused by a model configured with other sizes."""
    sd = _tagged(_template({"feat_dim": 8, "cluster_dim": 2}))
    p = _write(sd, tmp_path / "wrong_shape.pth")
    with pytest.raises(ValueError, match="wrong_shape.pth") as err:
        MegaLoc({"feat_dim": 8, "cluster_dim": 4, "checkpoint": p})
    assert "aggregator.linear.weight" in str(err.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        MegaLoc({"checkpoint": str(tmp_path / "nope.pth")})


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="feat_dim=0"):
        MegaLoc({"feat_dim": 0})


def test_another_resolution_than_the_authors_is_warned(caplog):
    """The commonest complaint in these projects' trackers is a wrong test resolution."""
    import logging

    from pipeline.global_features import get_model_class

    with caplog.at_level(logging.WARNING):
        get_model_class("megaloc")({"resize": [512, 512], "feat_dim": 512, "cluster_dim": 32})
    assert "images resized to [512, 512], but its authors evaluate it at [322, 322]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        get_model_class("megaloc")({"feat_dim": 512, "cluster_dim": 32})
    assert "authors evaluate" not in caplog.text
