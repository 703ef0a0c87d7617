"""Wrong weights fail the run in seconds, before any retrieval job (rule check_weights)."""

import json
import subprocess
import sys

import yaml

from .conftest import REPO, make_dataset
from .test_workflow import METHOD, job_counts, snakemake


def _project(wd, weights):
    make_dataset(wd / "data" / "tiny", n_db=6, n_q=2)
    config = {
        "datasets": {"tiny": {"root": "data/tiny"}},
        "global_methods": {"vlad_sift": METHOD},
        "retrieval": {"k": 3},
        "evaluation": {"recall_at": [1, 3]},
        "local_features": {"d2net": {"name": "d2net", "weights": weights}},
        "matchers": {"mnn": {"name": "mnn"}},
        "scorers": {"ransac": {"name": "ransac", "threshold": 24, "seed": 0}},
        "rerank_methods": {"d2net_ransac": {"retrieval": "vlad_sift", "features": "d2net", "matcher": "mnn",
                                            "scorer": "ransac", "k": 3, "device": "cpu"}},
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(config))


def test_wrong_weights_fail_before_any_retrieval_job(tmp_path):
    # random bytes where D2-Net's weights should be (the case: hours of retrieval, then this)
    (tmp_path / "d2_tf.pth").write_bytes(b"\x00garbage" * 100)
    _project(tmp_path, str(tmp_path / "d2_tf.pth"))
    code, out = snakemake(tmp_path, "--cores", "1", "results/tiny/d2net_ransac.csv")
    assert code != 0
    log = (tmp_path / "work" / "logs" / "check_weights_local_d2net.log").read_text()
    assert "local_features.d2net" in log and str(tmp_path / "d2_tf.pth") in log
    # the check ran first (priority): no retrieval stage had started
    assert not (tmp_path / "work" / "tiny" / "index").exists()
    assert not list((tmp_path / "work").glob("tiny/global/*"))


def test_good_weights_are_checked_once_and_reruns_are_noops(tmp_path):
    out = tmp_path / "d2net.pth"
    subprocess.run([sys.executable, "-m", "pipeline", "random-weights", "--out", str(out), "--model", "d2net"],
                   check=True, cwd=REPO,
                   capture_output=True)
    _project(tmp_path, str(out))
    code, log = snakemake(tmp_path, "-n", "results/tiny/d2net_ransac.csv")
    assert code == 0 and job_counts(log).get("check_weights") == 1, log
    stamp = tmp_path / "work" / "checks" / "weights" / "local" / "d2net.json"
    code, log = snakemake(tmp_path, "--until", "check_weights", "results/tiny/d2net_ransac.csv")
    assert code == 0, log
    assert json.loads(stamp.read_text())["weights"] == [str(out)]
    code, log = snakemake(tmp_path, "-n", "--until", "check_weights", "results/tiny/d2net_ransac.csv")
    assert "check_weights" not in job_counts(log), log


def test_wrong_global_checkpoint_fails_before_the_index(tmp_path):
    (tmp_path / "resnet18_512.pth").write_bytes(b"not a checkpoint" * 50)
    make_dataset(tmp_path / "data" / "tiny", n_db=6, n_q=2)
    config = {
        "datasets": {"tiny": {"root": "data/tiny"}},
        "global_methods": {"cosplace": {"model": {"name": "cosplace", "backbone": "ResNet18",
                                                  "checkpoint": str(tmp_path / "resnet18_512.pth")},
                                        "extraction": {"device": "cpu", "num_workers": 0}}},
        "retrieval": {"k": 3},
        "evaluation": {"recall_at": [1, 3]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code, out = snakemake(tmp_path, "--cores", "1", "results/tiny/cosplace.csv")
    assert code != 0
    log = (tmp_path / "work" / "logs" / "check_weights_global_cosplace.log").read_text()
    assert "global_methods.cosplace.model" in log and "resnet18_512.pth" in log
    assert not (tmp_path / "work" / "tiny" / "index").exists()
