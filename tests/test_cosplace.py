"""CosPlace against descriptors computed by the upstream gmberton/CosPlace code.

The fixture ``tests/fixtures/cosplace_reference.npz`` was made by
``tests/reference/make_cosplace_reference.py`` (see ``tests/reference/README.md``):
upstream's ``GeoLocalizationNet`` with weights from ``seeded_state_dict``. Here the same
seed is applied to *our* model's state dict (so key names and shapes must match
upstream's exactly), saved like an official checkpoint and loaded through the conf.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.global_features import build_model
from pipeline.global_features.cosplace import CosPlace, load_cosplace_checkpoint
from tests.reference.random_state import seeded_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "cosplace_reference.npz")
# both sides run the same torch ops in the same order on CPU; the measured difference
# is 0.0, the tolerance leaves room for other BLAS/oneDNN builds
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _backbones():
    with np.load(FIXTURE) as f:
        return [str(b) for b in f["backbones"]]


def _images(ref, backbone):
    # the fixture stores 8-bit pixels; /255 is exactly what upstream's ToTensor does
    return torch.from_numpy(ref[f"{backbone}_input_uint8"]).float().div(255)


def _seeded_checkpoint(ref, backbone, tmp_path):
    """Our model's state dict filled with the fixture's seed, saved as a plain state dict."""
    fc_dim = int(ref[f"{backbone}_fc_output_dim"])
    template = CosPlace({"backbone": backbone, "fc_output_dim": fc_dim}).state_dict()
    sd = seeded_state_dict(template, int(ref[f"{backbone}_weight_seed"]))
    path = tmp_path / f"{backbone}_{fc_dim}_cosplace.pth"
    torch.save(sd, path)
    return sd, path, fc_dim


def _run(model, images):
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def resnet18_ckpt(ref, tmp_path_factory):
    return _seeded_checkpoint(ref, "ResNet18", tmp_path_factory.mktemp("r18"))


@pytest.mark.parametrize("backbone", _backbones())
def test_matches_upstream(ref, backbone, tmp_path):
    _, path, fc_dim = _seeded_checkpoint(ref, backbone, tmp_path)
    model = build_model(
        {"name": "cosplace", "backbone": backbone.lower(), "fc_output_dim": fc_dim,
         "checkpoint": str(path)}
    )
    assert isinstance(model, CosPlace) and not model.training
    out = _run(model, _images(ref, backbone)).numpy()
    expected = ref[f"{backbone}_output"]
    assert out.shape == expected.shape == (2, fc_dim)
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
    # the two images must not collapse to the same descriptor, or the check is vacuous
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_shape_and_unit_norm(ref, resnet18_ckpt):
    _, path, _ = resnet18_ckpt
    model = CosPlace({"name": "cosplace", "backbone": "resnet18", "checkpoint": str(path)})
    assert model.dim == 512
    out = _run(model, _images(ref, "ResNet18"))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)


def test_other_layouts_round_trip(ref, resnet18_ckpt, tmp_path):
    sd, path, _ = resnet18_ckpt
    images = _images(ref, "ResNet18")
    base = _run(CosPlace({"backbone": "ResNet18", "checkpoint": str(path)}), images)
    module_sd = {f"module.{k}": v for k, v in sd.items()}
    layouts = {
        "train_ckpt": {"epoch_num": 3, "model_state_dict": sd, "best_val_recall1": 0.5},
        "state_dict": {"state_dict": sd},
        "model": {"model": sd},
        "module": module_sd,
        "train_ckpt_module": {"model_state_dict": module_sd},
    }
    for name, obj in layouts.items():
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p)
        out = _run(CosPlace({"backbone": "ResNet18", "checkpoint": str(p)}), images)
        assert torch.equal(out, base), name


def test_missing_key_raises(resnet18_ckpt, tmp_path):
    sd, _, _ = resnet18_ckpt
    bad = dict(sd)
    del bad["aggregation.1.p"]
    p = tmp_path / "missing_key.pth"
    torch.save(bad, p)
    with pytest.raises(ValueError, match="missing_key.pth") as err:
        CosPlace({"backbone": "ResNet18", "checkpoint": str(p)})
    assert "aggregation.1.p" in str(err.value)


def test_unexpected_key_raises(resnet18_ckpt, tmp_path):
    sd, _, _ = resnet18_ckpt
    p = tmp_path / "extra_key.pth"
    torch.save({**sd, "classifier.weight": torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="extra_key.pth.*classifier.weight"):
        CosPlace({"backbone": "ResNet18", "checkpoint": str(p)})


def test_wrong_shape_raises(resnet18_ckpt, tmp_path):
    sd, _, _ = resnet18_ckpt
    p = tmp_path / "wrong_shape.pth"
    torch.save({**sd, "aggregation.3.weight": torch.zeros(256, 512)}, p)
    with pytest.raises(ValueError, match="wrong_shape.pth") as err:
        CosPlace({"backbone": "ResNet18", "checkpoint": str(p)})
    assert "aggregation.3.weight" in str(err.value)
    # a ResNet-18 checkpoint is also rejected cleanly by a ResNet-50 model
    model = CosPlace({"backbone": "ResNet50"})
    with pytest.raises(ValueError, match="wrong_shape.pth"):
        load_cosplace_checkpoint(model, p)


def test_missing_file_raises(tmp_path):
    p = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        CosPlace({"backbone": "ResNet18", "checkpoint": str(p)})


def test_backbone_name_case_insensitive():
    assert CosPlace({"backbone": "RESNET18", "fc_output_dim": 128}).dim == 128
    with pytest.raises(ValueError, match="unknown backbone"):
        CosPlace({"backbone": "resnet34"})


def test_unreadable_file_raises(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        CosPlace({"backbone": "ResNet18", "checkpoint": str(p)})


def test_non_tensor_objects_fall_back_to_full_unpickling(ref, resnet18_ckpt, tmp_path):
    import argparse

    sd, path, _ = resnet18_ckpt
    images = _images(ref, "ResNet18")
    base = _run(CosPlace({"backbone": "ResNet18", "checkpoint": str(path)}), images)
    p = tmp_path / "with_args.pth"
    torch.save({"args": argparse.Namespace(lr=1e-5), "model_state_dict": sd}, p)
    out = _run(CosPlace({"backbone": "ResNet18", "checkpoint": str(p)}), images)
    assert torch.equal(out, base)
