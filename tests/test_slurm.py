"""The pipeline through SLURM for real: `snakemake --profile profiles/slurm` on a running
cluster (`scripts/slurm_local.sh start` makes a one-node one on this machine).

Every job goes through sbatch, the results equal a local run's, and a second run submits
nothing. Skipped when there is no SLURM (no sbatch, no idle node) unless
VG_REQUIRE_SLURM=1, which makes that a failure. On a real cluster, run it with a shared
--basetemp: the jobs read and write the test's working directory on the nodes.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter

import pandas as pd
import pytest
import yaml

from .conftest import REPO

# about 4 minutes on 2 cores (each SLURM job starts snakemake twice: ~10 s); CI starts the
# one-node SLURM and sets VG_REQUIRE_SLURM=1 (.ci/run), elsewhere it is skipped without SLURM
pytestmark = [pytest.mark.slurm]

PROFILE = REPO / "profiles" / "slurm"
TIMEOUT_S = 1500  # the SLURM run; about 5 minutes on 2 cores

# the built-in synthetic dataset, small: 2 database shards, 8 queries, one re-ranking method
CONFIG = {
    "datasets": {"syn": {"root": "data/syn", "synthetic": {
        "n_streets": 2, "street_length": 40.0, "n_queries": 8, "image_size": [160, 120], "seed": 1}}},
    "global_methods": {"vlad_sift": {
        "model": {"name": "vlad", "local": {"name": "sift", "max_keypoints": 500}, "n_clusters": 16, "dim": 16},
        "extraction": {"device": "cpu", "num_workers": 0, "batch_size": 8}}},
    "local_features": {"sift": {"name": "sift", "max_keypoints": 500}},
    "matchers": {"mnn_ratio": {"name": "mnn", "ratio": 0.9}},
    "scorers": {"ransac": {"name": "ransac", "threshold": 24}},
    "rerank_methods": {"sift_ransac": {"retrieval": "vlad_sift", "features": "sift", "matcher": "mnn_ratio",
                                       "scorer": "ransac", "k": 10, "device": "cpu"}},
    "retrieval": {"k": 10, "shard_size": 20},
    "evaluation": {"recall_at": [1, 5, 10]},
}
RESULTS = ("vlad_sift", "sift_ransac")
PIPELINE = {"synthetic_syn", "index_dataset", "fit_global", "extract_database_shard", "extract_queries",
            "gather_database", "build_index", "search", "extract_local", "match", "score"}
LOCAL = {"results", "rerank_results"}  # localrules: trivial jobs run by snakemake itself


def _no_slurm(reason):
    if os.environ.get("VG_REQUIRE_SLURM") == "1":
        pytest.fail(f"VG_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(f"{reason} (scripts/slurm_local.sh start runs a local one)")


def _node_size():
    """(CPUs, memory MB) of the biggest idle node of the default partition, or None."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        _no_slurm("no SLURM: sbatch/sinfo not on PATH")
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mixed", "-o", "%c %m %P"],
                           check=False, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        _no_slurm("sinfo timed out")
    nodes = [line.split() for line in r.stdout.splitlines()]
    nodes = [(int(c), int(m.rstrip("+"))) for c, m, p in nodes if p.endswith("*")]
    if r.returncode != 0 or not nodes:
        _no_slurm(f"no idle SLURM node in the default partition (sinfo: {(r.stdout + r.stderr).strip()!r})")
    return max(nodes)


def _rules():
    names = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        names.update(re.findall(r"^(?:rule|checkpoint) (\w+):", smk.read_text(), re.MULTILINE))
    return sorted(names)


def _fit_node(cpus, mem_mb):
    """Options that fit the pipeline's requests to a small node: threads capped at its CPUs
    (index_dataset asks 4) and, below 16 GB, every rule's mem_mb at its memory (sbatch
    refuses jobs bigger than any node). The profile's own set-resources stay."""
    args = ["--max-threads", str(cpus)]
    if mem_mb < 16000:
        prof = yaml.safe_load((PROFILE / "config.yaml").read_text()).get("set-resources") or {}
        if isinstance(prof, dict):
            prof = [f"{rule}:{k}={v}" for rule, res in prof.items() for k, v in res.items()]
        capped = [f"{rule}:mem_mb={mem_mb}" for rule in _rules() + ["synthetic_syn"]]
        args += ["--set-resources", *[s for s in prof if ":mem_mb=" not in s], *capped]
    return args


def _run_profile(workdir, extra):
    """snakemake --profile profiles/slurm, killed (its SLURM jobs cancelled) after TIMEOUT_S."""
    cmd = ["snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(workdir), "--profile", str(PROFILE),
           # poll SLURM every few seconds, not every 40+ (the profile's default): tiny jobs
           "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
           "--slurm-keep-successful-logs", *extra]
    log = workdir / f"slurm_run_{time.time_ns()}.txt"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            p.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)  # snakemake cancels its jobs
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out = log.read_text()
            run = re.search(r"SLURM run ID: (\S+)", out)
            if run:  # only this run's jobs
                subprocess.run(["scancel", "--name", run.group(1)], check=False, capture_output=True, timeout=60)
            pytest.fail(f"snakemake --profile slurm did not finish in {TIMEOUT_S} s:\n{out[-5000:]}")
    return p.returncode, log.read_text()


def _recalls(workdir):
    return {m: pd.read_csv(workdir / "results" / "syn" / f"{m}.csv")[["method", "R@1", "R@5", "R@10"]]
            for m in RESULTS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cpus, mem_mb = _node_size()
    local, cluster = tmp_path_factory.mktemp("slurm_ref"), tmp_path_factory.mktemp("slurm_run")
    for wd in (local, cluster):
        (wd / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # the reference, --cores 1 without SLURM, runs beside the SLURM run (which mostly waits on
    # job start-up and status polls)
    ref = subprocess.Popen(["snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(local), "--cores", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    code, out = _run_profile(cluster, _fit_node(cpus, mem_mb))
    seconds = time.monotonic() - t0
    ref_out = ref.communicate(timeout=TIMEOUT_S)[0]
    assert ref.returncode == 0, ref_out[-10000:]
    assert code == 0, out[-10000:]
    print(f"snakemake --profile profiles/slurm: {seconds:.0f} s")
    return local, cluster, out


def test_every_job_went_through_slurm(runs):
    _, wd, out = runs
    # "rule X:" (or "checkpoint X:") heads a job submitted to the executor, "localrule X:" one
    # run in snakemake's own process
    jobs = Counter(re.findall(r"^(?:rule|checkpoint) (\w+):$", out, re.MULTILINE))
    assert PIPELINE <= set(jobs), jobs
    assert not LOCAL & set(jobs) and LOCAL <= set(re.findall(r"^localrule (\w+):$", out, re.MULTILINE)), out
    assert jobs["extract_database_shard"] == 2, jobs  # one SLURM job per database shard
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.", out)
    assert len(submitted) == sum(jobs.values()), out
    logs = wd / ".snakemake" / "slurm_logs"
    for rule in jobs:
        assert list((logs / f"rule_{rule}").rglob("*.log")), f"no SLURM log of rule {rule}"
    for jobid, path in submitted:
        assert os.path.isfile(path) and os.path.basename(path) == f"{jobid}.log", path
    # SLURM's own record of the run (finished jobs stay in squeue for MinJobAge seconds)
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    r = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T", "--name", run_id],
                       check=False, capture_output=True, text=True, timeout=60)
    states = dict(line.split("|") for line in r.stdout.splitlines() if "|" in line)
    assert states and set(states) <= {j for j, _ in submitted}, (states, submitted)
    assert set(states.values()) == {"COMPLETED"}, states


def test_results_equal_a_local_run(runs):
    local, wd, _ = runs
    got, ref = _recalls(wd), _recalls(local)
    for m in RESULTS:
        pd.testing.assert_frame_equal(got[m], ref[m])
    base, rr = got["sift_ransac"].iloc[0], got["sift_ransac"].iloc[1]
    assert (base.method, rr.method) == ("vlad_sift", "sift_ransac")
    assert rr["R@10"] == base["R@10"]  # re-ranking the top 10 cannot change R@10


def test_second_run_submits_nothing(runs):
    _, wd, _ = runs
    code, out = _run_profile(wd, _fit_node(*_node_size()))
    assert code == 0, out
    assert "Nothing to be done" in out and "submitted with SLURM jobid" not in out, out


def test_gpu_requests_reach_sbatch(runs):
    """gpus_per_job=1 -> the GPU-capable rule's job asks SLURM for a GPU and gets one (the local
    cluster's stand-in GPUs: scripts/slurm_local.sh), as on a GPU cluster; CPU rules ask none."""
    r = subprocess.run(["sinfo", "-h", "-o", "%G"], check=False, capture_output=True, text=True, timeout=30)
    if "gpu" not in r.stdout:
        pytest.skip(f"the cluster declares no GPUs (sinfo %G: {r.stdout.strip()!r})")
    _, wd, _ = runs
    target = "work/syn/global/vlad_sift/queries.zarr"
    shutil.rmtree(wd / target)  # the last test of the module: nothing else reads this workdir after it
    code, out = _run_profile(wd, [target, *_fit_node(*_node_size()), "--config", "gpus_per_job=1"])
    assert code == 0, out
    assert re.findall(r"^rule (\w+):$", out, re.MULTILINE) == ["extract_queries"], out
    (jobid,) = re.findall(r"submitted with SLURM jobid (\d+)", out)
    job = subprocess.run(["scontrol", "show", "job", jobid], check=False, capture_output=True, text=True,
                         timeout=60).stdout
    assert "JobState=COMPLETED" in job and re.search(r"gres[/:]gpu[:=]1", job), job
    assert (wd / target).is_dir()
