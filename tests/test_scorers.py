"""Scorers: RANSAC inliers (seeded), multi-scale combination, Rapid Spatial Scoring."""

import numpy as np
import pytest

from pipeline.scorers import build_scorer
from pipeline.scorers.ransac import zscore_weighted


def homography_pairs(n_in=40, n_out=15, seed=0):
    rng = np.random.default_rng(seed)
    kq = rng.random((n_in + n_out, 2)) * [640, 480]
    H = np.array([[1.05, 0.04, 12.0], [-0.03, 0.97, -8.0], [1e-5, 2e-5, 1.0]])
    p = np.c_[kq, np.ones(len(kq))] @ H.T
    kc = p[:, :2] / p[:, 2:]
    kc[n_in:] = rng.random((n_out, 2)) * [640, 480]  # outliers: random positions
    return kq, kc, np.c_[np.arange(len(kq)), np.arange(len(kq))]


def test_ransac_counts_the_homography_inliers():
    kq, kc, m = homography_pairs()
    s = build_scorer({"name": "ransac", "threshold": 4.0})
    score = s.score_pair(kq, kc, m, {}, {})[0]
    assert 40 <= score <= 42  # the 40 inliers, maybe an outlier that falls within 4 px by chance
    magsac = build_scorer({"name": "ransac", "method": "magsac", "threshold": 4.0}).score_pair(kq, kc, m, {}, {})[0]
    assert 38 <= magsac <= 42


def test_ransac_is_seeded():
    kq, kc, m = homography_pairs(n_in=12, n_out=40, seed=3)
    s = build_scorer({"name": "ransac", "threshold": 24.0, "max_iters": 50})
    runs = {float(s.score_pair(kq, kc, m, {}, {})[0]) for _ in range(5)}
    assert len(runs) == 1


def test_ransac_needs_four_matches():
    kq, kc, m = homography_pairs()
    assert build_scorer({"name": "ransac"}).score_pair(kq, kc, m[:3], {}, {})[0] == 0
    with pytest.raises(ValueError, match="unknown method"):
        build_scorer({"name": "ransac", "method": "prosac2"})


def test_match_count():
    kq, kc, m = homography_pairs()
    assert build_scorer({"name": "match_count"}).score_pair(kq, kc, m, {}, {})[0] == len(m)


def test_zscore_weighted_by_hand():
    raw = np.array([[1.0, 10.0], [3.0, 10.0], [2.0, 40.0]])
    z0 = (raw[:, 0] - 2.0) / np.std(raw[:, 0])
    z1 = (raw[:, 1] - 20.0) / np.std(raw[:, 1])
    np.testing.assert_allclose(zscore_weighted(raw, [0.45, 0.15]), 0.45 * z0 + 0.15 * z1)
    with pytest.raises(ValueError, match="2 levels but 1 weights"):
        zscore_weighted(raw, [1.0])


def test_multiscale_ransac_per_level():
    kq, kc, m = homography_pairs(n_in=40, n_out=0)
    levels = np.r_[np.zeros(20, np.int16), np.ones(20, np.int16)]
    feats = {"levels": levels}
    s = build_scorer({"name": "multiscale_ransac", "weights": [0.5, 0.5], "thresholds": [4.0, 4.0]})
    raw = s.score_pair(kq, kc, m, feats, feats)
    np.testing.assert_allclose(raw, [1.0, 1.0])  # all 20 of each level are inliers, / 20 query features
    # cross-level matches are ignored
    cross = np.c_[np.arange(20), np.arange(20, 40)]
    np.testing.assert_allclose(s.score_pair(kq, kc, cross, feats, feats), [0.0, 0.0])


def test_rapid_spatial_scoring_prefers_a_consistent_shift():
    rng = np.random.default_rng(0)
    kq = rng.integers(0, 20, (60, 2)).astype(float) * 16
    m = np.c_[np.arange(60), np.arange(60)]
    shifted = kq + [32.0, 16.0]  # all matches agree on one displacement
    scrambled = rng.permutation(kq)
    s = build_scorer({"name": "rapid_spatial", "cell_size": 16})
    good = s.score_pair(kq, shifted, m, {}, {})[0]
    bad = s.score_pair(kq, scrambled, m, {}, {})[0]
    # a perfect shift scores the maximum: (x_max^2 + y_max^2) per match
    x_max, y_max = (kq / 16).max(0)
    assert good == pytest.approx(x_max**2 + y_max**2)
    assert bad < 0.8 * good
    assert s.finalize(np.array([[good], [bad]]))[0] > 0


def test_affine_ransac_separates_an_affine_map_from_a_homography():
    rng = np.random.default_rng(5)
    kq = rng.random((60, 2)) * [640, 480]
    A = np.array([[0.9, 0.1, 20.0], [-0.05, 1.1, -10.0]])
    kc = np.c_[kq, np.ones(60)] @ A.T
    kc[45:] = rng.random((15, 2)) * [640, 480]
    m = np.c_[np.arange(60), np.arange(60)]
    affine = build_scorer({"name": "ransac", "model": "affine", "threshold": 3.0})
    assert 45 <= affine.score_pair(kq, kc, m, {}, {})[0] <= 47
    assert affine.score_pair(kq, kc, m[:2], {}, {})[0] == 0  # an affine map needs 3 matches
    # a strongly projective map: the affine model explains only part of it
    kq2, kc2, m2 = homography_pairs(n_in=60, n_out=0)
    H = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [8e-4, 6e-4, 1.0]])
    p = np.c_[kq2, np.ones(60)] @ H.T
    kc2 = p[:, :2] / p[:, 2:]
    assert affine.score_pair(kq2, kc2, m2, {}, {})[0] < build_scorer(
        {"name": "ransac", "threshold": 3.0}).score_pair(kq2, kc2, m2, {}, {})[0]
    with pytest.raises(ValueError, match="unknown model"):
        build_scorer({"name": "ransac", "model": "fundamental"})


def test_pair_score_combines_the_model_score_with_the_global_similarity():
    s = build_scorer({"name": "pair_score", "model_weight": 0.5, "global_weight": 1.0})
    assert s.needs == "pair_score"
    raw = np.array([[2.0], [0.0], [-np.inf]])
    sim = np.array([0.1, 0.9, 1.0])
    np.testing.assert_allclose(s.score_query(raw, sim)[:2], [1.1, 0.9])
    assert s.score_query(raw, sim)[2] < -1e8  # an unscored pair ranks last
    with pytest.raises(ValueError, match="index 1"):
        build_scorer({"name": "pair_score", "index": 1}).score_query(raw, sim)


def test_rapid_spatial_uses_the_grid_extent_not_the_keypoint_offset():
    # Patch-NetVLAD keypoints: patch centres 16 j + (16 p - 1) / 2 on a 4 x 3 grid (p = 5)
    j, i = np.meshgrid(np.arange(4), np.arange(3))
    kq = np.c_[j.ravel(), i.ravel()] * 16.0 + (16 * 5 - 1) / 2
    kc = kq + 16.0  # the candidate: the same patches one cell to the right and down
    m = np.c_[np.arange(12), np.arange(12)]
    s = build_scorer({"name": "rapid_spatial", "cell_size": 16}).score_pair(kq, kc, m, {}, {})[0]
    # all displacements equal their mean: each match scores x_max^2 + y_max^2 = 3^2 + 2^2 (upstream: Wout-1, Hout-1)
    assert s == pytest.approx(13.0)
    with pytest.raises(ValueError, match="2 cell sizes but 1 weights"):
        build_scorer({"name": "rapid_spatial", "cell_size": [16, 32]}).score_pair(kq, kc, m, {}, {})


def test_ransac_direction_candidate_to_query():
    kq, kc, m = homography_pairs(n_in=30, n_out=10, seed=2)
    fwd = build_scorer({"name": "ransac", "threshold": 4.0})
    back = build_scorer({"name": "ransac", "threshold": 4.0, "direction": "candidate_to_query"})
    # the same inliers either way on a clean homography, counted in the other image
    assert 30 <= back.score_pair(kq, kc, m, {}, {})[0] <= 32 and 30 <= fwd.score_pair(kq, kc, m, {}, {})[0] <= 32
    with pytest.raises(ValueError, match="direction"):
        build_scorer({"name": "ransac", "direction": "sideways"})
