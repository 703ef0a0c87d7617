"""SuperPoint against keypoints and descriptors computed by the upstream Magic Leap code.

The fixture ``tests/fixtures/superpoint_reference.npz`` was made by
``tests/reference/make_superpoint_reference.py`` (see ``tests/reference/README.md``):
the SuperPoint of magicleap/SuperGluePretrainedNetwork with the de-quantised
``superpoint_v1`` weights from ``../shared/weights``, on ``montmartre_close.jpg``
resized to 320 px (``load_uint8(path, resize=320)``) and converted to grey with the
BT.601 weights our model uses, once with ``max_keypoints=500`` (all 230 detections
kept) and once with 100 (top-k by score).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from pipeline.images import load_uint8, to_float
from pipeline.local_features import build_model
from pipeline.local_features.superpoint import GRAY_WEIGHTS, SuperPoint

from .conftest import SHARED, WEIGHTS, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "superpoint_reference.npz")
WEIGHTS_FILE = "superpoint_v1_dequant_uint8.pth"
# Both sides run the same float32 ops on CPU: measured differences are 0 for the scores
# and ~1e-7 for the descriptors before the fixture stores them as float16 (half-precision
# rounding of values in [-1, 1] is at most 2.4e-4).
DESC_ATOL = 1e-3
SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def weights():
    return str(need_shared(WEIGHTS / WEIGHTS_FILE))


@pytest.fixture(scope="module")
def image(ref):
    path = need_shared(SHARED / "fixtures" / "pairs" / str(ref["image_name"]))
    u8 = load_uint8(path, resize=int(ref["resize"]))
    digest = hashlib.sha256(u8.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()
    if digest != str(ref["image_sha256"]):
        pytest.skip(f"{path} decodes/resizes to other pixels here than when the fixture was made "
                    "(another Pillow/libjpeg build): the comparison would not test the model")
    return to_float(u8)


def _match(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """For each of our keypoints, the index of the identical upstream keypoint or -1."""
    where = {tuple(p): i for i, p in enumerate(theirs.tolist())}
    return np.array([where.get(tuple(p), -1) for p in ours.tolist()], dtype=int)


@pytest.mark.parametrize("prefix", ["", "small_"])
def test_matches_upstream(ref, weights, image, prefix):
    assert tuple(ref["gray_weights"]) == GRAY_WEIGHTS
    max_kp = int(ref[prefix + "max_keypoints"])
    model = build_model({"name": "superpoint", "weights": weights, "max_keypoints": max_kp})
    out = model(image)
    kp, desc, scores = out["keypoints"].numpy(), out["descriptors"].numpy(), out["scores"].numpy()
    ref_kp = ref[prefix + "keypoints"]

    assert kp.shape == ref_kp.shape and desc.shape == (len(kp), 256) and scores.shape == (len(kp),)
    assert max_kp > len(kp) or prefix  # "" keeps every detection, "small_" cuts by score
    idx = _match(kp, ref_kp)
    same = idx >= 0
    assert same.mean() >= 0.99, f"only {same.sum()}/{len(kp)} keypoints at upstream's positions"
    np.testing.assert_allclose(desc[same], ref[prefix + "descriptors"][idx[same]].astype(np.float32),
                               atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(scores[same], ref[prefix + "scores"][idx[same]], atol=SCORE_ATOL, rtol=0)
    assert (np.diff(scores) <= 0).all(), "keypoints are not sorted by decreasing score"
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)


def test_keep_all_and_invalid_max_keypoints(ref, weights, image):
    out = build_model({"name": "superpoint", "weights": weights, "max_keypoints": None})(image)
    assert len(out["keypoints"]) == len(ref["keypoints"])  # all 230: fewer than 500 are detected
    assert build_model({"name": "superpoint", "weights": weights, "max_keypoints": -1}).descriptor_dim == 256
    with pytest.raises(ValueError, match="max_keypoints"):
        build_model({"name": "superpoint", "weights": weights, "max_keypoints": 0})


@pytest.fixture
def random_state(monkeypatch):
    """A randomly initialised state dict in the upstream layout (needs no ../shared)."""
    monkeypatch.setattr(SuperPoint, "load_checkpoint", lambda self, path: None)
    monkeypatch.setattr("pipeline.local_features.superpoint.weights_file", lambda path, model: path)
    state = SuperPoint({"weights": "unused"}).state_dict()
    monkeypatch.undo()
    return {k: torch.randn_like(v) for k, v in state.items()}


def test_checkpoint_layouts(random_state, tmp_path):
    plain = tmp_path / "superpoint_v1.pth"
    torch.save(random_state, plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in random_state.items()}}, wrapped)
    for path in (plain, wrapped):
        model = build_model({"name": "superpoint", "weights": str(path)})
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, random_state[k], rtol=0, atol=0)


def test_checkpoint_errors_name_the_file(random_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model({"name": "superpoint", "weights": str(tmp_path / "nowhere.pth")})
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong_keys)
    with pytest.raises(ValueError, match="wrong_keys.pth"):
        build_model({"name": "superpoint", "weights": str(wrong_keys)})
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in random_state.items() if k != "convPb.bias"}, missing)
    with pytest.raises(ValueError, match="missing.pth.*convPb.bias"):
        build_model({"name": "superpoint", "weights": str(missing)})
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({**random_state, "convDb.weight": torch.zeros(128, 256, 1, 1)}, wrong_shape)
    with pytest.raises(ValueError, match="wrong_shape.pth.*convDb.weight"):
        build_model({"name": "superpoint", "weights": str(wrong_shape)})
    not_torch = tmp_path / "not_torch.pth"
    not_torch.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not_torch.pth"):
        build_model({"name": "superpoint", "weights": str(not_torch)})
