"""EigenPlaces against descriptors computed by the upstream gmberton/EigenPlaces code.

The fixture ``tests/fixtures/eigenplaces_reference.npz`` was made by
``tests/reference/make_eigenplaces_reference.py`` (see ``tests/reference/README.md``):
upstream's ``GeoLocalizationNet_`` (ResNet-50, 2048-d, the released configuration) with
weights from ``seeded_state_dict``. Here the same seed is applied to *our* model's state
dict (so key names and shapes must match upstream's exactly), saved as the released
plain state dict and loaded through the conf.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.global_features import REGISTRY, build_model
from pipeline.global_features.cosplace import CosPlace
from pipeline.global_features.eigenplaces import EigenPlaces, release_url, write_random_checkpoint
from tests.reference.random_state import seeded_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "eigenplaces_reference.npz")
BACKBONE = "ResNet50"
# same torch ops in the same order as upstream on CPU (measured difference 1.5e-8: our forward
# L2-normalises the already normalised output once more, as CosPlace's does); the
# tolerance leaves room for other BLAS/oneDNN builds
ATOL = 1e-5
# small models for the loader's error paths (a ResNet-18 builds and saves quickly)
SMALL = {"backbone": "ResNet18", "fc_output_dim": 256}


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def released(ref, tmp_path_factory):
    """Our ResNet-50 / 2048-d state dict filled with the fixture's seed, saved as the
    released ``ResNet50_2048_eigenplaces.pth`` is (a plain state dict)."""
    fc_dim = int(ref[f"{BACKBONE}_fc_output_dim"])
    template = EigenPlaces({"backbone": BACKBONE, "fc_output_dim": fc_dim}).state_dict()
    sd = seeded_state_dict(template, int(ref[f"{BACKBONE}_weight_seed"]))
    path = tmp_path_factory.mktemp("eigenplaces") / f"{BACKBONE}_{fc_dim}_eigenplaces.pth"
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    sd = seeded_state_dict(EigenPlaces(SMALL).state_dict(), 5)
    path = tmp_path_factory.mktemp("eigenplaces_small") / "ResNet18_256_eigenplaces.pth"
    torch.save(sd, path)
    return sd, path


def test_matches_upstream(ref, released):
    _, path = released
    model = build_model({"name": "eigenplaces", "checkpoint": str(path)})  # released defaults
    assert isinstance(model, EigenPlaces) and not model.training
    assert model.conf["backbone"] == BACKBONE and model.dim == 2048
    images = torch.from_numpy(ref[f"{BACKBONE}_input_uint8"]).float().div(255)  # = ToTensor
    with torch.no_grad():
        out = model(images)
    expected = ref[f"{BACKBONE}_output"]
    assert out.shape == expected.shape == (2, 2048)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    # the two images must not collapse to the same descriptor, or the check is vacuous
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_state_dict_layout_is_upstreams(ref, released):
    sd, _ = released
    ours = [f"{k} {list(sd[k].shape)}" for k in EigenPlaces().state_dict()]  # in module order
    assert ours == [str(s) for s in ref[f"{BACKBONE}_state_dict"]]


def test_defaults_native_resolution():
    # upstream's test transform is ToTensor + Normalize: no resize
    conf = REGISTRY.full_conf({"name": "eigenplaces"})
    assert conf["resize"] is None
    assert (conf["backbone"], conf["fc_output_dim"], conf["checkpoint"]) == ("ResNet50", 2048, None)
    assert EigenPlaces.descriptor_size() == 2048
    assert EigenPlaces.descriptor_size({"fc_output_dim": 512}) == 512
    assert issubclass(EigenPlaces, CosPlace)  # the same network, built by CosPlace's code


def test_release_urls():
    assert release_url() == ("https://github.com/gmberton/EigenPlaces/releases/download/v1.0/"
                             "ResNet50_2048_eigenplaces.pth")
    assert release_url("resnet18", 256).endswith("/ResNet18_256_eigenplaces.pth")
    with pytest.raises(ValueError, match="no released"):
        release_url("ResNet18", 2048)


def test_backbones_are_upstreams():
    with pytest.raises(ValueError, match="EigenPlaces: unknown backbone"):
        EigenPlaces({"backbone": "EfficientNet_B0"})  # CosPlace has it, EigenPlaces does not
    with pytest.raises(ValueError, match="EigenPlaces: unknown backbone"):
        EigenPlaces({"backbone": "resnet34"})


def test_training_checkpoint_layout(small, tmp_path):
    # train.py's last_checkpoint.pth (util.save_checkpoint), DataParallel prefixes included;
    # the released files and best_model.pth are plain state dicts (test_matches_upstream)
    sd, _ = small
    p = tmp_path / "last_checkpoint.pth"
    torch.save({"epoch_num": 2, "model_state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_val_recall1": 50.0}, p)
    model = EigenPlaces({**SMALL, "checkpoint": str(p)})
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_missing_key_raises(small, tmp_path):
    sd, _ = small
    bad = dict(sd)
    del bad["aggregation.1.p"]
    p = tmp_path / "missing_key.pth"
    torch.save(bad, p)
    with pytest.raises(ValueError, match="^EigenPlaces: .*missing_key.pth") as err:
        EigenPlaces({**SMALL, "checkpoint": str(p)})
    assert "aggregation.1.p" in str(err.value)


def test_unexpected_key_raises(small, tmp_path):
    sd, _ = small
    p = tmp_path / "extra_key.pth"
    torch.save({**sd, "classifier.weight": torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="extra_key.pth.*classifier.weight"):
        EigenPlaces({**SMALL, "checkpoint": str(p)})


def test_wrong_size_raises(small):
    _, path = small  # a 256-d head for a 512-d model
    with pytest.raises(ValueError, match="ResNet18_256_eigenplaces.pth") as err:
        EigenPlaces({"backbone": "ResNet18", "fc_output_dim": 512, "checkpoint": str(path)})
    assert "aggregation.3.weight" in str(err.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="EigenPlaces: .*nope.pth"):
        EigenPlaces({**SMALL, "checkpoint": str(tmp_path / "nope.pth")})


def test_write_random_checkpoint(tmp_path):
    p = tmp_path / "eigenplaces_seed0.pth"
    write_random_checkpoint(p, seed=0, conf=SMALL)
    obj = torch.load(p, weights_only=True)
    template = EigenPlaces(SMALL).state_dict()
    assert list(obj) == list(template)  # a plain state dict in the released key order
    model = EigenPlaces({**SMALL, "checkpoint": str(p)})
    for k, v in model.state_dict().items():
        assert torch.equal(v, obj[k]), k
