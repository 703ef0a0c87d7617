"""RRT (uvavision/RerankingTransformer) against logits of the upstream ``MatchERT``.

The fixture ``tests/fixtures/rrt_reference.npz`` was made by
``tests/reference/make_rrt_reference.py`` (see ``tests/reference/README_rrt.md``):
upstream's model with ``seeded_rrt_state`` weights (seed 5), synthetic DELG-like
features passed through upstream's ``FeatureDataset`` preprocessing (top 500 features,
padding masks, scale buckets). Here the same seed fills *our* network, saved in the
released ``{'state': ..., 'optim': ...}`` layout and loaded through the conf.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from pipeline.images import load_tensor
from pipeline.matchers.rrt import (
    DELG_SCALES,
    RRT,
    MatchERT,
    delf_bucket,
    write_random_checkpoint,
)
from tests.reference.make_rrt_reference import seeded_rrt_state

from .conftest import SHARED, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "rrt_reference.npz")
PAIRS = SHARED / "fixtures" / "pairs"
# float32 rounding: upstream's own float64 run differs from its float32 one by ~3e-7, ours
# (scaled_dot_product_attention, a last layer computing [CLS] only) from upstream by ~1e-6
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model(ref, tmp_path_factory):
    state = seeded_rrt_state(MatchERT().state_dict(), int(ref["weight_seed"]))
    path = tmp_path_factory.mktemp("rrt") / "r50_gldv1.pt"
    torch.save({"state": state, "optim": {"state": {}, "param_groups": []}}, path)
    return RRT({"weights": str(path), "batch_size": 2})


def _features(ref, i: int) -> dict[str, torch.Tensor]:
    n = len(ref[f"scores{i}"])
    return {
        "keypoints": torch.zeros(n, 2),  # RRT does not use positions
        "descriptors": torch.from_numpy(ref[f"descriptors{i}"]),  # float16, as our feature store keeps them
        "scores": torch.from_numpy(ref[f"scores{i}"]),
        "scales": torch.from_numpy(ref[f"image_scales{i}"]),
        "global_descriptor": torch.from_numpy(ref[f"global{i}"].astype(np.float32)),
        "image_size": torch.from_numpy(ref[f"image_size{i}"]),
    }


def _candidates(ref) -> list[dict]:
    return [_features(ref, i) for i in range(1, len(ref["logits"]) + 1)]


def test_parameter_count(ref):
    # upstream MatchERT with the RRT named config; its training log prints the same
    # ("# of trainable parameters:  2243201", RRT_GLD/logs/r50_gldv1_log_retrained/cout.txt)
    assert sum(p.numel() for p in MatchERT().parameters()) == 2_243_201 == int(ref["n_params"])


def test_state_keys_are_upstreams(ref):
    assert sorted(MatchERT().state_dict()) == ref["state_keys"].tolist()


def test_fixture_is_not_degenerate(ref):
    assert len(ref["scores0"]) > int(ref["max_sequence_len"]) > max(len(ref[f"scores{i}"]) for i in (1, 2, 3))
    assert np.ptp(ref["logits"]) > 0.1
    np.testing.assert_allclose(ref["logits_batched"], ref["logits"], rtol=0, atol=ATOL)


def test_scale_buckets_match_upstream(model, ref):
    # TF DELG's 7 scales fall into upstream's buckets 6, 4, 4, 2, 2, 0, 0
    assert [delf_bucket(s) for s in DELG_SCALES] == [6, 4, 4, 2, 2, 0, 0]
    for i in range(4):
        n = min(len(ref[f"scores{i}"]), int(ref["max_sequence_len"]))
        ours = model.scale_buckets(torch.from_numpy(ref[f"image_scales{i}"]))[:n]
        np.testing.assert_array_equal(ours.numpy(), ref[f"scale_inds{i}"][:n])
        assert ref[f"mask{i}"][:n].sum() == 0 and ref[f"mask{i}"][n:].all()
    # feymanpriv DELG's rounded scales (0.3535, 0.7071, 1.4142) get the same buckets
    ours = model.scale_buckets(torch.tensor([0.25, 0.3535, 0.5, 0.7071, 1.0, 1.4142, 2.0]))
    assert ours.tolist() == [6, 4, 4, 2, 2, 0, 0]


def test_logits_match_upstream(model, ref):
    q = _features(ref, 0)
    single = np.array([float(model(q, c)["pair_score"]) for c in _candidates(ref)])
    np.testing.assert_allclose(single, ref["logits"], rtol=0, atol=ATOL)
    out = model(q, _features(ref, 1))["pair_score"]
    assert out.shape == (1,) and out.dtype == torch.float32


def test_forward_many_is_one_at_a_time(model, ref):
    # batch_size 2: the 3 candidates go in two padded batches
    q, cands = _features(ref, 0), _candidates(ref)
    many = model.forward_many(q, cands)
    single = [model(q, c)["pair_score"] for c in cands]
    for a, b in zip(many, single):
        assert a["pair_score"].shape == (1,)
        torch.testing.assert_close(a["pair_score"], b, rtol=0, atol=ATOL)
    np.testing.assert_allclose([float(r["pair_score"]) for r in many], ref["logits"], rtol=0, atol=ATOL)
    # an unreadable (None) or empty candidate scores -inf, the others are unchanged
    empty = {k: v[:0] for k, v in cands[1].items() if k not in ("global_descriptor", "image_size")}
    empty.update(global_descriptor=cands[1]["global_descriptor"], image_size=cands[1]["image_size"])
    out = model.forward_many(q, [cands[0], None, empty, cands[2]])
    assert math.isinf(float(out[1]["pair_score"])) and math.isinf(float(out[2]["pair_score"]))
    np.testing.assert_allclose([float(out[0]["pair_score"]), float(out[3]["pair_score"])],
                               ref["logits"][[0, 2]], rtol=0, atol=ATOL)


def test_feature_order_does_not_matter(model, ref):
    # upstream keeps DELG's first 500 features (decreasing attention); we sort by score
    q = _features(ref, 0)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(q["scores"])))
    shuffled = {k: (v[perm] if k not in ("global_descriptor", "image_size") else v) for k, v in q.items()}
    c = _features(ref, 2)
    torch.testing.assert_close(model(shuffled, c)["pair_score"], model(q, c)["pair_score"], rtol=0, atol=ATOL)


def test_wrong_dimensions_raise(model, ref):
    q, c = _features(ref, 0), _features(ref, 1)
    with pytest.raises(ValueError, match="num_global_features"):
        model({**q, "global_descriptor": torch.zeros(512)}, c)
    with pytest.raises(ValueError, match="num_local_features"):
        model(q, {**c, "descriptors": torch.zeros(len(c["scores"]), 512)})
    with pytest.raises(ValueError, match="scales"):
        model(q, {k: v for k, v in c.items() if k != "scales"})


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("rrt_random") / "rrt_seed0.pt"
    write_random_checkpoint(path, seed=0)
    return path


def test_random_checkpoint_layout(random_ckpt):
    ckpt = torch.load(random_ckpt, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state", "optim"} and set(ckpt["optim"]) == {"state", "param_groups"}
    assert sorted(ckpt["state"]) == sorted(MatchERT().state_dict())
    assert all(v.dtype == torch.float32 for v in ckpt["state"].values())
    assert "'state'" in RRT({"weights": str(random_ckpt)}).layout


def test_loader_refuses_bad_checkpoints(random_ckpt, tmp_path):
    state = torch.load(random_ckpt, map_location="cpu", weights_only=True)["state"]
    missing = {k: v for k, v in state.items() if k != "encoder.layers.3.linear1.weight"}
    cases = (
        ("missing_key.pt", missing, "encoder.layers.3.linear1.weight"),
        ("extra_key.pt", {**state, "pos_encoder.weight": torch.zeros(2)}, "pos_encoder.weight"),
        ("wrong_shape.pt", {**state, "remap.weight": torch.zeros(128, 512)}, "remap.weight"),
    )
    for name, bad, key in cases:
        torch.save({"state": bad, "optim": {}}, tmp_path / name)
        with pytest.raises(ValueError, match=name) as err:
            RRT({"weights": str(tmp_path / name)})
        assert key in str(err.value)
    # a 6-layer file does not fit a 4-layer model
    with pytest.raises(ValueError, match="rrt_seed0.pt.*unexpected keys"):
        RRT({"weights": str(random_ckpt), "num_encoder_layers": 4})


def test_missing_weights_raise(tmp_path):
    with pytest.raises(ValueError, match="rrt_gld_ckpts"):
        RRT()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        RRT({"weights": str(tmp_path / "nope.pt")})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        RRT({"weights": str(junk)})


def test_real_pair_with_delg_features(tmp_path):
    # DELG (random feymanpriv-layout weights: 512-d global and local descriptors) feeding an
    # RRT sized for them; the released RRT weights need TensorFlow DELG's 2048 / 128
    from pipeline.local_features.delg import DELG
    from pipeline.local_features.delg import write_random_checkpoint as write_delg

    write_delg(tmp_path / "delg.pyth", seed=0, conf={"num_classes": 2})
    delg = DELG({"weights": str(tmp_path / "delg.pyth")})
    feats = []
    for name in ("montmartre_close.jpg", "montmartre_far.jpg"):
        f = delg(load_tensor(need_shared(PAIRS / name), resize=128))
        f["descriptors"] = f["descriptors"].half()  # as the feature store keeps them
        feats.append(f)
    dims = {"num_global_features": 512, "num_local_features": 512}
    write_random_checkpoint(tmp_path / "rrt.pt", seed=0, conf=dims)
    rrt = RRT({"weights": str(tmp_path / "rrt.pt"), **dims})
    out = rrt(feats[0], feats[1])["pair_score"]
    assert out.shape == (1,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    many = rrt.forward_many(feats[0], [feats[1], feats[0]])
    torch.testing.assert_close(many[0]["pair_score"], out, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="num_global_features"):
        RRT({"weights": str(tmp_path / "rrt.pt"), **dims, "num_global_features": 2048})
