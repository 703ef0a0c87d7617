"""BoQ (ResNet-50 and DINOv2 variants) against descriptors computed by the upstream
amaralibey/Bag-of-Queries code.

The fixture ``tests/fixtures/boq_reference.npz`` was made by
``tests/reference/make_boq_reference.py`` (see ``tests/reference/README.md``): upstream's
``hubconf.get_trained_boq`` models with weights from ``seeded_state_dict``. Here the same seed
fills *our* model's state dict (so key names and shapes must be upstream's), which is saved as
the released files are (a plain state dict) and loaded through the conf's ``checkpoint``.
Each variant is built, seeded, saved and loaded once per module.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from pipeline.global_features import base, boq
from pipeline.global_features.boq import (
    BACKBONES, BoQ, load_boq_checkpoint, model_image_size, write_random_checkpoint,
)
from tests.reference.random_state import seeded_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "boq_reference.npz")
# the measured difference is <= 3e-8 (our queries' self-attention runs once per batch and no
# attention maps are computed: other SDPA/BLAS paths than upstream's); the tolerance leaves
# room for other BLAS/oneDNN builds. Descriptor values are up to ~0.06; applying DINOv2's final
# norm, or a bilinear instead of a bicubic resize, moves them by > 2e-3.
ATOL = 1e-5


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _images(ref, case):
    # 8-bit pixels; /255 is what upstream's ToTensor does
    return torch.from_numpy(ref[f"{case}_input_uint8"]).float().div(255)


def seeded_upstream_state(backbone: str, output_dim: int, seed: int) -> dict:
    """``seeded_state_dict`` over our model's keys (upstream's: the loader checks them), the
    template built on the meta device (no memory, no init); ``num_batches_tracked`` = 0, as in
    upstream's freshly built model."""
    with torch.device("meta"):
        template = BoQ({"backbone": backbone, "output_dim": output_dim}).state_dict()
    sd = seeded_state_dict(template, seed)
    return {k: torch.zeros((), dtype=v.dtype) if v.is_meta else v for k, v in sd.items()}


def _seeded(ref, case, tmp_path_factory):
    """(seeded state dict in upstream's layout, the model loaded through the conf from that state
    dict saved as released (a plain state dict), resize set to the input size: no resizing).
    The file (95 / 380 MB) is deleted once loaded."""
    backbone, dim = str(ref[f"{case}_backbone"]), int(ref[f"{case}_output_dim"])
    sd = seeded_upstream_state(backbone, dim, int(ref[f"{case}_weight_seed"]))
    path = tmp_path_factory.mktemp(case) / f"{backbone}_{dim}.pth"
    torch.save(sd, path)
    model = BoQ({"backbone": backbone, "output_dim": dim, "checkpoint": str(path),
                 "resize": [int(s) for s in ref[f"{case}_size"]]})
    path.unlink()
    return sd, path, model


@pytest.fixture(scope="module")
def resnet(ref, tmp_path_factory):
    return _seeded(ref, "resnet50", tmp_path_factory)


@pytest.fixture(scope="module")
def dino(ref, tmp_path_factory):
    return _seeded(ref, "dinov2", tmp_path_factory)


def _run(model, images):
    with torch.inference_mode():
        return model(images)


def _check(out, expected):
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
    # the two images must not collapse to the same descriptor, or the check is vacuous
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_resnet50_matches_upstream(ref, resnet):
    _, _, model = resnet
    assert not model.training and model.backbone_name == "resnet50"
    out = _run(model, _images(ref, "resnet50")).numpy()
    expected = ref["resnet50_output"]
    assert out.shape == expected.shape == (2, 16384)
    _check(out, expected)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=0, atol=1e-5)


def test_resnet50_default_resolution_matches_upstream(ref, resnet, monkeypatch):
    """resize unset: the model resizes to 384 x 384 itself, as upstream's README transform
    does (bicubic, antialiased, before normalising); 48 x 64 px in, upsampled."""
    model = resnet[2]
    monkeypatch.setattr(model, "image_size", model_image_size("resnet50", None))  # as a default conf
    expected = ref["resnet50_default_output"]
    out = _run(model, _images(ref, "resnet50_default")).numpy()
    assert out.shape == (1, 16384)
    np.testing.assert_allclose(out[:, : expected.shape[1]], expected, rtol=0, atol=ATOL)


def test_default_conf():
    with torch.device("meta"):  # nothing allocated or initialised
        for backbone, size, dim in (("resnet50", [384, 384], 16384), ("dinov2", [322, 322], 12288)):
            model = BoQ({"backbone": backbone})
            assert model.conf["resize"] is None and model.image_size == size and model.dim == dim
            assert BoQ({"backbone": backbone, "resize": 320}).image_size is None


def test_dinov2_matches_upstream(ref, dino):
    _, _, model = dino
    assert model.backbone_name == "dinov2" and model.dim == 12288
    out = _run(model, _images(ref, "dinov2")).numpy()
    expected = ref["dinov2_output"]
    assert out.shape == expected.shape == (2, 12288)
    _check(out, expected)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=0, atol=1e-5)


def _backbone_input(model, images):
    """What the backbone receives for ``images`` (stopped there: nothing heavy runs)."""
    seen = {}

    def hook(_, args):
        seen["x"] = args[0]
        raise _Stop

    handle = model.backbone.register_forward_pre_hook(hook)
    try:
        with pytest.raises(_Stop), torch.inference_mode():
            model(images)
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_default_resolution_per_backbone(backbone, resnet, dino, monkeypatch):
    """resize unset -> each backbone's own test size (upstream README's im_size), applied by
    the model with upstream's transform; resize set -> the loader's job, the model keeps the
    size (DINOv2: the nearest multiples of 14)."""
    size = BACKBONES[backbone]["resize"]
    assert size == ([384, 384] if backbone == "resnet50" else [322, 322])
    assert model_image_size(backbone, None) == size and model_image_size(backbone, [98, 126]) is None
    model = (resnet if backbone == "resnet50" else dino)[2]
    assert model.conf["resize"] is not None and model.image_size is None
    images = torch.rand(2, 3, 100, 130, generator=torch.Generator().manual_seed(0))
    # resize set: no resize in the model (ResNet: any size; DINOv2: multiples of 14)
    assert tuple(_backbone_input(model, images[:, :, :98, :126]).shape[-2:]) == (98, 126)
    expected = (100, 130) if backbone == "resnet50" else (98, 126)
    assert tuple(_backbone_input(model, images).shape[-2:]) == expected
    # resize unset (what a default conf gives, see model_image_size): the README transform
    monkeypatch.setattr(model, "image_size", size)
    x = _backbone_input(model, images)
    readme = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    torch.testing.assert_close(x, torch.stack([readme(im) for im in images]), rtol=0, atol=1e-6)


def test_descriptor_size_and_options():
    assert BoQ.descriptor_size({"backbone": "resnet50"}) == 16384
    assert BoQ.descriptor_size({"backbone": "dinov2"}) == 12288
    assert BoQ.descriptor_size({"backbone": "DINOv2_ViTB14", "output_dim": 384 * 8}) == 3072
    assert BoQ.descriptor_size({}) == 16384
    with pytest.raises(ValueError, match="multiple of its 512"):
        BoQ.descriptor_size({"backbone": "resnet50", "output_dim": 12288 + 128})
    with pytest.raises(ValueError, match="unknown backbone"):
        BoQ.descriptor_size({"backbone": "resnet18"})
    with pytest.raises(ValueError, match="unknown option"):
        BoQ.descriptor_size({"image_size": 322})


def test_other_layouts_load(ref, resnet, tmp_path):
    sd, _, model = resnet
    images = _images(ref, "resnet50")[:1, :, :64, :96]
    base_out = _run(model, images)
    layouts = {  # a Lightning training checkpoint; DataParallel's prefixes
        "lightning": ({"epoch": 3, "state_dict": sd}, "{'state_dict': ...}"),
        "module": ({f"module.{k}": v for k, v in sd.items()}, "'module.' prefix (DataParallel)"),
    }
    for name, (obj, layout) in layouts.items():
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p)
        assert load_boq_checkpoint(model, p) == layout
        assert torch.equal(_run(model, images), base_out), name


def test_dinov2_file_without_final_norm_loads(ref, dino, monkeypatch):
    """upstream's code before March 2025 replaced DINOv2's (unused) final norm by an Identity:
    such files lack ``backbone.dino.norm.*`` and load all the same (the file read is stubbed:
    a 380 MB copy would only slow the test down)."""
    sd, _, model = dino
    state = {k: v for k, v in sd.items() if not k.startswith("backbone.dino.norm.")}
    monkeypatch.setattr(boq, "read_state_dict", lambda path, what: (state, "plain state_dict"))
    images = _images(ref, "dinov2")[:1, :, :42, :56]
    before = _run(model, images)
    assert load_boq_checkpoint(model, "no_norm.pth") == "plain state_dict"
    assert torch.equal(_run(model, images), before)
    del state["backbone.dino.blocks.11.ls2.gamma"]
    with pytest.raises(ValueError, match=r"no_norm.pth.*backbone\.dino\.blocks\.11\.ls2\.gamma"):
        load_boq_checkpoint(model, "no_norm.pth")


def test_missing_and_unexpected_keys_raise(resnet, tmp_path):
    sd, _, model = resnet
    bad = {k: v for k, v in sd.items() if k != "aggregator.boqs.1.queries"}
    p = tmp_path / "missing_key.pth"
    torch.save(bad, p)
    with pytest.raises(ValueError, match="missing_key.pth") as err:
        load_boq_checkpoint(model, p)
    assert "aggregator.boqs.1.queries" in str(err.value)
    p = tmp_path / "extra_key.pth"
    torch.save({**sd, "backbone.net.7.0.conv1.weight": torch.zeros(1)}, p)
    with pytest.raises(ValueError, match=r"extra_key.pth.*backbone\.net\.7\.0\.conv1\.weight"):
        load_boq_checkpoint(model, p)


def test_wrong_variant_names_what_the_file_holds(resnet, dino, tmp_path):
    """A DINOv2 file given to a ResNet-50 conf: the error names the file, keys, and both variants."""
    sd = dino[0]
    p = tmp_path / "dinov2_12288.pth"
    # the aggregator plus one backbone key keep the file small
    torch.save({k: v for k, v in sd.items() if k.startswith("aggregator.") or k == "backbone.dino.cls_token"}, p)
    with pytest.raises(ValueError, match="dinov2_12288.pth") as err:
        load_boq_checkpoint(resnet[2], p)
    msg = str(err.value)
    assert "backbone.net.0.weight" in msg and "aggregator.proj_c.weight" in msg
    assert "conf: backbone resnet50, output_dim 16384; file: backbone dinov2, output_dim 12288" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        BoQ({"checkpoint": str(tmp_path / "nope.pth")})


def test_write_random_checkpoint_loads(tmp_path):
    p = tmp_path / "boq_seed0.pth"
    write_random_checkpoint(p, seed=0, conf={"backbone": "resnet50"})
    state = torch.load(p, weights_only=True)
    assert isinstance(state, dict) and "aggregator.boqs.0.queries" in state and "backbone.net.0.weight" in state
    model = BoQ({"backbone": "resnet50", "checkpoint": str(p)})
    torch.testing.assert_close(model.aggregator.fc.weight, state["aggregator.fc.weight"], rtol=0, atol=0)
    out = _run(model, torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 16384) and torch.isfinite(out).all()


def test_bad_input_shape_raises(resnet):
    with pytest.raises(ValueError, match="expects images"):
        resnet[2](torch.rand(3, 32, 32))


def test_is_a_global_model():
    assert issubclass(BoQ, base.GlobalModel) and BoQ.default_conf["checkpoint"] is None
