"""Planning the index and the jobs' resources: factory choice, mem_mb by index type, GPU requests."""

import re
import subprocess

import pytest
import yaml

from pipeline.global_features import get_model_class
from pipeline.index_plan import choose_factory, index_bytes, memory_mb

from .conftest import REPO


def test_memory_follows_index_type_and_database_size():
    n, d = 2_800_000, 512
    build = {i: memory_mb("build", n, d, i) for i in ("flat", "flat_fp16", "ivfpq", "sharded")}
    # a flat float32 index of SF-XL is 5.7 GB, float16 half, PQ64 180 MB, sharded keeps none
    assert build["flat"] > 5734 and build["flat_fp16"] > 2867
    assert build["flat"] > build["flat_fp16"] > build["ivfpq"] > build["sharded"]
    assert memory_mb("build", 10 * n, d, "sharded") < 2 * build["sharded"]  # sharded: hardly grows
    assert memory_mb("build", 10 * n, d, "flat") > 9 * build["flat"] * 0.8
    # re-scoring a compressed index costs memory at search time, not for exact ones
    assert memory_mb("search", n, d, "ivfpq", rescore=4) > memory_mb("search", n, d, "ivfpq", rescore=0)
    assert memory_mb("search", n, d, "flat", rescore=4) == memory_mb("search", n, d, "flat", rescore=0)
    assert memory_mb("search", None, d) == 16_000  # not indexed yet: a safe default
    with pytest.raises(ValueError, match="stage must be"):
        memory_mb("train", n, d)


def test_index_bytes_and_dims():
    assert index_bytes("IVF1024,PQ64x8", 1000, 512) == 1000 * (64 + 8) + 1024 * 512 * 4
    assert index_bytes(choose_factory(2_800_000, 512), 1, 512) < 100 + 8192 * 512 * 4
    # each global model class says its descriptor size from a conf, without building the model
    assert get_model_class("cosplace").descriptor_size({"name": "cosplace", "fc_output_dim": 2048}) == 2048
    assert get_model_class("cosplace").descriptor_size({"name": "cosplace"}) == 512  # the default
    assert get_model_class("vlad").descriptor_size({"name": "vlad", "dim": 256}) == 256
    assert get_model_class("vlad").descriptor_size({"name": "vlad", "dim": None, "n_clusters": 8}) == 8 * 128  # SIFT
    with pytest.raises(ValueError, match="unknown option"):
        get_model_class("vlad").descriptor_size({"name": "vlad", "dims": 256})


def test_gpu_and_runtime_requests_reach_the_jobs(tmp_path):
    """gpus_per_job becomes the `gpu` resource of the GPU-capable rules only (-> sbatch --gpus)."""
    cfg = {"datasets": {"syn": {"root": "data/syn", "synthetic": {"n_streets": 1, "street_length": 20.0,
                                                                    "n_queries": 2, "image_size": [160, 120]}}},
           "global_methods": {"vlad_sift": {"model": {"name": "vlad", "local": {"name": "sift"}, "n_clusters": 4,
                                                      "dim": 4}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))

    def resources(*extra):
        r = subprocess.run(["snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", *extra],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        out, jobs = r.stdout + r.stderr, {}
        for block in re.split(r"\n(?:rule|checkpoint|localrule) ", out)[1:]:
            name = block.split(":", 1)[0]
            line = next((ln for ln in block.splitlines() if "resources:" in ln), "")
            jobs[name] = line
        return jobs

    jobs = resources("--config", "gpus_per_job=1")
    assert "gpu=1" in jobs["fit_global"] and "gpu=1" in jobs["extract_queries"], jobs
    assert "runtime=120" in jobs["fit_global"] and "mem_mb=8000" in jobs["fit_global"]
    assert "gpu=" not in jobs["index_dataset"]  # CPU rules ask for no GPU
    assert "gpu=0" in resources()["fit_global"]  # default: none (the SLURM plugin then adds no --gpus)
