"""Nearest-neighbour matching variants: mutual, one-directional (DELG), per level (Patch-NetVLAD)."""

import torch

from pipeline.matchers import build_matcher


def feats(desc, levels=None):
    d = torch.nn.functional.normalize(torch.as_tensor(desc, dtype=torch.float32), dim=1)
    f = {"keypoints": torch.zeros(len(d), 2), "descriptors": d, "scores": torch.ones(len(d)),
         "image_size": torch.tensor([64, 48])}
    if levels is not None:
        f["levels"] = torch.as_tensor(levels)
    return f


def test_mutual_and_one_directional_nearest_neighbours():
    # two features of image 0 share their nearest neighbour in image 1: mutual keeps one
    f0 = feats([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    f1 = feats([[1.0, 0.02, 0.0], [0.0, 0.1, 1.0]])
    mutual = build_matcher({"name": "mnn"})(f0, f1)["matches"].tolist()
    assert mutual == [[0, 0], [2, 1]]
    one_way = build_matcher({"name": "mnn", "mutual": False})(f0, f1)["matches"].tolist()
    assert one_way == [[0, 0], [1, 0], [2, 1]]
    bounded = build_matcher({"name": "mnn", "mutual": False, "max_distance": 0.05})(f0, f1)["matches"].tolist()
    assert bounded == [[0, 0]]


def test_matching_by_level_never_crosses_levels():
    rng = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=rng)
    # image 1 holds the same descriptors, but with the levels of the first three swapped
    f0 = feats(base, levels=[0, 0, 0, 1, 1, 1])
    f1 = feats(base, levels=[1, 1, 1, 1, 1, 1])
    joint = build_matcher({"name": "mnn"})(f0, f1)["matches"].tolist()
    assert sorted(joint) == [[i, i] for i in range(6)]
    by_level = build_matcher({"name": "mnn", "by_level": True})(f0, f1)["matches"].tolist()
    assert sorted(by_level) == [[3, 3], [4, 4], [5, 5]]
    f1["levels"] = torch.tensor([0, 0, 0, 1, 1, 1])
    assert sorted(build_matcher({"name": "mnn", "by_level": True})(f0, f1)["matches"].tolist()) == [[i, i] for i in range(6)]


def test_dot_similarity_on_raw_vectors():
    # by L2 the short vector [0.5, 0] is nearest to [0.4, 0.1]; by dot product the long one wins
    f0 = {"keypoints": torch.zeros(1, 2), "descriptors": torch.tensor([[1.0, 0.0]]), "scores": torch.ones(1)}
    f1 = {"keypoints": torch.zeros(2, 2), "descriptors": torch.tensor([[0.5, 0.0], [3.0, 1.0]]), "scores": torch.ones(2)}
    assert build_matcher({"name": "mnn", "mutual": False})(f0, f1)["matches"].tolist() == [[0, 0]]
    assert build_matcher({"name": "mnn", "mutual": False, "similarity": "dot"})(f0, f1)["matches"].tolist() == [[0, 1]]
    import pytest

    with pytest.raises(ValueError, match="L2 tests"):
        build_matcher({"name": "mnn", "similarity": "dot", "ratio": 0.9})
