"""Local feature extractors load their upstream weights and find keypoints on a real photo."""

import pytest
import torch

from pipeline.images import load_tensor
from pipeline.local_features import build_model

from .conftest import SHARED, WEIGHTS, need_shared

CONFS = {
    "sift": {"name": "sift", "max_keypoints": 500},
    "aliked": {"name": "aliked", "weights": "aliked-n16.pth", "max_keypoints": 500},
    "disk": {"name": "disk", "weights": "disk-depth-save.pth", "max_keypoints": 500},
}


@pytest.fixture(scope="module")
def photo():
    return load_tensor(need_shared(SHARED / "fixtures" / "pairs" / "montmartre_close.jpg"), resize=480)


@pytest.mark.parametrize("name", sorted(CONFS))
def test_keypoints_on_real_photo(photo, name):
    conf = dict(CONFS[name])
    if "weights" in conf:
        conf["weights"] = str(need_shared(WEIGHTS / conf["weights"]))
    out = build_model(conf)(photo)
    kp, desc = out["keypoints"], out["descriptors"]
    assert 200 <= len(kp) <= 500
    assert desc.shape == (len(kp), 128) and out["scores"].shape == (len(kp),)
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(len(kp)), atol=1e-4, rtol=0)
    h, w = photo.shape[1:]
    assert (kp[:, 0] >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] >= 0).all() and (kp[:, 1] < h).all()


@pytest.mark.parametrize("name", ["aliked", "disk"])
def test_weights_errors_name_the_file(name, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model({**CONFS[name], "weights": str(tmp_path / "nowhere.pth")})
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_model({**CONFS[name], "weights": str(wrong)})


def test_unknown_extractor():
    with pytest.raises(ValueError, match="unknown local feature 'orb'"):
        build_model({"name": "orb"})
