"""Image sizes per method and the frame of stored positions.

Every extractor and image-input matcher has a documented default size (``resize``,
``resize_max`` or a bound upstream applies itself), so a large photo is never described
at full resolution by accident; the size is part of the feature store's hash and of the
results CSV; keypoints and matched positions are stored in the original image's pixels,
so a RANSAC threshold means the same whatever size a model described the images at.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from pipeline.images import target_size, to_described_frame, to_original_frame
from pipeline.local_features import get_model_class
from pipeline.local_store import FeatureStore, described_keypoints, store_dir
from pipeline.extract_local import extract_local

from .conftest import need_shared

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "fixtures" / "pairs" / "montmartre_close.jpg"


def test_resize_max_shrinks_and_never_enlarges():
    assert target_size(1280, 876, None, 640) == (640, 438)
    assert target_size(300, 200, None, 640) == (300, 200)  # never enlarged
    assert target_size(876, 1280, None, 640) == (438, 640)  # the longer side, portrait too
    assert target_size(1280, 876, 2000, 1024) == (1024, 701)  # after resize
    assert target_size(640, 480, [480, 640], 1024) == (640, 480)
    assert target_size(4000, 3000, [480, 640], 320) == (320, 240)
    for bad in (0, -5, 2.5, "640", True):
        with pytest.raises(ValueError, match="resize_max"):
            target_size(100, 100, None, bad)


def test_frames_round_trip_and_pixel_centres():
    pts = np.array([[0.0, 0.0], [63.0, 47.0], [10.25, 3.5]])
    orig = to_original_frame(pts, (64, 48), (128, 96))
    # pixel centres map to centres: pixel 0 of the half-size image covers pixels 0..1 -> centre 0.5
    np.testing.assert_allclose(orig[0], [0.5, 0.5])
    np.testing.assert_allclose(orig[1], [126.5, 94.5])
    np.testing.assert_allclose(to_described_frame(orig, (64, 48), (128, 96)), pts)
    assert to_original_frame(pts, (64, 48), (64, 48)) is pts  # same size: untouched


def _readme_sizes() -> dict[str, tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Image sizes", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2], cells[3])
    return rows


def _extractors() -> list[str]:
    from pipeline.local_features import MODELS

    return sorted(MODELS)


@pytest.mark.parametrize("name", _extractors())
def test_every_extractor_has_a_documented_default_size(name):
    """No extractor describes a photo at whatever size it comes: a fixed ``resize``, a
    ``resize_max``, or a bound upstream applies itself (``size_bound``); and the README's
    table says which, with the values the code has."""
    cls = get_model_class(name)
    conf = {**cls.base_conf, **cls.default_conf}
    bound = cls.size_bound and conf.get(cls.size_bound)
    assert conf["resize"] is not None or conf["resize_max"] is not None or bound, name
    rows = _readme_sizes()
    assert name in rows, f"README's 'Image sizes' table lacks {name}"
    resize, resize_max, _ = rows[name]
    assert resize == ("none" if conf["resize"] is None else json.dumps(conf["resize"])), (name, resize)
    expected_max = str(conf["resize_max"]) if conf["resize_max"] is not None else (
        f"none ({cls.size_bound}: {conf[cls.size_bound]})" if cls.size_bound else "none")
    assert resize_max == expected_max, (name, resize_max, expected_max)


@pytest.mark.parametrize("name", ["loftr", "cvnet"])
def test_image_input_matchers_have_a_default_size(name):
    from pipeline.matchers import get_matcher_class

    cls = get_matcher_class(name)
    assert cls.inputs == "images" and isinstance(cls.default_conf["resize"], int)
    assert _readme_sizes()[name][0] == str(cls.default_conf["resize"])


def test_size_is_in_the_store_hash(tmp_path):
    base = {"name": "sift", "max_keypoints": 100}
    default = store_dir(tmp_path, base)
    assert store_dir(tmp_path, {**base, "resize_max": 1600}) == default  # the default, spelled out
    assert store_dir(tmp_path, {**base, "resize_max": 640}) != default
    assert store_dir(tmp_path, {**base, "resize": [240, 320]}) != default


def test_keypoints_are_stored_in_original_pixels_on_a_real_photo(tmp_path):
    """A real photo and a known homography of it: described at 480 px, the stored keypoints
    are in the files' pixels, so RANSAC at 24 px finds the homography in those pixels."""
    from pipeline.matchers import build_matcher
    from pipeline.rerank import _host_feats
    from pipeline.scorers.ransac import inlier_mask

    a = cv2.imread(str(need_shared(PHOTO)))
    h_true = np.array([[0.7, 0.05, 40], [-0.03, 0.72, 25], [1e-5, 2e-5, 1]])
    b = cv2.warpPerspective(a, h_true, (1000, 700), flags=cv2.INTER_AREA)
    cv2.imwrite(str(tmp_path / "a.jpg"), a)
    cv2.imwrite(str(tmp_path / "b.jpg"), b)
    conf = {"name": "sift", "max_keypoints": 2048, "resize_max": 480}
    info = extract_local(conf, tmp_path, ["a.jpg", "b.jpg"], tmp_path / "local", device="cpu")
    assert info["resize_max"] == 480 and info["keypoint_frame"] == "original"
    (tmp_path / "feat.json").write_text(json.dumps(info))
    store = FeatureStore(tmp_path / "feat.json")
    fa, fb = store.get("a.jpg"), store.get("b.jpg")
    assert tuple(fa["image_size"]) == (480, 328) and tuple(fa["original_size"]) == (1280, 876)
    assert tuple(fb["image_size"]) == (480, 336) and tuple(fb["original_size"]) == (1000, 700)
    assert fa["keypoints"].max(0)[0] > 1000  # original pixels, not the 480 px the model saw
    assert described_keypoints(fa).max(0)[0] < 480

    m = build_matcher({"name": "mnn", "ratio": 0.9})(_host_feats(fa), _host_feats(fb))["matches"].numpy()
    p0, p1 = fa["keypoints"][m[:, 0]].astype(np.float64), fb["keypoints"][m[:, 1]].astype(np.float64)
    inl = inlier_mask(p0, p1, "ransac", 24.0, 2000, 0.995, 0)
    assert inl.sum() > 300, inl.sum()
    fit, _ = cv2.findHomography(p0[inl], p1[inl], 0)
    corners = np.array([[0, 0], [1279, 0], [1279, 875], [0, 875]], np.float64)[:, None]
    err = np.linalg.norm(cv2.perspectiveTransform(corners, fit) - cv2.perspectiveTransform(corners, h_true), axis=2)
    assert err.max() < 4, err  # the true homography, in the files' pixels
    res = np.linalg.norm(cv2.perspectiveTransform(p0[inl][:, None], h_true)[:, 0] - p1[inl], axis=1)
    assert np.median(res) < 0.6, np.median(res)  # pixel centres map to centres (no half-pixel bias)
    store.close()


def test_stores_written_before_the_frame_change_are_read_in_original_pixels(tmp_path, tiny_dataset):
    conf = {"name": "sift", "max_keypoints": 200, "resize": [48, 64]}
    names = sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.jpg"))[:2]
    info = extract_local(conf, tiny_dataset, names, tmp_path / "local", device="cpu")
    (tmp_path / "new.json").write_text(json.dumps(info))
    new = FeatureStore(tmp_path / "new.json").get(names[0])
    # the same parts as an old store wrote them: described pixels, no frame in the index
    part = Path(info["folder"]) / info["images"][names[0]]
    with h5py.File(part, "r+") as f:
        g = f[names[0]]
        g["keypoints"][...] = described_keypoints({k: g[k][()] for k in g})
    old_info = {k: v for k, v in info.items() if k != "keypoint_frame"}
    (tmp_path / "old.json").write_text(json.dumps(old_info))
    old = FeatureStore(tmp_path / "old.json").get(names[0])
    assert tuple(old["image_size"]) == (64, 48) and tuple(old["original_size"]) == (128, 96)
    np.testing.assert_allclose(old["keypoints"], new["keypoints"], atol=1e-3)


def test_scorer_frame(tmp_path):
    from pipeline.scorers import build_scorer

    with pytest.raises(ValueError, match="frame must be one of"):
        build_scorer({"name": "ransac", "frame": "described"})
    assert build_scorer({"name": "ransac"}).conf["frame"] == "original"


def test_model_frame_scores_as_on_the_model_input(tmp_path, tiny_dataset):
    """A scorer with ``frame: model`` sees the keypoints the model gave (its 24 px are the
    model input's pixels, as Patch-NetVLAD and TransVPR set them); ``original`` sees the
    files' pixels: at half size, a threshold of 2 px in the model frame is 4 px there."""
    from pipeline import rerank as rr
    from pipeline.datasets.index import index_dataset
    from pipeline.io import write_json
    from pipeline.topk import read_topk, write_topk

    from .test_rerank import small_topk

    index_dataset(tiny_dataset, tmp_path / "index")
    write_topk(tmp_path / "topk.h5", small_topk(tmp_path / "index"))
    names = rr.needed_images([(tmp_path / "topk.h5", 4)])
    write_json(tmp_path / "feat.json", extract_local({"name": "sift", "max_keypoints": 300, "resize": [48, 64]},
                                                     tiny_dataset, names, tmp_path / "local", device="cpu"))
    rr.match_topk(tmp_path / "feat.json", {"name": "mnn"}, tmp_path / "topk.h5", 4, tmp_path / "m.h5", device="cpu")
    out = {}
    for frame, thr in (("model", 2.0), ("original", 4.0), ("original", 2.0)):
        conf = {"name": "ransac", "threshold": thr, "max_iters": 500, "frame": frame}
        rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", conf, tmp_path / "topk.h5", 4,
                      tmp_path / f"{frame}{thr}.h5")
        with h5py.File(tmp_path / f"{frame}{thr}.h5") as f:
            out[frame, thr] = f["rerank_scores"][:]
    t = read_topk(tmp_path / "topk.h5")
    assert len(t) == 4 and out["model", 2.0].max() > 0
    # the files' pixels are the model's x 2 (+ 0.5): the same RANSAC (same seeded samples) with a
    # threshold twice as large keeps the same inliers; the same threshold does not
    np.testing.assert_array_equal(out["model", 2.0], out["original", 4.0])
    assert (out["original", 2.0] != out["model", 2.0]).any()


def test_image_input_matcher_positions_are_stored_in_original_pixels(tmp_path, tiny_dataset):
    """LoFTR sees the 128 x 96 images at 96 px: the stored points are its points mapped back
    to the files' pixels, and a scorer with ``frame: model`` is refused for them."""
    from pipeline import rerank as rr
    from pipeline.datasets.index import index_dataset
    from pipeline.images import load_uint8, to_float
    from pipeline.matchers import build_matcher
    from pipeline.random_weights import write_random
    from pipeline.topk import write_topk

    from .test_rerank import small_topk

    index_dataset(tiny_dataset, tmp_path / "index")
    write_topk(tmp_path / "topk.h5", small_topk(tmp_path / "index", k=2))
    weights = write_random("loftr", tmp_path / "loftr_seed0.pth")
    conf = {"name": "loftr", "weights": str(weights), "resize": 96, "match_threshold": 0.0}
    rr.match_topk(None, conf, tmp_path / "topk.h5", 2, tmp_path / "m.h5", device="cpu", root=tiny_dataset)
    view = rr.Matches(tmp_path / "m.h5")
    assert view.kind == "points" and view.info["points_frame"] == "original"
    t = small_topk(tmp_path / "index", k=2)
    counts = {(qi, r): len(view.pair(qi, r)) for qi in range(len(t)) for r in range(2)}
    qi, r = max(counts, key=counts.get)  # random weights: few confident matches
    qname, cname = t.query_names[qi], t.candidate_names[qi][r]
    stored = view.pair(qi, r)
    matcher = build_matcher(conf).eval()
    q, c = (matcher.prepare(to_float(load_uint8(tiny_dataset / n, 96))) for n in (qname, cname))
    direct = {k: v.numpy() for k, v in matcher(q, c).items()}
    assert len(stored) == len(direct["keypoints0"]) > 0
    s = 128 / 96
    np.testing.assert_allclose(stored[:, :2], (direct["keypoints0"] + 0.5) * s - 0.5, atol=1e-3)
    np.testing.assert_allclose(stored[:, 2:], (direct["keypoints1"] + 0.5) * s - 0.5, atol=1e-3)
    assert stored[:, 0].max() > 96  # the files' pixels (128 wide), not LoFTR's 96
    with pytest.raises(ValueError, match="frame 'model' needs index matches"):
        rr.score_topk(None, tmp_path / "m.h5", {"name": "ransac", "frame": "model"}, tmp_path / "topk.h5", 2,
                      tmp_path / "rr.h5")


def test_learned_matchers_see_the_frame_the_model_described(tmp_path):
    """LightGlue normalises positions by ``image_size``: from a store of photos described at
    480 px (keypoints kept in the files' pixels), the match stage must hand it the model's
    own positions, so it matches as on the extractor's output directly (the naive way)."""
    import torch

    from pipeline.images import load_tensor
    from pipeline.local_features import build_model
    from pipeline.matchers import build_matcher
    from pipeline.rerank import _host_feats

    from .conftest import WEIGHTS

    pairs = PHOTO.parent
    names = ["montmartre_close.jpg", "montmartre_far.jpg"]
    ext = {"name": "aliked", "weights": str(need_shared(WEIGHTS / "aliked-n16.pth")), "max_keypoints": 512,
           "resize_max": 480}
    matcher = build_matcher({"name": "lightglue", "features": "aliked",
                             "weights": str(need_shared(WEIGHTS / "aliked_lightglue.pth"))}).eval()
    info = extract_local({**ext, "store": {"descriptors": "float32"}}, need_shared(pairs), names, tmp_path / "local",
                         device="cpu")
    (tmp_path / "feat.json").write_text(json.dumps(info))
    store = FeatureStore(tmp_path / "feat.json")
    stored = [_host_feats(store.get(n)) for n in names]
    model = build_model(ext).eval()
    direct = []
    for n in names:
        img = load_tensor(pairs / n, None, 480)
        f = model(img)
        f["image_size"] = torch.tensor([img.shape[2], img.shape[1]])
        direct.append(f)
    for s, d in zip(stored, direct):
        assert s["keypoints"].max() <= 480 and tuple(s["image_size"].tolist()) == tuple(d["image_size"].tolist())
        torch.testing.assert_close(s["keypoints"], d["keypoints"], rtol=0, atol=1e-3)
    a, b = matcher(*stored), matcher(*direct)
    assert len(a["matches"]) > 30
    assert torch.equal(a["matches"], b["matches"])
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4)
    store.close()
