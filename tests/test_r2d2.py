"""R2D2 against keypoints computed by the upstream naver/r2d2 code.

The fixture ``tests/fixtures/r2d2_reference.npz`` was made by
``tests/reference/make_r2d2_reference.py`` (see ``tests/reference/README.md``):
upstream's ``extract_multiscale`` with its ``NonMaxSuppression`` and default settings,
the real ``r2d2_WASF_N16.pt`` checkpoint, on ``montmartre_close.jpg`` resized (PIL
bilinear) to a longer side of 320 px, top 500 keypoints. Descriptors are stored as
float16, hence the descriptor tolerance.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.images import load_tensor
from pipeline.local_features import build_model
from pipeline.local_features.r2d2 import R2D2

from .conftest import SHARED, WEIGHTS, need_shared, textured_image

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "r2d2_reference.npz")
IMAGE = SHARED / "fixtures" / "pairs" / "montmartre_close.jpg"
CKPT = WEIGHTS / "r2d2_WASF_N16.pt"
# float16 storage of unit-norm components: at most 2.4e-4 off; BatchNorm folding and
# other BLAS builds add float32 rounding on top
DESC_ATOL = 1e-3
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model(ref):
    return build_model({"name": "r2d2", "weights": str(need_shared(CKPT)), "max_keypoints": int(ref["top_k"])})


@pytest.fixture(scope="module")
def photo(ref):
    img = load_tensor(need_shared(IMAGE), resize=int(ref["resize"]))
    assert list(img.shape[1:][::-1]) == ref["image_size"].tolist()
    return img


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``, the index of and the distance to the nearest row of ``b``."""
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    j = d.argmin(1)
    return j, d[np.arange(len(a)), j]


def test_matches_upstream(model, photo, ref):
    assert isinstance(model, R2D2) and not model.training
    out = model(photo)
    kp, desc, scores = (out[k].numpy() for k in ("keypoints", "descriptors", "scores"))
    up_xy = ref["keypoints"][:, :2]
    assert kp.shape == (len(up_xy), 2) == (500, 2)
    assert desc.shape == (500, 128) and scores.shape == (500,)
    assert np.all(np.diff(scores) <= 0), "keypoints are sorted by decreasing score"

    j, dist = _nearest(kp, up_xy)
    close = dist <= 0.5
    assert close.mean() >= 0.98, f"only {close.mean():.1%} of the keypoints are upstream's"
    np.testing.assert_allclose(desc[close], ref["descriptors"][j[close]].astype(np.float32), rtol=0, atol=DESC_ATOL)
    np.testing.assert_allclose(scores[close], ref["scores"][j[close]], rtol=0, atol=SCORE_ATOL)
    torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(500), rtol=0, atol=1e-5)


def test_all_detections_and_scales_match_upstream(model, photo, ref):
    # before the top-k cut: the pyramid (here 2 levels) gives upstream's detection count,
    # and every upstream keypoint is among ours with the same (x, y, scale)
    xys, _, scores = (t.numpy() for t in model.extract_multiscale(photo))
    assert abs(len(scores) - int(ref["n_detections"])) <= 0.01 * int(ref["n_detections"])
    assert sorted(set(np.round(xys[:, 2], 3))) == pytest.approx([32.0, 32 * 2**0.25], abs=1e-3)
    j, dist = _nearest(ref["keypoints"], xys)  # in (x, y, scale) space
    close = dist <= 0.5
    assert close.mean() >= 0.98, f"only {close.mean():.1%} of upstream's keypoints are found"
    np.testing.assert_allclose(scores[j[close]], ref["scores"][close], rtol=0, atol=SCORE_ATOL)


def test_plain_state_dict_loads_the_same(model, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)  # no 'net', no 'module.' prefix
    other = R2D2({"weights": str(path)})
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_missing_key_raises_naming_the_file(tmp_path):
    ckpt = torch.load(need_shared(CKPT), map_location="cpu", weights_only=True)
    sd = dict(ckpt["state_dict"])
    del sd["module.ops.22.weight"]
    path = tmp_path / "missing_key.pt"
    torch.save({"net": ckpt["net"], "state_dict": sd}, path)
    with pytest.raises(ValueError, match="missing_key.pt") as err:
        R2D2({"weights": str(path)})
    assert "ops.22.weight" in str(err.value)


def test_other_net_raises(tmp_path):
    ckpt = torch.load(need_shared(CKPT), map_location="cpu", weights_only=True)
    for i, net in enumerate(["Fast_Quad_L2Net_ConfCFS()", "Quad_L2Net_ConfCFS(dilated=False)", "import os"]):
        path = tmp_path / f"other_net_{i}.pt"
        torch.save({"net": net, "state_dict": ckpt["state_dict"]}, path)
        with pytest.raises(ValueError, match=f"other_net_{i}.pt"):
            R2D2({"weights": str(path)})
    path = tmp_path / "defaults_spelt_out.pt"
    torch.save({"net": "Quad_L2Net_ConfCFS(mchan=4, dim=128)", "state_dict": ckpt["state_dict"]}, path)
    R2D2({"weights": str(path)})


def test_missing_or_unreadable_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        R2D2({"weights": str(tmp_path / "nowhere.pt")})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        R2D2({"weights": str(junk)})


def test_image_below_min_size(model):
    # upstream's pyramid is empty below min_size (it fails); we use the image's own size
    img = torch.from_numpy(textured_image(3, (96, 128))).permute(2, 0, 1).float() / 255
    assert not any(used for _, used in model.levels(96, 128))
    out = model(img)
    n = len(out["keypoints"])
    assert out["descriptors"].shape == (n, 128) and out["scores"].shape == (n,)
    if n:
        kp = out["keypoints"]
        assert (kp >= 0).all() and (kp[:, 0] < 128).all() and (kp[:, 1] < 96).all()
