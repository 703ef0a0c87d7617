"""`weights: auto` through Snakemake: a method asked for by name fetches its registered files
(here from a server on 127.0.0.1 standing in for the release hosts), verifies them and runs;
with no server it fails before any extraction, naming the URLs and the manual step."""

import os
import subprocess

import pandas as pd
import pytest
import yaml

from pipeline.random_weights import write_random

from .conftest import REPO, WEIGHTS, need_shared
from .http_assets import Route, serve
from .test_workflow import job_counts
from .test_workflow_methods import tiny_project

HOST = "https://release.example.org"


def project(tmp_path):
    wd = tiny_project(tmp_path / "wf", local={"superpoint": {"name": "superpoint", "weights": "auto", "max_keypoints": 256}},
                      matchers={"superglue": {"name": "superglue", "weights": "auto"}},
                      scorers={"ransac": {"name": "ransac", "threshold": 24, "seed": 0}},
                      methods={"superglue": {"features": "superpoint", "matcher": "superglue", "scorer": "ransac"}}, k=3)
    registry = {
        "superpoint-v1": {"model": "superpoint", "file": "superpoint_v1.pth", "licence": "Magic Leap non-commercial",
                          "non_commercial": True, "urls": [f"{HOST}/magicleap/superpoint_v1.pth"]},
        "superglue-outdoor": {"model": "superglue", "file": "superglue_outdoor.pth", "licence": "Magic Leap",
                              "non_commercial": True, "urls": [f"{HOST}/magicleap/superglue_outdoor.pth"],
                              "manual": "from the SuperGluePretrainedNetwork repository"},
    }
    (tmp_path / "assets.yaml").write_text(yaml.safe_dump(registry))
    return wd


def run(wd, env, *args):
    r = subprocess.run(["snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(wd), "--cores", "2", *args],
                       capture_output=True, text=True, env=env)
    return r.returncode, r.stdout + r.stderr


def environment(tmp_path, mirror):
    env = {**os.environ, "VG_WEIGHTS_DIR": str(tmp_path / "cache"), "VG_ASSET_REGISTRY": str(tmp_path / "assets.yaml"),
           "VG_ASSET_MIRROR": mirror, "VG_DOWNLOAD_RETRIES": "1"}
    env.pop("VG_WEIGHTS_PATH", None)
    return env


@pytest.mark.slow  # the default target's fetch through a mirror runs in CI: tests/test_fresh_clone.py
def test_a_method_fetches_its_weights_then_runs(tmp_path):
    superpoint = need_shared(WEIGHTS / "superpoint_v1_dequant_uint8.pth").read_bytes()  # the upstream layout
    write_random("superglue", tmp_path / "sg.pth", 0)
    wd = project(tmp_path)
    routes = {"/release.example.org/magicleap/superpoint_v1.pth": Route(superpoint),
              "/release.example.org/magicleap/superglue_outdoor.pth": Route((tmp_path / "sg.pth").read_bytes())}
    with serve(routes) as s:
        env = environment(tmp_path, s.url)
        code, out = run(wd, env, "results/tiny/superglue.csv")
        assert code == 0, out
        assert job_counts(out)["fetch_weights"] == 2
        fetched = [p for p, _ in s.requests]
    assert sorted(set(fetched)) == sorted(routes)
    assert (tmp_path / "cache" / "superglue_outdoor.pth").is_file()
    row = pd.read_csv(wd / "results" / "tiny" / "superglue.csv").iloc[1]
    # the results name the exact files (name and sha256), not just "trained"
    assert "superpoint_v1.pth sha256:" in row.weights and "superglue_outdoor.pth sha256:" in row.weights
    code, out = run(wd, env, "-n", "results/tiny/superglue.csv")
    assert code == 0 and "Nothing to be done" in out, out


def test_no_server_fails_before_any_extraction_naming_the_urls(tmp_path):
    wd = project(tmp_path)
    env = environment(tmp_path, "http://127.0.0.1:9")  # nothing listens there; the official host is unreachable
    code, out = run(wd, env, "results/tiny/superglue.csv")
    assert code != 0
    assert "http://127.0.0.1:9/release.example.org/magicleap/superglue_outdoor.pth" in out
    assert f"{HOST}/magicleap/superglue_outdoor.pth" in out
    assert f"put it at {tmp_path / 'cache' / 'superglue_outdoor.pth'}" in out
    assert "from the SuperGluePretrainedNetwork repository" in out
    assert not (wd / "work" / "tiny" / "global").exists() and not (wd / "work" / "tiny" / "local").exists()
    assert not list((tmp_path / "cache").glob("*.pth"))


@pytest.mark.slow  # in CI, tests/test_fresh_clone.py checks the same early stop on the real config
def test_default_target_stops_before_any_job_when_its_files_cannot_be_fetched(tmp_path):
    wd = project(tmp_path)
    env = environment(tmp_path, "http://127.0.0.1:9")
    code, out = run(wd, env)  # no default_target list: every method, so superglue's files too
    assert code != 0
    assert "2 file(s) needed are not here" in out, out
    for file in ("superpoint_v1.pth", "superglue_outdoor.pth"):
        assert f"http://127.0.0.1:9/release.example.org/magicleap/{file}: " in out
        assert f"put it at {tmp_path / 'cache' / file}" in out
    assert "still run: snakemake --cores 2 results/tiny/vlad_sift.csv" in out
    assert not (wd / "work" / "tiny").exists()  # nothing ran


def test_default_target_keeps_to_the_listed_methods(tmp_path):
    wd = project(tmp_path)
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["default_target"] = {"methods": ["vlad_sift"]}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run(wd, environment(tmp_path, "http://127.0.0.1:9"), "-n")
    assert code == 0, out
    assert "fetch_weights" not in job_counts(out) and "rerank_results" not in job_counts(out)
    assert job_counts(out)["results"] == 1
