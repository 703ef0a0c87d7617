"""Patch-NetVLAD against patch descriptors computed by the upstream QVPR/Patch-NetVLAD code.

The fixture ``tests/fixtures/patchnetvlad_reference.npz`` was made by
``tests/reference/make_patchnetvlad_reference.py`` (see
``tests/reference/README_patchnetvlad.md``): upstream's ``feature_extract()`` with the
model of ``get_model(..., append_pca_layer=True)`` filled by ``seeded_state`` (from
``random_state.seeded_state_dict``), on ``montmartre_close.jpg`` resized to 192 x 256, for
two variants: ``perf`` (``performance.ini``: 16 clusters as the Mapillary models, WPCA to
4096, patch sizes 2, 5, 8) and ``pitts`` (64 clusters as the Pittsburgh models, WPCA to
128, patch sizes 5 and 3 at strides 1 and 2). Here the same seed fills *our* network's state
dict (so key names and shapes must be upstream's), which is saved in the released layout
(``{'num_pcs', 'state_dict'}``, WPCA in float64) and loaded through the conf.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.images import load_tensor, load_uint8, to_float
from pipeline.local_features import build_model
from pipeline.local_features.patchnetvlad import (
    PatchNetVLAD,
    PatchNetVLADNet,
    integral_feature,
    official_layout,
    patch_centres,
    square_regions,
    write_random_checkpoint,
)
from tests.reference.make_patchnetvlad_reference import projection_matrix, seeded_state

from .conftest import SHARED, need_shared

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "patchnetvlad_reference.npz")
PAIRS = SHARED / "fixtures" / "pairs"
# Both sides run the same float32 operations (the same integral image and depth-wise conv;
# the WPCA as a matrix product here, a 1x1 conv upstream): measured differences are ~1e-8
# on the projections (~0.02 spread between patches) and the global descriptor. The
# tolerances leave room for other BLAS builds; the full descriptors are stored as float16,
# whose rounding of values below 1 is at most 2.4e-4.
PROJ_ATOL = 1e-5
GLOBAL_ATOL = 1e-5
F16_ATOL = 2.5e-4

#: VGG-16 conv1_1 .. conv5_3 (torchvision ``vgg16().features``: 14,714,688 parameters)
VGG16_CONV = 14_714_688
#: parameters per (clusters, WPCA dims): VGG16_CONV + NetVLAD (centroids K x 512 + 1x1 conv
#: K x 512, no bias) + WPCA (num_pcs x K*512 conv + num_pcs bias). The Mapillary releases have
#: 16 clusters, the Pittsburgh ones 64 (upstream reads K from ``pool.centroids``).
PARAMS = {
    (16, 4096): 48_289_600,  # mapillary_WPCA4096.pth.tar (performance.ini)
    (16, 512): 18_925_888,  # mapillary_WPCA512.pth.tar (speed.ini)
    (16, 128): 15_779_776,  # mapillary_WPCA128.pth.tar (storage.ini)
    (64, 4096): 149_002_048,  # pitts_WPCA4096.pth.tar
    (64, 512): 31_557_952,
    (64, 128): 18_974_656,
}
#: sizes in bytes of the released files (huggingface.co/TobiasRobotics/Patch-NetVLAD, git-lfs
#: pointers of commit fe70214); they pin down the layout: float32 encoder + NetVLAD, float64
#: WPCA (as add_pca.py builds it), 16 resp. 64 clusters, plus ~5 KB of zip/pickle overhead
RELEASED_BYTES = {
    (16, 4096): 327_398_210,
    (16, 512): 92_488_008,
    (16, 128): 67_319_611,
    (64, 4096): 1_132_901_186,
    (64, 128): 92_681_537,
}


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def image(ref):
    path = need_shared(PAIRS / str(ref["image_name"]))
    u8 = load_uint8(path, resize=[int(x) for x in ref["image_hw"]])
    digest = hashlib.sha256(u8.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()
    if digest != str(ref["image_sha256"]):
        pytest.skip(f"{path} decodes/resizes to other pixels here than when the fixture was made "
                    "(another Pillow/libjpeg build): the comparison would not test the model")
    return to_float(u8)


def _template(num_clusters: int, num_pcs: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes and dtypes only
        return PatchNetVLADNet(num_clusters, num_pcs).state_dict()


def _variant_conf(ref, v: str, weights) -> dict:
    return {
        "name": "patchnetvlad", "weights": str(weights),
        "num_clusters": int(ref[f"{v}_num_clusters"]), "num_pcs": int(ref[f"{v}_num_pcs"]),
        "patch_sizes": ref[f"{v}_patch_sizes"].tolist(), "strides": ref[f"{v}_strides"].tolist(),
        "patch_weights": ref[f"{v}_patch_weights"].tolist(), "resize": ref["image_hw"].tolist(),
    }


@pytest.fixture(scope="module", params=["perf", "pitts"])
def upstream_run(request, ref, image, tmp_path_factory):
    """Our model with the fixture's seeded weights (one variant), and its output."""
    v = request.param
    state = seeded_state(_template(int(ref[f"{v}_num_clusters"]), int(ref[f"{v}_num_pcs"])),
                         int(ref["weight_seed"]), float(ref["gain"]))
    path = tmp_path_factory.mktemp("pnv") / f"seeded_{v}.pth.tar"
    torch.save(official_layout(state), path)
    del state
    model = build_model(_variant_conf(ref, v, path))
    out = model(image)
    del model
    path.unlink()
    return v, {k: t.numpy() for k, t in out.items()}


def test_fixture_is_not_degenerate(ref):
    for v in ref["variants"]:
        assert 0.5 < float(ref[f"{v}_mean_cosine"]) < 0.98
        # the patches' projections spread far more than the tolerance
        assert ref[f"{v}_projection"].std(axis=0).min() > 100 * PROJ_ATOL


def test_matches_upstream(ref, upstream_run):
    v, out = upstream_run
    desc, levels, kp = out["descriptors"].astype(np.float64), out["levels"], out["keypoints"]
    num_pcs = int(ref[f"{v}_num_pcs"])
    assert desc.shape == (int(ref[f"{v}_counts"].sum()), num_pcs)
    np.testing.assert_array_equal(np.bincount(levels), ref[f"{v}_counts"])
    assert (np.diff(levels) >= 0).all()  # patch sizes stacked in order
    # every patch descriptor, through a seeded random projection to 32 dims
    np.testing.assert_allclose(desc @ projection_matrix(num_pcs), ref[f"{v}_projection"], rtol=0, atol=PROJ_ATOL)
    # a few (perf) or all (pitts) full descriptors, stored as float16
    subset = ref[f"{v}_subset"]
    np.testing.assert_allclose(desc[subset], ref[f"{v}_subset_descriptors"].astype(np.float64), rtol=0, atol=F16_ATOL)
    np.testing.assert_allclose(out["global_descriptor"], ref[f"{v}_global_descriptor"], rtol=0, atol=GLOBAL_ATOL)
    # positions: upstream stores the same centres truncated to integers (stride-1 sizes)
    stride1 = np.isin(levels, np.unique(ref[f"{v}_keypoint_levels"]))
    np.testing.assert_array_equal(levels[stride1], ref[f"{v}_keypoint_levels"])
    np.testing.assert_array_equal(kp[stride1] - 0.5, ref[f"{v}_keypoints"])


def test_parameter_counts_and_names():
    import torchvision

    for (k, d), n in PARAMS.items():
        with torch.device("meta"):
            net = PatchNetVLADNet(k, d)
        assert sum(p.numel() for p in net.parameters()) == n, (k, d)
        # file payload: float32 encoder + NetVLAD, float64 WPCA, as the released files
        wpca = sum(p.numel() for p in net.WPCA.parameters())
        if (k, d) in RELEASED_BYTES:
            assert 0 < RELEASED_BYTES[(k, d)] - (4 * (n - wpca) + 8 * wpca) < 8192, (k, d)
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None).features[:-2]  # upstream's get_backend()
    ours = net.encoder.state_dict()
    assert sum(p.numel() for p in vgg.parameters()) == VGG16_CONV
    assert {k: v.shape for k, v in vgg.state_dict().items()} == {k: v.shape for k, v in ours.items()}
    assert sorted(_template(16, 4096)) == sorted(
        [f"encoder.{k}" for k in ours] + ["pool.centroids", "pool.conv.weight", "WPCA.0.weight", "WPCA.0.bias"]
    )


def test_defaults_are_performance_ini():
    c = PatchNetVLAD.default_conf
    assert (c["patch_sizes"], c["strides"], c["patch_weights"]) == ([2, 5, 8], [1, 1, 1], [0.45, 0.15, 0.4])
    assert (c["resize"], c["num_pcs"], c["num_clusters"], c["max_keypoints"]) == ([480, 640], 4096, 16, None)


def test_integral_regions_are_window_means():
    x = torch.randn(1, 6, 9, 11, dtype=torch.float64)
    for p, s in ((1, 1), (2, 1), (3, 2), (5, 1), (9, 3)):
        torch.testing.assert_close(square_regions(integral_feature(x), p, s), F.avg_pool2d(x, p, s))


def test_patch_centres():
    # 480 x 640: a 30 x 40 grid, 29*39 + 26*36 + 23*33 = 2826 patches (the thesis's 2826 x 4096)
    assert sum(len(patch_centres(30, 40, p, 1)) for p in (2, 5, 8)) == 2826
    c = patch_centres(30, 40, 5, 1)
    assert c[0].tolist() == [39.5, 39.5] and c[1].tolist() == [55.5, 39.5] and c[36].tolist() == [39.5, 55.5]
    c = patch_centres(12, 16, 3, 2)  # stride 2: 5 x 7 patches, 32 px apart
    assert len(c) == 35 and c[1].tolist() == [55.5, 23.5] and c[-1].tolist() == [215.5, 151.5]
    assert len(patch_centres(4, 9, 5, 1)) == 0


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A random checkpoint with a small WPCA (16 clusters, 128 dims: ``mapillary_WPCA128``'s shapes)."""
    path = tmp_path_factory.mktemp("pnv_small") / "mapillary_WPCA128.pth.tar"
    write_random_checkpoint(path, seed=3, conf={"num_pcs": 128})
    return path


def _small(path, **kw) -> PatchNetVLAD:
    return build_model({"name": "patchnetvlad", "weights": str(path), "num_pcs": 128, **kw})


def test_random_checkpoint_layout(small_ckpt, tmp_path):
    ckpt = torch.load(small_ckpt, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"num_pcs", "state_dict"} and ckpt["num_pcs"] == 128
    state = ckpt["state_dict"]
    template = _template(16, 128)
    assert list(state) == list(template)
    assert all(v.shape == template[k].shape for k, v in state.items())
    assert all(v.dtype == (torch.float64 if k.startswith("WPCA.") else torch.float32) for k, v in state.items())
    # the same payload as the released files (the zip overhead of this torch version is ~10 KB
    # against ~5.7 KB in the released files)
    payload = sum(v.numel() * v.element_size() for v in state.values())
    assert 0 < os.path.getsize(small_ckpt) - payload < 16384
    # seeded: the same seed writes the same tensors
    again = tmp_path / "again.pth.tar"
    write_random_checkpoint(again, seed=3, conf={"num_pcs": 128})
    state2 = torch.load(again, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], state2[k]) for k in state)
    # loads (WPCA cast to float32)
    model = _small(small_ckpt)
    assert model.net.WPCA[0].weight.dtype == torch.float32
    torch.testing.assert_close(model.net.WPCA[0].weight.double(), state["WPCA.0.weight"], rtol=1e-7, atol=0)


def test_loader_refuses_wrong_files(small_ckpt, tmp_path):
    ckpt = torch.load(small_ckpt, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]

    def save(name, sd):
        p = tmp_path / name
        torch.save({"num_pcs": 128, "state_dict": sd}, p)
        return p

    truncated = save("truncated.pth.tar", {k: v for k, v in state.items() if k != "encoder.28.bias"})
    with pytest.raises(ValueError, match="truncated.pth.tar.*missing keys.*encoder.28.bias"):
        _small(truncated)
    extra = save("vladv2.pth.tar", {**state, "pool.conv.bias": torch.zeros(16)})  # a vladv2 model
    with pytest.raises(ValueError, match="vladv2.pth.tar.*unexpected keys.*pool.conv.bias"):
        _small(extra)
    shape = save("wrong_shape.pth.tar", {**state, "WPCA.0.weight": torch.zeros(128, 4096, 1, 1, dtype=torch.float64)})
    with pytest.raises(ValueError, match="wrong_shape.pth.tar.*shape mismatches.*WPCA.0.weight"):
        _small(shape)
    # a Pittsburgh-like file (64 clusters) into the Mapillary conf: says what to set
    pitts = save("pitts.pth.tar", {**state, "pool.centroids": torch.zeros(64, 512)})
    with pytest.raises(ValueError, match="pitts.pth.tar: pool.centroids .* set num_clusters: 64"):
        _small(pitts)
    with pytest.raises(ValueError, match=r"mapillary_WPCA128.pth.tar: WPCA.0.bias .* set num_pcs: 128"):
        build_model({"name": "patchnetvlad", "weights": str(small_ckpt)})  # default num_pcs 4096
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth.tar"):
        _small(junk)
    with pytest.raises(FileNotFoundError, match="nowhere.pth.tar"):
        _small(tmp_path / "nowhere.pth.tar")
    with pytest.raises(ValueError, match="weights"):
        build_model({"name": "patchnetvlad"})


def test_conf_checks(small_ckpt):
    with pytest.raises(ValueError, match="max_keypoints"):
        _small(small_ckpt, max_keypoints=1024)
    with pytest.raises(ValueError, match="strides"):
        _small(small_ckpt, strides=[1, 1])
    with pytest.raises(ValueError, match="patch_weights"):
        _small(small_ckpt, patch_weights=[1.0])
    with pytest.raises(ValueError, match="patch_sizes"):
        _small(small_ckpt, patch_sizes=[2, 0, 8])
    confs = _small(small_ckpt).scorer_confs()
    assert confs["multiscale_ransac"]["thresholds"] == [24.0, 24.0, 24.0]
    assert confs["multiscale_ransac"]["weights"] == [0.45, 0.15, 0.4]
    assert confs["rapid_spatial"]["cell_size"] == 16.0


def test_real_pair(small_ckpt):
    model = _small(small_ckpt, resize=[192, 256])
    assert model.descriptor_dim == 128
    outs = [model(load_tensor(need_shared(PAIRS / n), resize=[192, 256]))
            for n in ("montmartre_close.jpg", "montmartre_far.jpg")]
    n = 11 * 15 + 8 * 12 + 5 * 9  # a 12 x 16 grid, patch sizes 2, 5, 8
    for out in outs:
        assert set(out) == {"keypoints", "descriptors", "scores", "levels", "global_descriptor"}
        assert out["keypoints"].shape == (n, 2) and out["keypoints"].dtype == torch.float32
        assert out["descriptors"].shape == (n, 128) and out["descriptors"].dtype == torch.float32
        assert out["scores"].shape == (n,) and bool((out["scores"] == 1).all())
        assert out["levels"].dtype == torch.int64 and out["levels"].bincount().tolist() == [165, 96, 45]
        assert out["global_descriptor"].shape == (128,)
        assert torch.isfinite(out["descriptors"]).all()
        torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(n))
        kp = out["keypoints"]
        assert kp.min() >= 0 and kp[:, 0].max() < 256 and kp[:, 1].max() < 192
    # random weights still describe the two images differently
    assert not torch.allclose(outs[0]["descriptors"], outs[1]["descriptors"], atol=1e-3)


def test_small_images(small_ckpt):
    model = _small(small_ckpt)
    out = model(torch.rand(3, 100, 100))  # a 6 x 6 grid: no 8 x 8 patch fits
    assert out["levels"].bincount(minlength=3).tolist() == [25, 4, 0]
    with pytest.raises(ValueError, match="smaller than one"):
        model(torch.rand(3, 12, 100))


@pytest.mark.slow
def test_default_conf_at_upstream_size(tmp_path):
    """The default conf (``mapillary_WPCA4096`` shapes) on a 480 x 640 image: 2826 x 4096."""
    path = tmp_path / "patchnetvlad_seed0.pth.tar"
    write_random_checkpoint(path, seed=0)
    model = build_model({"name": "patchnetvlad", "weights": str(path)})
    out = model(load_tensor(need_shared(PAIRS / "notre_dame.jpg"), resize=[480, 640]))
    assert out["descriptors"].shape == (2826, 4096) and out["global_descriptor"].shape == (4096,)
    assert out["levels"].bincount().tolist() == [1131, 936, 759]
