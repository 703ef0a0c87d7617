"""D2-Net against keypoints computed by the upstream mihaidusmanu/d2-net code.

The fixture ``tests/fixtures/d2net_reference.npz`` was made by
``tests/reference/make_d2net_reference.py`` (see ``tests/reference/README_d2net.md``):
upstream's ``lib/model_test.py`` network with weights from ``seeded_state_dict`` (no
released weights exist here), ``preprocess_image(..., 'caffe')`` and ``process_multiscale``
(scales .5, 1, 2, and once with scale 1 only) on ``montmartre_close.jpg`` resized to a
longer side of 256 px. Here the same seed fills *our* network's state dict (so key names
and shapes must be upstream's), which is saved like the released ``d2_tf.pth``
(``{'model': state_dict}``) and loaded through the conf.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import pytest
import torch

from pipeline.images import load_tensor, load_uint8, to_float
from pipeline.local_features import build_model
from pipeline.local_features.d2net import (
    D2Net,
    DenseFeatureExtraction,
    _imresize,
    _target_size,
    write_random_checkpoint,
)
from tests.reference.random_state import seeded_state_dict

from .conftest import SHARED, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "d2net_reference.npz")
PAIRS = SHARED / "fixtures" / "pairs"
#: VGG-16 conv1_1..conv4_3: 1,792 + 36,928 + 73,856 + 147,584 + 295,168 + 2 x 590,080
#: + 1,180,160 + 2 x 2,359,808; the same count as upstream's ``model_test.D2Net`` (the
#: make script records it in the fixture as ``n_params``)
N_PARAMS = 7_635_264
# Both sides run the same float32 operations on the CPU: measured differences are 0 for
# positions, scores and descriptors (bit-identical). The fixture stores descriptors as
# float16 (rounding of unit-vector components: at most 2.4e-4). The tolerances leave room
# for another BLAS build; a detection decided by an exact float comparison may then flip,
# hence the 98% agreement required of the keypoint sets.
POS_ATOL = 1e-3  # px
SCORE_RTOL = 1e-4
DESC_ATOL = 1e-3
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _template() -> dict[str, torch.Tensor]:
    return {f"dense_feature_extraction.{k}": v for k, v in DenseFeatureExtraction().state_dict().items()}


@pytest.fixture(scope="module")
def seeded(ref, tmp_path_factory):
    """The fixture's seeded weights, saved in the released ``d2_tf.pth`` layout."""
    state = seeded_state_dict(_template(), int(ref["weight_seed"]), gain=float(ref["gain"]))
    path = tmp_path_factory.mktemp("d2") / "d2_tf.pth"
    torch.save({"model": state}, path)
    return state, path


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("d2_random") / "d2_tf_random.pth"
    write_random_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="module")
def photo(ref):
    path = need_shared(PAIRS / str(ref["image_name"]))
    u8 = load_uint8(path, resize=int(ref["resize"]))
    digest = hashlib.sha256(u8.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()
    if digest != str(ref["image_sha256"]):
        pytest.skip(f"{path} decodes/resizes to other pixels here than when the fixture was made "
                    "(another Pillow/libjpeg build): the comparison would not test the model")
    return to_float(u8)


def _pairing(ours: np.ndarray, theirs: np.ndarray, atol: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(i, j)`` of rows ``ours[i]`` and ``theirs[j]`` that coincide (max abs
    difference <= atol), each row used at most once."""
    d = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2)
    i, j = np.nonzero(d <= atol)
    _, first = np.unique(i, return_index=True)
    i, j = i[first], j[first]
    _, first = np.unique(j, return_index=True)
    return i[first], j[first]


def test_parameter_count_and_names():
    net = DenseFeatureExtraction()
    assert sum(p.numel() for p in net.parameters()) == N_PARAMS
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]  # torchvision vgg16().features indices
    assert list(_template()) == [f"dense_feature_extraction.model.{i}.{p}" for i in convs for p in ("weight", "bias")]
    assert [m.dilation for m in net.model if isinstance(m, torch.nn.Conv2d)] == [(1, 1)] * 7 + [(2, 2)] * 3
    assert isinstance(net.model[16], torch.nn.AvgPool2d) and net.model[16].stride == 1


@pytest.mark.parametrize("prefix", ["", "single_"])
def test_matches_upstream(ref, seeded, photo, prefix, monkeypatch):
    assert int(ref["n_params"]) == N_PARAMS
    _, path = seeded
    scales = ref["scales"].tolist() if not prefix else [1.0]
    model = D2Net({"weights": str(path), "scales": scales})
    raw_out = []  # keep what extract_multiscale returns inside forward (one run for both checks)
    extract = model.extract_multiscale
    monkeypatch.setattr(model, "extract_multiscale", lambda x: raw_out.append(extract(x)) or raw_out[-1])
    out = model(photo)
    kp, desc, scores = (out[k].numpy() for k in ("keypoints", "descriptors", "scores"))
    ref_kp, ref_scores = ref[prefix + "keypoints"], ref[prefix + "scores"]
    ref_desc = ref[prefix + "descriptors"].astype(np.float32)
    n = len(ref_kp)
    assert kp.shape == (len(kp), 2) and kp.dtype == np.float32 and desc.shape == (len(kp), 512)
    assert abs(len(kp) - n) <= (1 - MIN_AGREEMENT) * n

    i, j = _pairing(kp, ref_kp[:, :2], POS_ATOL)
    assert len(i) >= MIN_AGREEMENT * max(len(kp), n), f"only {len(i)} of {n} keypoints at upstream's positions"
    np.testing.assert_allclose(scores[i], ref_scores[j], rtol=SCORE_RTOL, atol=0)
    np.testing.assert_allclose(desc[i], ref_desc[j], rtol=0, atol=DESC_ATOL)
    assert np.all(np.diff(scores) <= 0), "keypoints are sorted by decreasing score"
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)

    # before sorting: upstream's (x, y, 1 / scale) triples, in upstream's order (the image
    # is not resized, so network input pixels are image pixels)
    assert model.preprocess(photo)[1:] == (1.0, 1.0)
    raw, raw_scores, _ = (t.numpy() for t in raw_out[0])
    raw = raw[:, [1, 0, 2]]
    i, j = _pairing(raw, ref_kp, POS_ATOL)
    assert len(i) >= MIN_AGREEMENT * n
    if len(raw) == n:  # the same detections come in the same order
        np.testing.assert_allclose(raw, ref_kp, rtol=0, atol=POS_ATOL)
        np.testing.assert_allclose(raw_scores, ref_scores, rtol=SCORE_RTOL, atol=0)


def test_max_keypoints_keeps_the_best(random_ckpt):
    img = load_tensor(need_shared(PAIRS / "montmartre_far.jpg"), resize=128)
    every = D2Net({"weights": str(random_ckpt), "scales": [1.0]})(img)
    n = len(every["scores"])
    assert n > 10
    assert len(D2Net({"weights": str(random_ckpt), "scales": [1.0], "max_keypoints": -1})(img)["scores"]) == n
    top = D2Net({"weights": str(random_ckpt), "scales": [1.0], "max_keypoints": 10})(img)
    for k in ("keypoints", "descriptors", "scores"):
        torch.testing.assert_close(top[k], every[k][:10], rtol=0, atol=0)


def test_random_checkpoint_runs_on_a_real_pair(random_ckpt):
    model = build_model({"name": "d2net", "weights": str(random_ckpt)})
    assert isinstance(model, D2Net) and not model.training and model.descriptor_dim == 512
    for name in ("montmartre_close.jpg", "montmartre_far.jpg"):
        img = load_tensor(need_shared(PAIRS / name), resize=128)
        out = model(img)
        n = len(out["keypoints"])
        assert n > 10, f"{name}: only {n} keypoints"
        assert out["keypoints"].shape == (n, 2) and out["keypoints"].dtype == torch.float32
        assert out["descriptors"].shape == (n, 512) and out["descriptors"].dtype == torch.float32
        assert out["scores"].shape == (n,) and out["scores"].dtype == torch.float32
        assert all(torch.isfinite(v).all() for v in out.values())
        torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(n), rtol=0, atol=1e-5)
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        kp, (h, w) = out["keypoints"], img.shape[1:]
        assert (kp >= 0).all() and (kp[:, 0] <= w).all() and (kp[:, 1] <= h).all()


def test_random_checkpoint_layout_and_loader(random_ckpt, tmp_path):
    ckpt = torch.load(random_ckpt, map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model"]
    state = ckpt["model"]
    assert list(state) == list(_template())
    assert all(v.dtype == torch.float32 for v in state.values())
    model = D2Net({"weights": str(random_ckpt)})
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    # train.py's checkpoints: {'args': Namespace, 'epoch_idx', 'model', 'optimizer', ...}
    training = tmp_path / "d2.10.pth"
    torch.save({"args": argparse.Namespace(lr=1e-3), "epoch_idx": 10, "model": state, "optimizer": {}}, training)
    for path in (plain, training):
        other = D2Net({"weights": str(path)})
        for k, v in other.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_bad_checkpoints_raise_naming_file_and_key(random_ckpt, tmp_path):
    state = torch.load(random_ckpt, map_location="cpu", weights_only=True)["model"]
    cases = {
        "missing_key.pth": ({k: v for k, v in state.items() if k != "dense_feature_extraction.model.19.bias"},
                            "dense_feature_extraction.model.19.bias"),
        "extra_key.pth": ({**state, "dense_feature_extraction.model.24.weight": torch.zeros(512, 512, 3, 3)},
                          "dense_feature_extraction.model.24.weight"),
        "wrong_shape.pth": ({**state, "dense_feature_extraction.model.21.weight": torch.zeros(256, 512, 3, 3)},
                            "dense_feature_extraction.model.21.weight"),
    }
    for name, (sd, key) in cases.items():
        torch.save({"model": sd}, tmp_path / name)
        with pytest.raises(ValueError, match=name) as err:
            D2Net({"weights": str(tmp_path / name)})
        assert key in str(err.value), str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        D2Net({"weights": str(junk)})
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        D2Net({"weights": str(tmp_path / "nowhere.pth")})
    with pytest.raises(ValueError, match="weights"):
        D2Net({})


@pytest.mark.parametrize("conf", [{"max_keypoints": 0}, {"scales": []}, {"scales": [1, -2]},
                                  {"preprocessing": "tf"}, {"max_edge": 0}, {"edge_threshold": 0}])
def test_invalid_conf(conf, random_ckpt):
    with pytest.raises(ValueError, match=next(iter(conf))):
        D2Net({"weights": str(random_ckpt), **conf})


def test_resize_limits_like_extract_features(random_ckpt):
    # extract_features.py: longer side to max_edge, then the sum of sides to max_sum_edges,
    # sizes truncated as scipy.misc.imresize does
    assert _target_size(876, 1280, 1600, 2800) == []
    assert _target_size(1200, 2000, 1600, 2800) == [(960, 1600)]
    assert _target_size(1600, 2000, 1600, 2800) == [(1280, 1600), (1244, 1555)]
    assert _target_size(1500, 1500, 1600, 2800) == [(1400, 1400)]
    assert _target_size(3000, 3000, None, None) == []
    # the second resize sees imresize's float output, which it contrast-stretches first
    low_contrast = np.full((4, 4, 3), 100.0)
    low_contrast[0, 0] = 110.0
    assert _imresize(low_contrast, 4, 4).max() == 255 and _imresize(low_contrast, 4, 4).min() == 0

    # keypoints come back in the given image's pixels
    img = load_tensor(need_shared(PAIRS / "montmartre_close.jpg"), resize=160)  # 160 x 110
    assert img.shape[1:] == (110, 160)
    small = D2Net({"weights": str(random_ckpt), "max_edge": 80})
    x, fact_i, fact_j = small.preprocess(img)
    assert x.shape[-2:] == (55, 80) and (fact_i, fact_j) == (110 / 55, 160 / 80)
    out = small(img)
    u8 = img.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    resized = torch.from_numpy(_imresize(u8, 55, 80)).permute(2, 0, 1).float() / 255
    direct = D2Net({"weights": str(random_ckpt)})(resized)
    assert len(out["keypoints"]) == len(direct["keypoints"]) > 0
    torch.testing.assert_close(out["keypoints"], direct["keypoints"] * 2, rtol=0, atol=0)
    torch.testing.assert_close(out["descriptors"], direct["descriptors"], rtol=0, atol=0)


def test_tiny_images(random_ckpt):
    # upstream fails on pyramid levels under 8 px (its stride-1 average pooling gets a
    # 1-pixel map); those levels are skipped, and an image under 8 px has no keypoints
    model = D2Net({"weights": str(random_ckpt)})
    for h, w in ((15, 30), (8, 8), (3, 5)):
        out = model(torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)))
        n = len(out["scores"])
        assert out["keypoints"].shape == (n, 2) and out["descriptors"].shape == (n, 512)
        if min(h, w) < 8:
            assert n == 0
