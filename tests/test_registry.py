"""The registries are the one list of models: adding an extractor, a matcher or a scorer is
one module plus one registry line, and the config check and every stage then take it.

The toys live in a module written to a temporary folder (not in the package), as a
user's plugin would; nothing else is edited to make them run.
"""

import copy
import textwrap

import h5py
import numpy as np
import pytest
import yaml

import pipeline.rerank as rr
from pipeline import global_features, local_features, matchers, scorers
from pipeline.config import ConfigError, check_config, validate_schema
from pipeline.datasets.index import index_dataset
from pipeline.extract_local import extract_local
from pipeline.io import write_json
from pipeline.local_store import FeatureStore
from pipeline.topk import read_topk, write_topk

from .conftest import REPO
from .test_rerank import small_topk

TOYS = textwrap.dedent('''
    import numpy as np
    import torch

    from pipeline.local_features.base import LocalModel
    from pipeline.matchers.base import Matcher
    from pipeline.scorers.base import Scorer


    class GridPatches(LocalModel):
        """Keypoints on a grid; descriptors: the mean-free grey 8 x 8 patch around each."""
        default_conf = {"step": 16}

        @property
        def descriptor_dim(self):
            return 64

        def _forward(self, image):
            grey, s = image.mean(0), self.conf["step"]
            h, w = grey.shape
            pts = [(x, y) for y in range(s, h - s, s) for x in range(s, w - s, s)]
            kp = torch.tensor(pts, dtype=torch.float32).reshape(-1, 2)
            d = torch.stack([grey[y - 4:y + 4, x - 4:x + 4].flatten() for x, y in pts]) if pts else torch.zeros(0, 64)
            return {"keypoints": kp, "descriptors": d - d.mean(1, keepdim=True), "scores": torch.ones(len(pts))}


    class SameIndex(Matcher):
        """Keypoint i with keypoint i."""
        def _forward(self, f0, f1):
            i = torch.arange(min(len(f0["keypoints"]), len(f1["keypoints"])))
            return {"matches": torch.stack([i, i], 1), "scores": torch.ones(len(i))}


    class ScaledCount(Scorer):
        default_conf = {"factor": 0.5}

        def score_pair(self, kq, kc, matches, q, c):
            return np.array([self.conf["factor"] * len(matches)])


    class NotAModel:
        pass
''')


@pytest.fixture
def toys(tmp_path, monkeypatch):
    (tmp_path / "vg_toys.py").write_text(TOYS)
    monkeypatch.syspath_prepend(str(tmp_path))
    added = [(local_features.REGISTRY, "toy_grid", "GridPatches"), (matchers.REGISTRY, "toy_same", "SameIndex"),
             (scorers.REGISTRY, "toy_count", "ScaledCount")]
    for registry, name, cls in added:  # the one line per model
        registry.register(name, "vg_toys", cls)
    yield
    for registry, name, _ in added:
        registry.models.pop(name)


def test_toys_pass_the_config_check_and_run_through_every_stage(toys, tiny_dataset, tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["local_features"]["grid"] = {"name": "toy_grid", "step": 12}
    config["matchers"]["same"] = {"name": "toy_same"}
    config["scorers"]["count"] = {"name": "toy_count", "factor": 2.0}
    config["rerank_methods"]["toy"] = {"retrieval": "vlad_sift", "features": "grid", "matcher": "same",
                                       "scorer": "count", "k": 4}
    check_config(validate_schema(copy.deepcopy(config)))
    bad = copy.deepcopy(config)
    bad["scorers"]["count"]["factr"] = 1.0
    with pytest.raises(ConfigError, match=r"scorers.count: unknown option 'factr'; valid options are .*'factor'"):
        check_config(validate_schema(bad))

    index_dataset(tiny_dataset, tmp_path / "index")
    write_topk(tmp_path / "topk.h5", small_topk(tmp_path / "index"))
    names = rr.needed_images([(tmp_path / "topk.h5", 4)])
    info = extract_local({"name": "toy_grid", "step": 12}, tiny_dataset, names, tmp_path / "local", device="cpu")
    write_json(tmp_path / "feat.json", info)
    first = FeatureStore(tmp_path / "feat.json").get(names[0])
    assert first["descriptors"].shape[1] == 64 and len(first["keypoints"]) > 10
    rr.match_topk(tmp_path / "feat.json", {"name": "toy_same"}, tmp_path / "topk.h5", 4, tmp_path / "m.h5", device="cpu")
    rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", {"name": "toy_count", "factor": 2.0},
                  tmp_path / "topk.h5", 4, tmp_path / "rr.h5")
    # every image of the tiny set has the same size, so the same grid: score = 2 x the keypoint count
    with h5py.File(tmp_path / "rr.h5", "r") as f:
        np.testing.assert_array_equal(f["rerank_scores"][:], 2.0 * len(first["keypoints"]))
    # equal scores: the retrieval order stays
    np.testing.assert_array_equal(read_topk(tmp_path / "rr.h5").candidate_names, read_topk(tmp_path / "topk.h5").candidate_names)


def test_unknown_names_list_the_registered_ones():
    for registry in (global_features.REGISTRY, local_features.REGISTRY, matchers.REGISTRY, scorers.REGISTRY):
        with pytest.raises(ValueError, match=r"unknown .*'no_such'; known: \['"):
            registry.get("no_such")


def test_a_broken_registry_line_is_an_error_not_a_skip(toys):
    local_features.REGISTRY.register("toy_missing_module", "vg_no_such_module", "GridPatches")
    local_features.REGISTRY.register("toy_missing_class", "vg_toys", "NoSuchClass")
    local_features.REGISTRY.register("toy_wrong_base", "vg_toys", "NotAModel")
    try:
        with pytest.raises(ImportError, match="toy_missing_module.*vg_no_such_module.GridPatches"):
            local_features.REGISTRY.get("toy_missing_module")
        with pytest.raises(ImportError, match="NoSuchClass"):
            local_features.REGISTRY.get("toy_missing_class")
        with pytest.raises(TypeError, match="vg_toys.NotAModel is not a LocalModel"):
            local_features.REGISTRY.get("toy_wrong_base")
        with pytest.raises(ValueError, match="already registered"):
            local_features.REGISTRY.register("toy_grid", "vg_toys", "SameIndex")
    finally:
        for name in ("toy_missing_module", "toy_missing_class", "toy_wrong_base"):
            local_features.REGISTRY.models.pop(name)


def test_every_registered_model_imports_and_has_the_right_base():
    """A renamed class or module in a registry line fails here, for every model."""
    for registry in (global_features.REGISTRY, local_features.REGISTRY, matchers.REGISTRY, scorers.REGISTRY):
        for name in registry.names():
            cls = registry.get(name)
            assert issubclass(cls, registry.base), name
