"""Checkpoints are pickles: a crafted one must never run code unless the conf says trust: true.

Every loader that reads a ``.pth`` through :mod:`pipeline.checkpoints` gets a file whose
unpickling would create a marker file. It must be refused with an error naming the file
and the type, and the marker must never appear. With ``trust: true`` in the conf (and
only then) the file is loaded in full, loudly.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import SAFE_GLOBALS, UnsafeCheckpointError, read_state_dict, trusting

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted(tmp_path: Path, name: str = "crafted.pth") -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.ran"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path, marker


# (registry kind, conf); the checkpoint path goes into the conf's weights key
LOADERS = [
    ("global", {"name": "cosplace", "backbone": "ResNet18"}, "checkpoint"),
    ("local", {"name": "superpoint"}, "weights"),
    ("local", {"name": "delg"}, "weights"),
    ("local", {"name": "d2net"}, "weights"),
    ("local", {"name": "r2d2"}, "weights"),
    ("local", {"name": "patchnetvlad"}, "weights"),
    ("local", {"name": "transvpr"}, "weights"),
    ("matcher", {"name": "loftr"}, "weights"),
    ("matcher", {"name": "superglue"}, "weights"),
    ("matcher", {"name": "cvnet"}, "weights"),
    ("matcher", {"name": "rrt"}, "weights"),
]


def build(kind: str, conf: dict):
    if kind == "global":
        from pipeline.global_features import build_model
    elif kind == "local":
        from pipeline.local_features import build_model
    else:
        from pipeline.matchers import build_matcher as build_model
    return build_model(conf)


@pytest.mark.parametrize("kind, conf, key", LOADERS, ids=[c["name"] for _, c, _ in LOADERS])
def test_crafted_checkpoint_is_refused_before_it_runs(tmp_path, kind, conf, key):
    path, marker = crafted(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as err:
        build(kind, {**conf, key: str(path)})
    msg = str(err.value)
    # the file and the types (Path.touch is pickled as getattr(pathlib.Path, 'touch'))
    assert str(path) in msg and "builtins.getattr" in msg and "pathlib.Path" in msg, msg
    assert "trust: true" in msg
    assert not marker.exists()


@pytest.mark.parametrize("kind, conf, key", LOADERS[:1] + LOADERS[7:8], ids=["cosplace", "loftr"])
def test_trust_true_is_the_only_way_past(tmp_path, kind, conf, key, caplog):
    path, marker = crafted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        with pytest.raises(Exception):  # past the pickle, the file is still no model's weights
            build(kind, {**conf, key: str(path), "trust": True})
    assert marker.exists()  # it ran: that is what trusting a file means
    assert "TRUSTED CHECKPOINT" in caplog.text and str(path) in caplog.text
    with pytest.raises(ValueError, match="trust must be true or false"):
        build(kind, {**conf, key: str(path), "trust": "yes"})


def test_trust_does_not_leak_past_the_model_it_was_given_to(tmp_path):
    path, marker = crafted(tmp_path)
    with trusting(True):
        pass
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path, "some checkpoint")
    assert not marker.exists()


def test_official_extras_load_without_trust(tmp_path):
    """What official releases pickle beside tensors: numpy scalars and dtypes (a best
    score), an argparse.Namespace of training arguments, plain numbers, strings, arrays."""
    state = {"conv.weight": torch.randn(2, 3), "conv.bias": torch.zeros(2)}
    path = tmp_path / "official.pth.tar"
    torch.save({"epoch": 30, "state_dict": state, "best_score": np.float64(0.91), "recalls": {1: np.float32(0.8)},
                "args": argparse.Namespace(lr=1e-4, arch="resnet50"), "cfg": "MODEL:\n  DEPTH: 50\n",
                "pca": np.arange(6, dtype=np.float64).reshape(2, 3), "dtype": np.dtype("float32")}, path)
    got, layout = read_state_dict(path, "test checkpoint")
    assert layout == "{'state_dict': ...}" and got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_object_arrays_do_not_smuggle_objects(tmp_path):
    marker = tmp_path / "ran"
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "arr": arr}, tmp_path / "a.pth")
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(tmp_path / "a.pth", "test checkpoint")
    assert not marker.exists()


def test_safe_globals_are_data_only():
    names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    assert not any(re.search(r"system|exec|eval|popen|touch|open|import", str(n), re.I) for n in names), names


def test_no_unsafe_torch_load_in_the_code():
    """Every torch.load call in the package passes weights_only=True, except the one that
    only a model conf's trust: true reaches."""
    import ast

    calls = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((path.relative_to(REPO).as_posix(), safe))
    assert len(calls) >= 8
    assert [c for c in calls if not c[1]] == [("pipeline/checkpoints.py", False)], calls
    src = (REPO / "pipeline" / "checkpoints.py").read_text()
    # the unsafe call sits after the refusal that only trust skips
    assert src.index("if not _TRUST.get():") < src.index("weights_only=False)")
