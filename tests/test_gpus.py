"""Jobs sharing a multi-GPU machine each claim a GPU nobody else holds."""

import subprocess
import sys
import time

from pipeline.gpus import claim_gpu, release_gpus

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from pipeline.gpus import claim_gpu
print(claim_gpu({n}, {folder!r}), flush=True)
time.sleep(30)
"""


def test_concurrent_jobs_get_different_gpus_and_a_killed_job_frees_its_gpu(tmp_path):
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    code = HOLD.format(repo=repo, n=3, folder=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        got = [int(p.stdout.readline()) for p in procs]
        assert sorted(got) == [0, 1, 2]  # three jobs, three GPUs, no two on the same one
        procs[1].kill()  # a killed job's lock goes with it
        procs[1].wait()
        time.sleep(0.2)
        assert claim_gpu(3, tmp_path) == got[1]
        assert claim_gpu(3, tmp_path) == got[1]  # the same process keeps its GPU
    finally:
        release_gpus()
        for p in procs:
            p.kill()
            p.wait()


def test_single_gpu_needs_no_lock(tmp_path):
    assert claim_gpu(1, tmp_path) == 0 and not list(tmp_path.iterdir())
