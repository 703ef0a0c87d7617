"""CVNet-Rerank against outputs of the upstream sungonce/CVNet code.

The fixture ``tests/fixtures/cvnet_reference.npz`` was made by
``tests/reference/make_cvnet_reference.py`` (see ``tests/reference/README_cvnet.md``):
upstream's ``CVNet_Rerank(50, 2048)`` with weights from ``seeded_state_dict`` on four
photos of ``../shared/fixtures/pairs`` (longer side 200 px). Here the same seed is
applied to *our* network's state dict (so key names and shapes must be upstream's),
saved like the released ``CVPR2022_CVNet_R50.pyth`` (``{'model_state': ...}``) and
loaded through the matcher's conf; the photos go through the pipeline's image loader.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline.images import load_tensor
from pipeline.matchers import build_matcher
from pipeline.matchers.cvnet import (
    CVNet,
    CVNetRerank,
    normalize,
    pyramid_sizes,
    write_random_checkpoint,
)
from tests.reference.random_state import seeded_state_dict

from .conftest import REPO, SHARED, need_shared

FIXTURE = REPO / "tests" / "fixtures" / "cvnet_reference.npz"
PAIRS_DIR = SHARED / "fixtures" / "pairs"

# Tolerances. Our network runs upstream's operations in upstream's order, except
# that the correlation is one broadcast matmul over the candidates (upstream: bmm)
# and the 4D-conv strides slice instead of index_select. Measured on CPU (torch
# 2.14.1): res3, logits and scores bit-identical, global descriptors within 7.5e-9;
# on an H200 without TF32 the logits within 2.8e-7 (with PyTorch's default TF32
# convolutions 1.7e-4). Upstream itself in float64 differs from its float32 run by
# 1.6e-7 on the logits (stored in the fixture). The bounds leave room for other
# CPUs' kernels.
LOGIT_ATOL = 2e-5
SCORE_ATOL = 1e-5
GLOBAL_ATOL = 1e-5  # unit vectors of 2048 components
RES3_RTOL = 1e-5  # relative to the map's largest magnitude (~16 here)

# Parameter counts of upstream's CVNet_Rerank(50, 2048), counted from
# model/CVNet_Rerank_model.py at commit 5f5bf2417bc644eb82d8f5d85533a92e34b3d8e8
# (sum of p.numel() over model.parameters(); BN running statistics not included).
PARAMS_TOTAL = 35_190_499  # the whole file: global + re-ranking branch
PARAMS_ENCODER = 27_704_385  # encoder_q: ResNet-50 (23_508_032) + GeM p + head.fc 2048x2048 (4_196_353 with p)
PARAMS_RERANK_HEAD = 7_486_114  # conv2ds (3 x 1024*256*9 = 7_077_888) + cv_learner (408_226)
PARAMS_RERANK_USED = 16_029_410  # what a re-ranking score runs: stem..s3 (8_543_296) + the rerank head
PARAMS_TOTAL_R101 = 54_182_627  # CVNet_Rerank(101, 2048)


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def seeded_state(ref) -> dict[str, torch.Tensor]:
    template = CVNetRerank(int(ref["depth"]), int(ref["reduction_dim"])).state_dict()
    return seeded_state_dict(template, int(ref["weight_seed"]), gain=float(ref["gain"]))


@pytest.fixture(scope="module")
def weights(seeded_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("cvnet") / "CVPR2022_CVNet_R50.pyth"
    torch.save({"model_state": seeded_state}, path)  # the released layout
    return path


@pytest.fixture(scope="module")
def model(ref, weights) -> CVNet:
    return build_matcher({"name": "cvnet", "weights": str(weights), "resize": int(ref["resize"])})


@pytest.fixture(scope="module")
def images(ref, model):
    """The fixture's photos through the pipeline's loader (the pixels upstream saw)."""
    out = []
    for i, name in enumerate(ref["images"]):
        path = need_shared(PAIRS_DIR / str(name))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == str(ref[f"image{i}_sha256"]), name
        img = load_tensor(path, model.conf["resize"])
        assert tuple(img.shape) == (3, *ref[f"image{i}_shape"][:2])
        assert int(torch.round(img * 255).to(torch.int64).sum()) == int(ref[f"image{i}_pixel_sum"])
        out.append(img)
    return out


@pytest.fixture(scope="module")
def prepared(model, images):
    with torch.inference_mode():
        return [model.prepare(img) for img in images]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count():
    net = CVNetRerank(50, 2048)
    enc = net.encoder_q
    assert _count(net) == PARAMS_TOTAL
    assert _count(enc) == PARAMS_ENCODER
    assert _count(net.conv2ds) + _count(net.cv_learner) == PARAMS_RERANK_HEAD
    used = sum(_count(m) for m in (enc.stem, enc.s1, enc.s2, enc.s3, net.conv2ds, net.cv_learner))
    assert used == PARAMS_RERANK_USED
    assert _count(CVNetRerank(101, 2048)) == PARAMS_TOTAL_R101


def test_fixture_is_not_degenerate(ref):
    s = ref["scores"]
    assert np.all((s > 0.01) & (s < 0.99)) and np.ptp(s) > 0.01
    # the diagonal (same-level) correlation channels carry most of the signal, none is empty
    assert ref["corr0_nonzero"].min() > 0.05
    # odd feature-map sides: the pyramid's round(x.5) (half to even) matters
    assert any(int(v) % 2 for i in range(4) for v in ref[f"res3_size{i}"])


def test_pyramid_sizes_round_half_to_even():
    # upstream: round(h * sqrt(scale)) with Python's round; 13 * 0.5 = 6.5 -> 6, 9 * 0.5 -> 4
    assert pyramid_sizes(13, 9) == [(6, 4), (9, 6), (13, 9)]
    assert pyramid_sizes(1, 1) == [(1, 1), (1, 1), (1, 1)]  # upstream: 0 rows -> an error


def test_res3_matches_upstream(ref, model, images):
    with torch.inference_mode():
        for i, img in enumerate(images):
            res3 = model.net.encoder_q.res3(normalize(img))[0]
            assert tuple(res3.shape[-2:]) == tuple(ref[f"res3_size{i}"])
            expected = ref[f"res3_{i}"]
            got = res3[: len(expected)].numpy()
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got, expected, rtol=0, atol=RES3_RTOL * scale)


def test_global_descriptor_matches_upstream(ref, model, images):
    for i, img in enumerate(images):
        g = model.global_descriptor(img, scales=[1.0])
        assert g.shape == (2048,) and g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), ref[f"global{i}"], rtol=0, atol=GLOBAL_ATOL)
    multi = model.global_descriptor(images[0])  # upstream's three scales (approximated resizing)
    assert torch.isfinite(multi).all() and abs(float(multi.norm()) - 1) < 1e-5


def test_correlation_matches_upstream(ref, model, prepared):
    q, k = ref["pairs"][0]
    with torch.inference_mode():
        corr = model.net.correlation(prepared[q], [prepared[k]])[0]
    assert tuple(corr.shape) == tuple(ref["corr0_shape"])
    flat = corr.flatten(1)
    np.testing.assert_allclose(flat.mean(1).numpy(), ref["corr0_mean"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(flat.amax(1).numpy(), ref["corr0_max"], rtol=0, atol=1e-6)
    np.testing.assert_allclose((flat > 0).float().mean(1).numpy(), ref["corr0_nonzero"], rtol=0, atol=1e-3)


def test_scores_match_upstream(ref, model, prepared):
    for (q, k), logits, score in zip(ref["pairs"], ref["logits"], ref["scores"]):
        with torch.inference_mode():
            got = model.logits(prepared[q], [prepared[k]])[0]
        np.testing.assert_allclose(got.numpy(), logits, rtol=0, atol=LOGIT_ATOL)
        out = model(prepared[q], prepared[k])
        assert set(out) == {"pair_score"}
        assert out["pair_score"].shape == (1,) and out["pair_score"].dtype == torch.float32
        assert abs(float(out["pair_score"][0]) - score) < SCORE_ATOL


@pytest.fixture
def small_batches(model):
    """The shared model with ``batch_size`` 2 while a test runs."""
    old = model.conf["batch_size"]
    model.conf["batch_size"] = 2
    yield model
    model.conf["batch_size"] = old


def test_forward_many_equals_one_at_a_time(small_batches, prepared):
    # mixed feature-map sizes (9x13, 13x10, 13x13) and chunks of 2 within a size
    m = small_batches
    order = [1, 2, 0, 3, 1, 0, 2]
    many = m.forward_many(prepared[0], [prepared[i] for i in order])
    one = [m(prepared[0], prepared[i]) for i in order]
    assert len(many) == len(order)
    for a, b in zip(many, one):
        assert a["pair_score"].shape == (1,)
        torch.testing.assert_close(a["pair_score"], b["pair_score"], rtol=0, atol=1e-6)
    # an unreadable candidate (None) gets the empty result, the others are unchanged
    mixed = m.forward_many(prepared[0], [prepared[1], None, prepared[2]])
    assert float(mixed[1]["pair_score"][0]) == float("-inf")
    torch.testing.assert_close(mixed[0]["pair_score"], one[0]["pair_score"], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2]["pair_score"], one[1]["pair_score"], rtol=0, atol=1e-6)


def test_prepare_output(model, prepared, images):
    p = prepared[0]
    h, w = p["size"]
    assert (h, w) == ((images[0].shape[1] + 15) // 16, (images[0].shape[2] + 15) // 16)
    for (feats, norms, (hs, ws)), size in zip(p["levels"], pyramid_sizes(h, w)):
        assert (hs, ws) == size
        assert feats.shape == (256, hs * ws) and norms.shape == (hs * ws,)


# --------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def random_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cvnet_random") / "cvnet_seed0.pth"
    write_random_checkpoint(path, seed=0)
    return path


def test_random_checkpoint_layout(random_file):
    obj = torch.load(random_file, map_location="cpu", weights_only=True)
    assert set(obj) == {"model_state"}
    template = CVNetRerank().state_dict()
    assert list(obj["model_state"]) == list(template)
    for k, v in template.items():
        assert obj["model_state"][k].dtype == v.dtype and obj["model_state"][k].shape == v.shape, k
    # seeded: the same seed gives the same file contents, another seed other weights
    again = random_file.with_name("again.pth")
    write_random_checkpoint(again, seed=0)
    w0 = obj["model_state"]["cv_learner.mlp.2.weight"]
    assert torch.equal(torch.load(again, weights_only=True)["model_state"]["cv_learner.mlp.2.weight"], w0)


def test_real_pair_with_random_checkpoint(random_file):
    m = build_matcher({"name": "cvnet", "weights": str(random_file), "resize": 160})
    assert isinstance(m, CVNet) and not m.training and m.inputs == "images" and m.output == "pair_score"
    q = load_tensor(need_shared(PAIRS_DIR / "montmartre_close.jpg"), 160)
    c = load_tensor(need_shared(PAIRS_DIR / "montmartre_far.jpg"), 160)
    with torch.inference_mode():
        pq, pc = m.prepare(q), m.prepare(c)
    out = m(pq, pc)
    s = out["pair_score"]
    assert s.shape == (1,) and s.dtype == torch.float32
    assert 0 < float(s[0]) < 1  # a probability, not saturated
    g = m.global_descriptor(q, scales=[1.0])
    assert g.shape == (2048,) and torch.isfinite(g).all()


def _load(path):
    return CVNet({"weights": str(path)})


def test_other_layouts_load(seeded_state, tmp_path):
    extra = {"epoch": 10, "cfg": "MODEL:\n  DEPTH: 50\n", "optimizer_state": {"state": {}, "param_groups": []}}
    layouts = {
        "plain": seeded_state,
        "module": {f"module.{k}": v for k, v in seeded_state.items()},
        "pycls_full": {"model_state": seeded_state, **extra},
        "no_bn_counters": {"model_state": {k: v for k, v in seeded_state.items()
                                           if not k.endswith("num_batches_tracked")}},
    }
    for name, obj in layouts.items():
        p = tmp_path / f"{name}.pyth"
        torch.save(obj, p)
        loaded = _load(p).net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in seeded_state.items()), name


def test_missing_key_raises(seeded_state, tmp_path):
    bad = dict(seeded_state)
    del bad["cv_learner.block3.3.conv2.weight"]
    p = tmp_path / "missing_key.pyth"
    torch.save({"model_state": bad}, p)
    with pytest.raises(ValueError, match="missing_key.pyth") as err:
        _load(p)
    assert "cv_learner.block3.3.conv2.weight" in str(err.value)


def test_unexpected_key_raises(seeded_state, tmp_path):
    p = tmp_path / "extra_key.pyth"
    torch.save({"model_state": {**seeded_state, "encoder_k.stem.conv.weight": torch.zeros(64, 3, 7, 7)}}, p)
    with pytest.raises(ValueError, match="extra_key.pyth.*encoder_k.stem.conv.weight"):
        _load(p)


def test_wrong_shape_raises(seeded_state, tmp_path):
    p = tmp_path / "wrong_shape.pyth"
    torch.save({"model_state": {**seeded_state, "conv2ds.1.weight": torch.zeros(128, 1024, 3, 3)}}, p)
    with pytest.raises(ValueError, match="wrong_shape.pyth") as err:
        _load(p)
    assert "conv2ds.1.weight" in str(err.value)


def test_r50_file_does_not_fit_r101(weights):
    with pytest.raises(ValueError, match="CVPR2022_CVNet_R50.pyth.*missing keys"):
        CVNet({"weights": str(weights), "depth": 101})


def test_unreadable_file_raises(tmp_path):
    p = tmp_path / "junk.pyth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pyth"):
        _load(p)


def test_no_weights_raises(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        CVNet()
    with pytest.raises(ValueError, match="weights"):
        build_matcher({"name": "cvnet"})
    with pytest.raises(FileNotFoundError, match="nope.pyth"):
        CVNet({"weights": str(tmp_path / "nope.pyth")})


def test_bad_image_raises(model):
    with pytest.raises(ValueError, match="RGB image"):
        model.prepare(torch.zeros(1, 32, 32))
