"""SuperGlue against outputs of the upstream magicleap/SuperGluePretrainedNetwork code.

The fixture ``tests/fixtures/superglue_reference.npz`` was made by
``tests/reference/make_superglue_reference.py`` (see ``tests/reference/README.md``):
upstream's ``SuperGlue`` with weights from ``seeded_state_dict`` (``bin_score`` set to the
value stored in the fixture) on synthetic keypoints. Here the same seed is applied to
*our* network's state dict (so key names and shapes must be upstream's), saved like the
official ``superglue_outdoor.pth`` and loaded through the conf.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.matchers import build_matcher
from pipeline.matchers.superglue import SuperGlue, SuperGlueNet, mutual_matches
from tests.reference.random_state import seeded_state_dict

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "superglue_reference.npz")
# upstream computes attention with einsum + softmax, we use scaled_dot_product_attention:
# the matching scores differ by ~2e-5, the float32 rounding noise of this fixture
# (upstream itself in float64 differs from its float32 run by ~1.3e-5)
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def _seeded_state(ref) -> dict[str, torch.Tensor]:
    template = {k: v for k, v in SuperGlueNet().state_dict().items() if k != "bin_score"}
    state = seeded_state_dict(template, int(ref["weight_seed"]), gain=float(ref["gain"]))
    state["bin_score"] = torch.tensor(float(ref["bin_score"]))
    return state


@pytest.fixture(scope="module")
def weights(ref, tmp_path_factory):
    state = _seeded_state(ref)
    path = tmp_path_factory.mktemp("sg") / "superglue_outdoor.pth"
    torch.save(state, path)  # the official release is a plain state dict
    return state, path


#: a 2-layer network: the loader checks below don't need the 12M-parameter one
SMALL = {"keypoint_encoder": [32, 64], "gnn_layers": ["self", "cross"]}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    net = SuperGlueNet(**SMALL)
    template = {k: v for k, v in net.state_dict().items() if k != "bin_score"}
    state = {**seeded_state_dict(template, 1), "bin_score": torch.tensor(2.5)}
    path = tmp_path_factory.mktemp("sg_small") / "superglue_small.pth"
    torch.save(state, path)
    return state, path


def _small(path) -> SuperGlue:
    return SuperGlue({**SMALL, "weights": str(path)})


def _features(ref, i: int) -> dict[str, torch.Tensor]:
    f = {k: torch.from_numpy(ref[f"{k}{i}"]) for k in ("keypoints", "descriptors", "scores")}
    f["image_size"] = torch.from_numpy(ref["image_size"])
    return f


def _expected(ref, prefix: str = ""):
    m0 = ref[f"{prefix}matches0"]
    valid = m0 > -1
    return np.stack([np.nonzero(valid)[0], m0[valid]], 1), ref[f"{prefix}matching_scores0"][valid]


@pytest.fixture(scope="module")
def model(weights):
    return build_matcher({"name": "superglue", "weights": str(weights[1])})


@pytest.fixture(scope="module")
def log_assignment(ref, model):
    return model.log_assignment(_features(ref, 0), _features(ref, 1))


def test_fixture_is_not_degenerate(ref):
    # some matches pass the default threshold, more the low one, and the dustbins get mass
    n, n_low = (ref["matches0"] > -1).sum(), (ref["low_matches0"] > -1).sum()
    assert 0 < n < n_low
    assert 0.05 < np.exp(ref["log_assignment"][:-1, -1]).mean() < 0.95


def test_matches_upstream(ref, model):
    assert isinstance(model, SuperGlue) and not model.training
    assert model.conf["match_threshold"] == float(ref["match_threshold"])
    out = model(_features(ref, 0), _features(ref, 1))
    matches, scores = _expected(ref)
    assert out["matches"].dtype == torch.int64
    np.testing.assert_array_equal(out["matches"].numpy(), matches)
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=0, atol=ATOL)


def test_log_assignment_matches_upstream(ref, log_assignment):
    z = log_assignment.numpy()
    expected = ref["log_assignment"]
    assert z.shape == expected.shape == (len(ref["keypoints0"]) + 1, len(ref["keypoints1"]) + 1)
    # probabilities (x (M + N) for the dustbins' row / column, as upstream returns them)
    np.testing.assert_allclose(np.exp(z[:-1, :-1]), np.exp(expected[:-1, :-1]), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.exp(z), np.exp(expected), rtol=1e-4, atol=ATOL)
    # log domain, where the probability is not negligible (raw scores are ~720 here)
    keep = expected > -20
    np.testing.assert_allclose(z[keep], expected[keep], rtol=0, atol=1e-3)


def test_low_threshold_matches_upstream(ref, log_assignment):
    # the threshold only enters after the optimal transport (what SuperGlue._forward does)
    matches, scores = mutual_matches(log_assignment, float(ref["low_threshold"]))
    expected_matches, expected_scores = _expected(ref, "low_")
    assert len(expected_matches) > (ref["matches0"] > -1).sum()
    np.testing.assert_array_equal(matches.numpy(), expected_matches)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=0, atol=ATOL)


def test_other_layouts_load_identically(small, tmp_path):
    state, path = small
    base = _small(path).net.state_dict()
    assert all(torch.equal(base[k], v) for k, v in state.items())
    layouts = {
        "module": {f"module.{k}": v for k, v in state.items()},
        "state_dict": {"state_dict": state},
        "model": {"model": state},
        "state_dict_module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "no_bn_counters": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }
    for name, obj in layouts.items():
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p)
        loaded = _small(p).net.state_dict()
        assert loaded.keys() == base.keys(), name
        assert all(torch.equal(loaded[k], base[k]) for k in base), name


def test_missing_key_raises(small, tmp_path):
    bad = dict(small[0])
    del bad["gnn.layers.1.attn.merge.weight"]
    p = tmp_path / "missing_key.pth"
    torch.save(bad, p)
    with pytest.raises(ValueError, match="missing_key.pth") as err:
        _small(p)
    assert "gnn.layers.1.attn.merge.weight" in str(err.value)


def test_unexpected_key_raises(small, tmp_path):
    p = tmp_path / "extra_key.pth"
    torch.save({**small[0], "match_proj.weight": torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="extra_key.pth.*match_proj.weight"):
        _small(p)


def test_wrong_shape_raises(small, weights, tmp_path):
    p = tmp_path / "wrong_shape.pth"
    torch.save({**small[0], "final_proj.weight": torch.zeros(128, 256, 1)}, p)
    with pytest.raises(ValueError, match="wrong_shape.pth") as err:
        _small(p)
    assert "final_proj.weight" in str(err.value)
    # the full 18-layer file does not fit a 2-layer network either
    with pytest.raises(ValueError, match="superglue_outdoor.pth.*unexpected keys"):
        _small(weights[1])


def test_unreadable_file_raises(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        _small(p)


def test_no_weights_raises():
    with pytest.raises(ValueError, match="superglue_outdoor.pth"):
        SuperGlue()
    with pytest.raises(ValueError, match="weights"):
        build_matcher({"name": "superglue"})


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        SuperGlue({"weights": str(tmp_path / "nope.pth")})


def test_empty_keypoints(ref, model):
    f0, f1 = _features(ref, 0), _features(ref, 1)
    empty = {
        "keypoints": torch.zeros(0, 2),
        "descriptors": torch.zeros(0, 256),
        "scores": torch.zeros(0),
        "image_size": f0["image_size"],
    }
    for a, b in ((empty, f1), (f0, empty), (empty, empty)):
        out = model(a, b)
        assert out["matches"].shape == (0, 2) and out["matches"].dtype == torch.int64
        assert out["scores"].shape == (0,)


def test_wrong_descriptor_dim_raises(ref, model):
    f0, f1 = _features(ref, 0), _features(ref, 1)
    f0["descriptors"] = f0["descriptors"][:, :128]
    with pytest.raises(ValueError, match="descriptors"):
        model(f0, f1)
