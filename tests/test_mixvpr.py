"""MixVPR against descriptors computed by the upstream amaralibey/MixVPR code.

The fixture ``tests/fixtures/mixvpr_reference.npz`` was made by
``tests/reference/make_mixvpr_reference.py`` (see ``tests/reference/README.md``):
upstream's ``VPRModel`` built as for the released 4096-d model, with weights from
``seeded_state_dict``, fed through upstream's ``demo.load_image``. Here the same seed is
applied to *our* model's state dict (key names and shapes must match upstream's exactly),
saved as the released file is (a plain state dict) and loaded through the conf.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.global_features import REGISTRY, build_model
from pipeline.global_features.mixvpr import MixVPR, load_mixvpr_checkpoint, write_random_checkpoint
from pipeline.images import load_uint8
from tests.reference.random_state import seeded_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mixvpr_reference.npz")
RELEASED_NAME = "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt"
# same torch ops in the same order as upstream on CPU (measured difference 0.0); the
# tolerance leaves room for other BLAS/oneDNN builds
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def released(ref, tmp_path_factory):
    """Our state dict filled with the fixture's seed, saved as the released file is."""
    template = MixVPR().state_dict()
    sd = seeded_state_dict(template, int(ref["weight_seed"]))
    path = tmp_path_factory.mktemp("mixvpr") / RELEASED_NAME
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def model(released):
    _, path = released
    return build_model({"name": "mixvpr", "checkpoint": str(path)})


def test_matches_upstream(ref, model):
    assert isinstance(model, MixVPR) and not model.training
    images = torch.from_numpy(ref["input_uint8"]).float().div(255)  # = ToTensor
    assert images.shape == (2, 3, 320, 320)
    with torch.no_grad():
        out = model(images)
    expected = ref["output"]
    assert out.shape == expected.shape == (2, 4096)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    # the two images must not collapse to the same descriptor, or the check is vacuous
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_state_dict_layout_is_upstreams(ref, model):
    ours = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    assert ours == [str(s) for s in ref["state_dict"]]
    assert not any(k.startswith(("backbone.model.layer4.", "backbone.model.fc.")) for k in model.state_dict())
    conf = model.conf
    for key in ("in_h", "in_w", "out_channels", "mix_depth", "mlp_ratio", "out_rows"):
        assert conf[key] == int(ref[f"agg_{key}"]), key


def test_defaults_320_and_4096():
    conf = REGISTRY.full_conf({"name": "mixvpr"})
    assert conf["resize"] == [320, 320] and conf["checkpoint"] is None
    assert MixVPR.descriptor_size() == 4096
    assert MixVPR.descriptor_size({"out_channels": 256, "out_rows": 2}) == 512  # the 512-d release
    assert MixVPR.descriptor_size({"out_channels": 64, "out_rows": 2}) == 128


def test_loader_gives_320x320(model, tmp_path):
    # the pipeline's loader resizes every image to the conf's [H, W], whatever its shape
    p = tmp_path / "wide.png"
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(p)
    assert tuple(load_uint8(p, model.conf["resize"]).shape) == (3, 320, 320)


def test_other_sizes_are_refused(model):
    with pytest.raises(ValueError, match="320x320"):
        model(torch.zeros(1, 3, 256, 320))
    with pytest.raises(ValueError, match=r"resize must be \[320, 320\]"):
        MixVPR({"resize": [322, 322]})
    with pytest.raises(ValueError, match="resize must be"):
        MixVPR({"resize": 320})


def test_lightning_checkpoint_loads(released, model, tmp_path):
    # a training checkpoint of upstream's VPRModel (pytorch_lightning ModelCheckpoint)
    sd, _ = released
    p = tmp_path / "resnet50_epoch(07)_step(1234)_R1[0.9000]_R5[0.9500].ckpt"
    torch.save({"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.8.3",
                "state_dict": sd, "loops": {}, "hparams_name": "kwargs",
                "hyper_parameters": {"backbone_arch": "resnet50", "layers_to_crop": [4],
                                     "agg_arch": "MixVPR", "agg_config": {"out_channels": 1024}}}, p)
    layout = load_mixvpr_checkpoint(model, p)
    assert "state_dict" in layout
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_missing_key_raises(released, model, tmp_path):
    sd, _ = released
    bad = {k: v for k, v in sd.items() if k != "aggregator.row_proj.bias"}
    p = tmp_path / "missing_key.ckpt"
    torch.save(bad, p)
    with pytest.raises(ValueError, match="missing_key.ckpt") as err:
        load_mixvpr_checkpoint(model, p)
    assert "aggregator.row_proj.bias" in str(err.value)


def test_unexpected_key_raises(released, model, tmp_path):
    sd, _ = released
    p = tmp_path / "extra_key.ckpt"
    torch.save({**sd, "backbone.model.layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1)}, p)
    with pytest.raises(ValueError, match=r"extra_key.ckpt.*backbone.model.layer4.0.conv1.weight"):
        load_mixvpr_checkpoint(model, p)


def test_other_size_checkpoint_raises(released, model, tmp_path):
    # the 512-d release (256 channels x 2 rows) into the 4096-d model
    sd, _ = released
    p = tmp_path / "resnet50_MixVPR_512_channels(256)_rows(2).ckpt"
    torch.save({**sd, "aggregator.channel_proj.weight": torch.zeros(256, 1024),
                "aggregator.channel_proj.bias": torch.zeros(256),
                "aggregator.row_proj.weight": torch.zeros(2, 400), "aggregator.row_proj.bias": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match=r"rows\(2\).ckpt.*shape mismatches") as err:
        load_mixvpr_checkpoint(model, p)
    assert "aggregator.channel_proj.weight" in str(err.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        MixVPR({"checkpoint": str(tmp_path / "nope.ckpt")})


def test_write_random_checkpoint(model, tmp_path):
    p = tmp_path / "mixvpr_seed0.ckpt"
    write_random_checkpoint(p, seed=0)
    obj = torch.load(p, weights_only=True)
    assert list(obj) == list(model.state_dict())  # a plain state dict in the released key order
    load_mixvpr_checkpoint(model, p)
    assert all(torch.equal(v, obj[k]) for k, v in model.state_dict().items())
