"""DELG (feymanpriv/DELG PyTorch checkpoints) against the upstream extraction code.

The fixture ``tests/fixtures/delg_reference.npz`` was made by
``tests/reference/make_delg_reference.py`` (see ``tests/reference/README_delg.md``):
upstream's ``DelgExtraction`` with ``seeded_state_dict`` weights (seed 11) and its
``tools/extractor.delg_extract`` on ``montmartre_close.jpg`` resized to 224 px. Here the
same seed fills *our* network's state dict (so key names and shapes must be upstream's),
saved in upstream's ``{'model_state': ...}`` layout and loaded through the conf.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.images import load_tensor
from pipeline.local_features.delg import (
    DELG,
    DelgNet,
    select_threshold,
    write_random_checkpoint,
)
from tests.reference.random_state import seeded_state_dict

from .conftest import SHARED, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "delg_reference.npz")
PAIRS = SHARED / "fixtures" / "pairs"
# upstream resizes with cv2 (float32 bilinear), we with torch.interpolate: the attention
# scores differ by <= 1e-5 (measured 7.6e-6), the global descriptor by ~3e-8. Stored
# descriptors are float16: unit-norm 512-d components round by <= 1.2e-4 (measured 6e-5).
SCORE_ATOL = 1e-4
DESC_ATOL = 5e-4
GLOBAL_ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _heads(n: int = 3, global_dim: int = 512) -> dict[str, torch.Tensor]:
    """Training heads as upstream's full ``Delg`` saves them (skipped by the loader)."""
    return {"desc_cls.weight": torch.zeros(n, global_dim), "desc_cls.t": torch.zeros(1),
            "att_cls.fc.weight": torch.zeros(n, 512), "att_cls.fc.bias": torch.zeros(n)}


@pytest.fixture(scope="module")
def model(ref, tmp_path_factory):
    state = seeded_state_dict(DelgNet().state_dict(), int(ref["weight_seed"]))
    path = tmp_path_factory.mktemp("delg") / "model_epoch_0100.pyth"
    torch.save({"epoch": 100, "model_state": {**state, **_heads()}, "optimizer_state": {}, "cfg": ""}, path)
    return DELG({"weights": str(path)})


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("delg_random") / "delg_seed0.pyth"
    write_random_checkpoint(path, seed=0, conf={"num_classes": 4})
    return path


def test_parameter_count(ref):
    # upstream tools/delg_utils.DelgExtraction with configs/resnet_delg_8gpu.yaml
    # (ResNet-50, REDUCTION_DIM 512), counted by make_delg_reference.py; ResNet-101: the
    # same with MODEL.DEPTH 101
    assert sum(p.numel() for p in DelgNet().parameters()) == 25_083_458 == int(ref["n_params"])
    assert sum(p.numel() for p in DelgNet(depth=101).parameters()) == 44_075_586


def test_state_keys_are_upstreams(ref):
    assert sorted(DelgNet().state_dict()) == ref["state_keys"].tolist()


def test_matches_upstream(model, ref):
    assert not model.training and model.conf["max_keypoints"] == int(ref["top_k"])
    assert model.conf["scales"] == pytest.approx(ref["upstream_scales"].tolist())
    assert model.conf["score_threshold"] == float(ref["attn_thres"]) and model.conf["nms_iou"] == float(ref["iou_thres"])
    img = load_tensor(need_shared(PAIRS / str(ref["image"])), resize=int(ref["resize"]))
    assert list(img.shape[:0:-1]) == ref["image_size"].tolist()
    out = {k: v.numpy() for k, v in model(img).items()}
    n = len(ref["scores"])
    assert out["keypoints"].shape == (n, 2) and out["descriptors"].shape == (n, 512)
    assert out["scores"].shape == out["scales"].shape == (n,) and out["global_descriptor"].shape == (512,)
    assert np.all(np.diff(out["scores"]) <= 0), "features are sorted by decreasing attention"

    # the same features, matched on (x, y, scale) (near-ties at the top-k cut may swap)
    ours = np.c_[out["keypoints"], out["scales"]]
    theirs = np.c_[ref["keypoints"], ref["scales"]]
    d = np.abs(ours[:, None] - theirs[None]).max(-1)
    j = d.argmin(1)
    same = d[np.arange(n), j] < 1e-3
    assert same.mean() >= 0.99, f"only {same.mean():.1%} of the features are upstream's"
    np.testing.assert_allclose(out["scores"][same], ref["scores"][j[same]], rtol=0, atol=SCORE_ATOL)
    k = len(ref["descriptors"])
    first = same & (j < k)
    assert first.sum() >= 0.99 * k
    np.testing.assert_allclose(out["descriptors"][first], ref["descriptors"][j[first]].astype(np.float32),
                               rtol=0, atol=DESC_ATOL)
    np.testing.assert_allclose(out["global_descriptor"], ref["global_descriptor"], rtol=0, atol=GLOBAL_ATOL)
    # features from every one of the 7 scales, keypoints inside the image
    assert len(np.unique(out["scales"])) == 7
    w, h = ref["image_size"]
    assert (out["keypoints"] >= 0).all() and (out["keypoints"][:, 0] < w).all() and (out["keypoints"][:, 1] < h).all()


def test_random_checkpoint_on_real_pair(random_ckpt):
    model = DELG({"weights": str(random_ckpt)})
    assert "model_state" in model.layout and "training heads skipped" in model.layout
    for name in ("montmartre_close.jpg", "montmartre_far.jpg"):
        img = load_tensor(need_shared(PAIRS / name), resize=128)
        out = model(img)
        n = len(out["keypoints"])
        assert 0 < n <= 1000
        assert out["keypoints"].dtype == out["descriptors"].dtype == out["scores"].dtype == torch.float32
        assert out["descriptors"].shape == (n, model.descriptor_dim) == (n, 512)
        assert out["scores"].shape == out["scales"].shape == (n,)
        assert set(out["scales"].tolist()) <= set(np.float32(model.conf["scales"]).tolist())
        torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(n), rtol=0, atol=1e-5)
        g = out["global_descriptor"]
        assert g.shape == (512,) and torch.isfinite(g).all() and abs(float(g.norm()) - 1) < 1e-5
        h, w = img.shape[1:]
        kp = out["keypoints"]
        assert (kp >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all()


def _broken(random_ckpt, tmp_path, name, edit) -> str:
    ckpt = torch.load(random_ckpt, map_location="cpu", weights_only=True)
    edit(ckpt["model_state"])
    path = tmp_path / name
    torch.save(ckpt, path)
    return str(path)


def test_loader_refuses_bad_checkpoints(random_ckpt, tmp_path):
    def drop(s):
        del s["globalmodel.s3.b2.f.b.weight"]

    def extra(s):
        s["localmodel.conv3.weight"] = torch.zeros(1)

    def reshape(s):
        s["globalmodel.head.fc.weight"] = torch.zeros(2048, 2048)

    for name, edit, key in (("missing_key.pyth", drop, "globalmodel.s3.b2.f.b.weight"),
                            ("extra_key.pyth", extra, "localmodel.conv3.weight"),
                            ("wrong_shape.pyth", reshape, "globalmodel.head.fc.weight")):
        path = _broken(random_ckpt, tmp_path, name, edit)
        with pytest.raises(ValueError, match=name) as err:
            DELG({"weights": path})
        assert key in str(err.value)


def test_plain_state_dict_and_other_dims(random_ckpt, tmp_path):
    # upstream's loader falls back to a plain state dict; a 2048-d head needs global_dim 2048
    ckpt = torch.load(random_ckpt, map_location="cpu", weights_only=True)
    state = {k: v for k, v in ckpt["model_state"].items() if not k.startswith(("desc_cls", "att_cls"))}
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    assert DELG({"weights": str(path)}).layout == "plain state_dict"
    path = tmp_path / "whitening2048.pyth"
    write_random_checkpoint(path, seed=1, conf={"global_dim": 2048, "num_classes": 2})
    with pytest.raises(ValueError, match="whitening2048.pyth.*head.fc"):
        DELG({"weights": str(path)})
    assert DELG({"weights": str(path), "global_dim": 2048}).net.globalmodel.head.fc.out_features == 2048


def test_missing_weights_raise(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        DELG()
    with pytest.raises(FileNotFoundError, match="nowhere.pyth"):
        DELG({"weights": str(tmp_path / "nowhere.pyth")})
    junk = tmp_path / "junk.pyth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pyth"):
        DELG({"weights": str(junk)})


def test_threshold_halving_as_upstream():
    # upstream: threshold 260, halved while fewer than 1000 pass, stop once below 0.1
    att = torch.tensor([300.0, 200.0, 100.0, 50.0, 0.12, 0.05])
    assert select_threshold(att, 260.0, 1, 0.1).tolist() == [True] + [False] * 5
    assert select_threshold(att, 260.0, 3, 0.1).tolist() == [True, True, True, False, False, False]
    # never enough: the last threshold tried is 260 / 2**11 = 0.127 (0.063 is below 0.1)
    assert select_threshold(att, 260.0, 1000, 0.1).tolist() == [True] * 4 + [False] * 2
    assert select_threshold(att, 260.0, None, 0.1).tolist() == [True] + [False] * 5  # the paper's fixed threshold
