"""Every thesis re-ranking method end to end through Snakemake, on random checkpoints.

No trained weights for these models exist here; the workflow writes seeded random
checkpoints in each model's official file layout (rule random_weights), loads them
through the same loaders a released file goes through, and labels every result made
with them. This checks the plumbing of each method (extraction or image loading,
matching / pair scoring, scoring, results), not its recalls.
"""

import json

import h5py
import pandas as pd
import pytest
import yaml

from .conftest import make_dataset
from .test_workflow import METHOD, job_counts, snakemake

RW = "work/random_weights"
LOCAL = {
    "d2net": {"name": "d2net", "weights": f"{RW}/d2net_seed0.pth"},
    "delg": {"name": "delg_tf", "weights": f"{RW}/delg_tf_seed0"},  # a SavedModel variables folder
    "delg_pt": {"name": "delg", "weights": f"{RW}/delg_seed0.pth"},
    "transvpr": {"name": "transvpr", "weights": f"{RW}/transvpr_seed0.pth", "resize": [96, 128]},
    "patchnetvlad": {"name": "patchnetvlad", "weights": f"{RW}/patchnetvlad_seed0.pth", "resize": [128, 160]},
}
MATCHERS = {
    "mnn": {"name": "mnn"},
    "mnn_dot": {"name": "mnn", "similarity": "dot"},
    "mnn_by_level": {"name": "mnn", "by_level": True},
    "delg_nn": {"name": "mnn", "mutual": False, "max_distance": 1.0},
    "rrt": {"name": "rrt", "weights": f"{RW}/rrt_seed0.pth"},
    "rrt512": {"name": "rrt", "weights": f"{RW}/rrt-delg512_seed0.pth", "num_global_features": 512,
               "num_local_features": 512},
    # random LoFTR weights give confidences far below the trained model's 0.2 threshold
    "loftr": {"name": "loftr", "weights": f"{RW}/loftr_seed0.pth", "resize": 128, "match_threshold": 0.0},
    "cvnet": {"name": "cvnet", "weights": f"{RW}/cvnet_seed0.pth", "resize": 128, "batch_size": 3},
}
SCORERS = {
    "ransac": {"name": "ransac", "threshold": 24, "max_iters": 2000, "seed": 0},
    "ransac_affine": {"name": "ransac", "model": "affine", "threshold": 20, "max_iters": 1000, "seed": 0,
                      "min_matches": 4},
    "rrt_score": {"name": "pair_score"},
    "pnv_ransac": {"name": "multiscale_ransac", "threshold": 24, "thresholds": [24, 24, 24], "min_matches": 4,
                   "weights": [0.45, 0.15, 0.4], "direction": "candidate_to_query", "seed": 0, "frame": "model"},
    "pnv_rss": {"name": "rapid_spatial", "cell_size": 16, "weights": [0.45, 0.15, 0.4], "frame": "model"},
    "transvpr_ransac": {"name": "ransac", "threshold": 24, "max_iters": 2000, "seed": 0, "frame": "model"},
    "cvnet_score": {"name": "pair_score", "model_weight": 0.5, "global_weight": 1.0},
}
METHODS = {
    "d2net_ransac": {"features": "d2net", "matcher": "mnn", "scorer": "ransac"},
    "delg_ransac": {"features": "delg", "matcher": "delg_nn", "scorer": "ransac_affine"},
    "delg_rrt": {"features": "delg", "matcher": "rrt", "scorer": "rrt_score"},
    "delg_pt_rrt": {"features": "delg_pt", "matcher": "rrt512", "scorer": "rrt_score"},
    "transvpr_ransac": {"features": "transvpr", "matcher": "mnn_dot", "scorer": "transvpr_ransac"},
    "patchnetvlad_ransac": {"features": "patchnetvlad", "matcher": "mnn_by_level", "scorer": "pnv_ransac"},
    "patchnetvlad_rapid": {"features": "patchnetvlad", "matcher": "mnn_by_level", "scorer": "pnv_rss"},
    "loftr": {"features": None, "matcher": "loftr", "scorer": "ransac"},
    "cvnet": {"features": None, "matcher": "cvnet", "scorer": "cvnet_score"},
}
K = 3


def tiny_project(wd, local, matchers, scorers, methods, k):
    """A project folder with the tiny dataset, VLAD-SIFT retrieval (top-5) and these re-ranking
    entries (each method re-ranking the top ``k`` on the CPU)."""
    make_dataset(wd / "data" / "tiny", n_db=12, n_q=4)
    config = {
        "datasets": {"tiny": {"root": "data/tiny"}},
        "global_methods": {"vlad_sift": METHOD},
        "retrieval": {"k": 5},
        "evaluation": {"recall_at": [1, 3, 5]},
        "local_features": local, "matchers": matchers, "scorers": scorers,
        "rerank_methods": {m: {"retrieval": "vlad_sift", "k": k, "device": "cpu", **c} for m, c in methods.items()},
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    return wd


# a modern stage-1 descriptor in the same run (the others: tests/test_workflow_global_models.py, slow):
# MixVPR's random checkpoint named as its release (.ckpt), at its own 320x320, 4096-d
GLOBAL = {"mixvpr": {"model": {"name": "mixvpr", "checkpoint": "work/random_weights/mixvpr_seed0.ckpt"},
                     "extraction": {"batch_size": 4, "device": "cpu", "num_workers": 0}}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    wd = tiny_project(tmp_path_factory.mktemp("wf_methods"), LOCAL, MATCHERS, SCORERS, METHODS, K)
    config = yaml.safe_load((wd / "config.yaml").read_text())
    config["global_methods"].update(GLOBAL)
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    code, out = snakemake(wd, *[f"results/tiny/{m}.csv" for m in [*METHODS, *GLOBAL]])
    assert code == 0, out
    return wd, out


def test_modern_descriptor_target_runs_and_is_labelled_random(project):
    """`snakemake results/<dataset>/mixvpr.csv` (like results/demo/megaloc.csv) on a random checkpoint."""
    wd, _ = project
    row = pd.read_csv(wd / "results" / "tiny" / "mixvpr.csv").iloc[0]
    assert row.n_queries_evaluated == 4 and str(row.weights).startswith("RANDOM"), row
    info = json.loads((wd / "work" / "tiny" / "global" / "mixvpr" / "faiss.index.json").read_text())
    assert info["dim"] == 4096 and info["n"] == 12


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_and_is_labelled_random(project, method):
    wd, _ = project
    df = pd.read_csv(wd / "results" / "tiny" / f"{method}.csv")
    base, rr = df.iloc[0], df.iloc[1]
    assert (base.method, rr.method) == ("vlad_sift", method)
    assert rr.weights.startswith("RANDOM untrained weights"), rr.weights
    assert rr.rerank_k == K and rr.rerank_s_per_query > 0
    for n in (1, 3, 5):
        assert 0 <= rr[f"R@{n}"] <= 100
    assert rr["R@5"] == base["R@5"] and rr["R@3"] == base["R@3"]  # re-ranking the top 3 keeps the top-3 set
    c = METHODS[method]
    matches = wd / "work" / "tiny" / "matches" / "vlad_sift" / f"{c['features'] or 'images'}+{c['matcher']}.h5"
    info = json.loads(h5py.File(matches, "r").attrs["info"])
    assert info["kind"] in ("matches", "points", "pair_score") and info["k"] == K
    if info["kind"] != "pair_score":  # the geometric scorers had correspondences to work on
        assert info["mean_matches"] > 0, info


def test_random_methods_stay_out_of_the_default_target_and_reruns_are_noops(project):
    wd, _ = project
    code, out = snakemake(wd, "-n", *[f"results/tiny/{m}.csv" for m in [*METHODS, *GLOBAL]])
    assert code == 0 and "Nothing to be done" in out, out
    code, out = snakemake(wd, "-n")  # rule all: retrieval results only
    assert code == 0, out
    counts = job_counts(out)
    assert "random_weights" not in counts and "match" not in counts, counts
