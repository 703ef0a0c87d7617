"""Random checkpoints in official layouts: written atomically, labelled, found again in results."""

import hashlib
import json

import pytest
import torch

from pipeline.cli import main
from pipeline.matchers import build_matcher
from pipeline.random_weights import parse_name, weights_label, write_random


def test_random_checkpoint_loads_through_the_official_loader_and_is_labelled(tmp_path):
    path = tmp_path / "random_weights" / "superglue_seed3.pth"
    assert main(["random-weights", "--out", str(path)]) == 0
    side = json.loads((tmp_path / "random_weights" / "superglue_seed3.pth.random.json").read_text())
    assert side["model"] == "superglue" and side["seed"] == 3 and side["trained"] is False
    assert build_matcher({"name": "superglue", "weights": str(path)}).layout == "plain state_dict"
    conf = {"method": {"k": 5}, "matcher": {"name": "superglue", "weights": str(path)}, "features": None}
    assert weights_label(conf).startswith("RANDOM untrained weights (superglue seed 3)")
    trained = tmp_path / "trained.pth"
    trained.write_bytes(b"weights")
    # a trained file is named with its sha256, so a results row says exactly which file it came from
    assert weights_label({"matcher": {"weights": str(trained)}}) == "trained.pth sha256:" + hashlib.sha256(
        b"weights").hexdigest()[:12]
    assert weights_label({"matcher": {"weights": str(tmp_path / "gone.pth")}}) == "gone.pth (missing)"
    assert weights_label({"scorer": {"name": "ransac"}}) == "none"
    # the same seed gives the same weights
    a = torch.load(write_random("superglue", tmp_path / "again.pth", seed=3), weights_only=True)
    b = torch.load(path, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="no random checkpoint writer for 'vgg99'"):
        write_random("vgg99", tmp_path / "x.pth")
    with pytest.raises(ValueError, match="named <model>_seed<N>.pth"):
        parse_name(tmp_path / "weights.pth")
    assert parse_name("work/random_weights/cvnet_seed12.pth") == ("cvnet", 12)
