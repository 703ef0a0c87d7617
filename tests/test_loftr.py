"""LoFTR (kornia's network behind our loader) against outputs of the upstream zju3dv/LoFTR code.

The fixture ``tests/fixtures/loftr_reference.npz`` was made by
``tests/reference/make_loftr_reference.py`` (see ``tests/reference/README_loftr.md``):
upstream's LoFTR with the ``outdoor_ds`` config and weights from ``seeded_state_dict`` (seed
0) on ``montmartre_close.jpg`` / ``montmartre_far.jpg`` at 320 px, preprocessed as upstream
does (8-bit grey, ``cv2.resize`` to multiples of 8, ``scale0`` / ``scale1`` back). Here the
same seed is applied to the state dict of *our* network (so key names and shapes must be
upstream's), saved in the layout of the official ``outdoor_ds.ckpt`` (Lightning
``{'state_dict': {'matcher.<key>': ...}}``) and loaded through the conf.

A random LoFTR has no match above the default threshold 0.2, so the compared matches are
those above the lowered threshold ``low_threshold`` (1e-6) in both runs, plus the row and
column maxima of the whole coarse probability matrix.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.images import load_uint8, to_float
from pipeline.matchers.loftr import (
    NUM_PARAMETERS,
    LoFTR,
    build_net,
    write_random_checkpoint,
)
from tests.reference.random_state import seeded_state_dict

from .conftest import SHARED, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "loftr_reference.npz")
PAIRS = SHARED / "fixtures" / "pairs"
# Tolerances. Upstream itself in float64 differs from its float32 run by 1.4e-5 px
# (keypoints1) and 7e-5 (relative confidence); kornia's port on the same input differs
# from upstream by about as much (measured 1.5e-5 px, 5e-5 relative).
KP_ATOL = 1e-3  # px; image-0 points are coarse cells (8 * cell * scale), equal up to rounding
CONF_RTOL = 1e-3  # relative: the confidences of a random network are 5e-6 .. 7e-3
# Our preprocessing (float grey from the float RGB image, torch bilinear resize) against
# upstream's (8-bit cv2 grey, cv2.resize of the 8-bit image): rounding only (measured
# 1.21 / 255 at most, 0.28 / 255 on average).
GRAY_ATOL = 1.5 / 255
need_pairs = pytest.mark.skipif(not PAIRS.exists(), reason=f"{PAIRS} not available (../shared)")


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def seeded(ref, tmp_path_factory):
    state = seeded_state_dict(build_net().state_dict(), int(ref["weight_seed"]))
    path = tmp_path_factory.mktemp("loftr") / "outdoor_ds.ckpt"
    # the official release: a Lightning checkpoint, model keys under 'matcher.'
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {f"matcher.{k}": v for k, v in state.items()}}, path)
    return state, path


@pytest.fixture(scope="module")
def model(ref, seeded):
    m = LoFTR({"weights": str(seeded[1]), "match_threshold": float(ref["low_threshold"])})
    captured = {}

    def keep_conf_matrix(module, args, out):  # kornia's CoarseMatching writes into the dict it gets
        captured["conf_matrix"] = args[2]["conf_matrix"][0].clone()

    m.net.coarse_matching.register_forward_hook(keep_conf_matrix)
    m.captured = captured
    return m


def _stored(ref, i: int) -> dict[str, torch.Tensor]:
    """Upstream's own network input for image ``i``, in the format :meth:`LoFTR.prepare` returns."""
    gray = torch.from_numpy(ref[f"gray{i}"]).float()[None, None] / 255
    return {"image": gray, "scale": torch.from_numpy(ref[f"scale{i}"])}


@pytest.fixture(scope="module")
def on_stored(ref, model):
    out = model(_stored(ref, 0), _stored(ref, 1))
    return out, model.captured["conf_matrix"]


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("loftr_random") / "outdoor_ds_random.ckpt"
    write_random_checkpoint(path, seed=3)
    return path


def test_parameter_count(ref):
    # 11,561,456: upstream's LoFTR(lower_config(cfg)['loftr']) with the outdoor_ds config
    # (configs/loftr/outdoor/buggy_pos_enc/loftr_ds.py), counted by make_loftr_reference.py
    net = build_net()
    assert sum(p.numel() for p in net.parameters()) == NUM_PARAMETERS == 11_561_456
    assert int(ref["num_parameters"]) == NUM_PARAMETERS


def test_default_conf_is_upstream_outdoor(seeded):
    m = LoFTR({"weights": str(seeded[1])})
    cfg = m.net.config
    assert m.conf["resize"] == 840 and m.conf["match_threshold"] == 0.2
    assert cfg["coarse"]["temp_bug_fix"] is False  # outdoor_ds: the original positional encoding
    assert cfg["match_coarse"]["thr"] == 0.2
    assert cfg["match_coarse"]["match_type"] == "dual_softmax"
    assert cfg["match_coarse"]["dsmax_temperature"] == 0.1
    assert cfg["match_coarse"]["border_rm"] == 2
    assert tuple(cfg["resolution"]) == (8, 2) and cfg["fine_window_size"] == 5
    assert m.inputs == "images" and m.output == "points" and not m.training
    assert "'matcher.' prefix" in m.layout


def test_matches_upstream(ref, on_stored):
    out, _ = on_stored
    n = len(ref["confidence"])
    assert n >= 5
    assert out["keypoints0"].shape == out["keypoints1"].shape == (n, 2) and out["scores"].shape == (n,)
    # same coarse cells, same order (both list the matches by image-0 cell)
    np.testing.assert_allclose(out["keypoints0"].numpy(), ref["keypoints0"], rtol=0, atol=KP_ATOL)
    np.testing.assert_allclose(out["keypoints1"].numpy(), ref["keypoints1"], rtol=0, atol=KP_ATOL)
    np.testing.assert_allclose(out["scores"].numpy(), ref["confidence"], rtol=CONF_RTOL, atol=0)
    # keypoints are in pixels of the 320-px images: image 0 (320x219) was matched at 320x216
    w0, h0 = ref["image_size0"]
    assert ref["gray0"].shape == (h0 // 8 * 8, w0 // 8 * 8) != (h0, w0)
    cell = np.stack([ref["i_ids"] % ref["hw0_c"][1], ref["i_ids"] // ref["hw0_c"][1]], 1)
    np.testing.assert_allclose(out["keypoints0"].numpy(), 8 * cell * ref["scale0"], rtol=0, atol=1e-4)


def test_default_threshold_matches_upstream(ref, on_stored):
    # the threshold only selects among the same mutual matches; upstream found n_default at 0.2
    assert int((on_stored[0]["scores"] > float(ref["default_threshold"])).sum()) == int(ref["n_default"])


def test_coarse_probabilities_match_upstream(ref, on_stored):
    conf = on_stored[1]
    assert conf.shape == (len(ref["row_max"]), len(ref["col_max"]))
    for dim, key in ((1, "row"), (0, "col")):
        top2 = conf.topk(2, dim=dim).values
        top2 = top2 if dim == 1 else top2.t()
        np.testing.assert_allclose(top2[:, 0].numpy(), ref[f"{key}_max"], rtol=CONF_RTOL, atol=0)
        # arg-max where the best is separated from the second best by more than the noise
        clear = (top2[:, 0] > top2[:, 1] * (1 + 10 * CONF_RTOL)).numpy()
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(conf.argmax(dim).numpy()[clear], ref[f"{key}_argmax"][clear])


@need_pairs
def test_prepare_matches_upstream_preprocessing(ref, model):
    for i, name in enumerate(ref["images"]):
        image = to_float(load_uint8(need_shared(PAIRS / str(name)), int(ref["resize"])))
        assert tuple(image.shape[:0:-1]) == tuple(ref[f"image_size{i}"])
        p = model.prepare(image)
        gray = torch.from_numpy(ref[f"gray{i}"]).float() / 255
        assert p["image"].shape == (1, 1, *gray.shape) and p["image"].dtype == torch.float32
        assert float((p["image"][0, 0] - gray).abs().max()) <= GRAY_ATOL
        np.testing.assert_allclose(p["scale"].numpy(), ref[f"scale{i}"], rtol=1e-6)


@need_pairs
def test_end_to_end_pair_agrees_with_upstream(ref, model):
    """From the RGB images through our preprocessing; the input differs by 8-bit rounding."""
    p = [model.prepare(to_float(load_uint8(PAIRS / str(n), int(ref["resize"])))) for n in ref["images"]]
    out = model(*p)
    ours = {tuple(np.round(k).astype(int)): (k1, s) for k, k1, s in
            zip(out["keypoints0"].numpy() / ref["scale0"], out["keypoints1"].numpy(), out["scores"].numpy())}
    theirs = [tuple(np.round(k).astype(int)) for k in ref["keypoints0"] / ref["scale0"]]
    found = [i for i, k in enumerate(theirs) if k in ours]
    # measured: all 19 upstream matches, keypoints1 within 0.006 px, confidences within 3.2 %
    # (a random network is sensitive to the ~1/255 input differences). The rounding can
    # also make a borderline pair of cells mutual: with Pillow 13 one extra match appears,
    # at 4.3e-6, weaker than every upstream match. Extras must be that: few and weak.
    assert len(found) == len(theirs)
    extra = [s for k, s in zip(out["keypoints0"].numpy() / ref["scale0"], out["scores"].numpy())
             if tuple(np.round(k).astype(int)) not in set(theirs)]
    assert len(extra) <= max(1, len(theirs) // 10)
    assert all(s < ref["confidence"].min() for s in extra)
    for i in found:
        k1, s = ours[theirs[i]]
        assert np.abs(k1 - ref["keypoints1"][i]).max() < 0.05
        assert abs(s / ref["confidence"][i] - 1) < 0.1


def test_forward_many_equals_forward(ref, model):
    # small crops keep this fast; forward_many runs the query's backbone once for all candidates
    p0, p1 = _stored(ref, 0), _stored(ref, 1)
    p0["image"], p1["image"] = p0["image"][..., :96, :128], p1["image"][..., 16:112, 32:160]
    many = model.forward_many(p0, [p1, None, p0])
    single = [model(p0, p1), model.empty(), model(p0, p0)]
    for a, b in zip(many, single):
        assert a.keys() == b.keys()
        assert a["scores"].shape == b["scores"].shape
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batched_candidates_equal_one_at_a_time(ref, seeded, batch_size):
    # candidates of one size run as a batch (chunks of batch_size, a remainder of 1 alone);
    # other sizes and unreadable images in between keep their places
    single = LoFTR({"weights": str(seeded[1]), "match_threshold": float(ref["low_threshold"]), "batch_size": 1})
    batched = LoFTR({"weights": str(seeded[1]), "match_threshold": float(ref["low_threshold"]),
                     "batch_size": batch_size})
    p0, p1 = _stored(ref, 0), _stored(ref, 1)
    crop = lambda p, y, x, h=96, w=128: {"image": p["image"][..., y:y + h, x:x + w], "scale": p["scale"]}
    q = crop(p0, 0, 0)
    cands = [crop(p1, 16, 32), crop(p0, 8, 8), None, crop(p1, 0, 0, 80, 120), crop(p1, 40, 0), crop(p0, 0, 0)]
    a, b = single.forward_many(q, cands), batched.forward_many(q, cands)
    assert sum(len(r["scores"]) for r in a) > 20  # the comparison covers real matches
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["scores"].shape == y["scores"].shape
        for k in x:
            np.testing.assert_allclose(x[k].numpy(), y[k].numpy(), rtol=1e-4, atol=1e-4)


def test_auto_batch_is_one_on_cpu_and_bounded_by_memory(seeded):
    m = LoFTR({"weights": str(seeded[1])})
    assert m.fit_batch(m.pair_bytes_image(840, 632), "cpu") == 1
    m.cpu_batch_size = None  # the CPU budget rule: 512 MiB / ~1 GB per 840-px pair
    assert m.fit_batch(m.pair_bytes_image(840, 632), "cpu") == 1
    assert m.fit_batch(m.pair_bytes_image(96, 128), "cpu") == (1 << 29) // (2048 * 96 * 128)


@need_pairs
def test_runs_on_real_pair(random_ckpt):
    # write_random_checkpoint's weights find no match above 0.2; at 0, the mutual nearest neighbours
    m = LoFTR({"weights": str(random_ckpt), "match_threshold": 0.0, "resize": 320})
    names = ("montmartre_close.jpg", "montmartre_far.jpg")
    images = [to_float(load_uint8(need_shared(PAIRS / n), m.conf["resize"])) for n in names]
    out = m(m.prepare(images[0]), m.prepare(images[1]))
    assert set(out) == {"keypoints0", "keypoints1", "scores"}
    n = len(out["scores"])
    assert n > 0
    assert out["keypoints0"].shape == out["keypoints1"].shape == (n, 2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    for kp, img in zip((out["keypoints0"], out["keypoints1"]), images):
        h, w = img.shape[1:]
        assert (kp >= 0).all() and (kp[:, 0] <= w).all() and (kp[:, 1] <= h).all()
    assert ((out["scores"] > 0) & (out["scores"] <= 1)).all()


@pytest.mark.slow
@need_pairs
def test_runs_at_default_resize(random_ckpt):
    m = LoFTR({"weights": str(random_ckpt), "match_threshold": 0.0})
    images = [to_float(load_uint8(PAIRS / n, m.conf["resize"])) for n in ("montmartre_close.jpg", "notre_dame.jpg")]
    p = [m.prepare(x) for x in images]
    assert max(p[0]["image"].shape[-2:]) == 840 and all(s % 8 == 0 for q in p for s in q["image"].shape[-2:])
    out = m(*p)
    assert len(out["scores"]) > 0 and out["keypoints0"].dtype == torch.float32


# --------------------------------------------------------------------------- loading


def test_random_checkpoint_layout(random_ckpt):
    ckpt = torch.load(random_ckpt, map_location="cpu", weights_only=True)
    assert {"state_dict", "epoch"} <= set(ckpt)
    net_state = build_net().state_dict()
    assert set(ckpt["state_dict"]) == {f"matcher.{k}" for k in net_state}
    for k, v in net_state.items():
        assert ckpt["state_dict"][f"matcher.{k}"].dtype == v.dtype
    m = LoFTR({"weights": str(random_ckpt)})
    loaded = m.net.state_dict()
    assert all(torch.equal(loaded[k], ckpt["state_dict"][f"matcher.{k}"]) for k in loaded)
    # the seed decides the weights
    other = random_ckpt.with_name("other.ckpt")
    write_random_checkpoint(other, seed=4)
    w = "backbone.conv1.weight"
    assert not torch.equal(torch.load(other, weights_only=True)["state_dict"][f"matcher.{w}"], loaded[w])


def test_other_layouts_load_identically(seeded, tmp_path):
    state, path = seeded
    base = LoFTR({"weights": str(path)}).net.state_dict()
    layouts = {
        "plain": state,  # kornia's LoFTR().state_dict()
        "state_dict_plain": {"state_dict": state},
        "no_bn_counters": {"state_dict": {f"matcher.{k}": v for k, v in state.items()
                                          if not k.endswith("num_batches_tracked")}},
    }
    for name, obj in layouts.items():
        p = tmp_path / f"{name}.ckpt"
        torch.save(obj, p)
        loaded = LoFTR({"weights": str(p)}).net.state_dict()
        assert loaded.keys() == base.keys(), name
        assert all(torch.equal(loaded[k], base[k]) for k in base), name


def _save_variant(seeded, tmp_path, name, change) -> str:
    state = {f"matcher.{k}": v for k, v in seeded[0].items()}
    change(state)
    p = tmp_path / name
    torch.save({"epoch": 0, "state_dict": state}, p)
    return str(p)


def test_missing_key_raises(seeded, tmp_path):
    p = _save_variant(seeded, tmp_path, "missing_key.ckpt",
                      lambda s: s.pop("matcher.loftr_coarse.layers.3.merge.weight"))
    with pytest.raises(ValueError, match="missing_key.ckpt") as err:
        LoFTR({"weights": p})
    assert "loftr_coarse.layers.3.merge.weight" in str(err.value)


def test_unexpected_key_raises(seeded, tmp_path):
    # LoFTR-OT checkpoints carry the optimal-transport dustbin score
    p = _save_variant(seeded, tmp_path, "outdoor_ot.ckpt",
                      lambda s: s.update({"matcher.coarse_matching.bin_score": torch.tensor(1.0)}))
    with pytest.raises(ValueError, match="outdoor_ot.ckpt.*unexpected keys.*coarse_matching.bin_score"):
        LoFTR({"weights": p})


def test_wrong_shape_raises(seeded, tmp_path):
    p = _save_variant(seeded, tmp_path, "wrong_shape.ckpt",
                      lambda s: s.update({"matcher.backbone.conv1.weight": torch.zeros(64, 1, 7, 7)}))
    with pytest.raises(ValueError, match="wrong_shape.ckpt") as err:
        LoFTR({"weights": p})
    assert "backbone.conv1.weight" in str(err.value) and "(64, 1, 7, 7)" in str(err.value)


def test_unreadable_file_raises(tmp_path):
    p = tmp_path / "junk.ckpt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        LoFTR({"weights": str(p)})


def test_no_weights_raises():
    with pytest.raises(ValueError, match="outdoor_ds.ckpt"):
        LoFTR()


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        LoFTR({"weights": str(tmp_path / "nope.ckpt")})


def test_registered_name():
    from pipeline.matchers import MODELS

    assert MODELS["loftr"] == ("pipeline.matchers.loftr", "LoFTR")
