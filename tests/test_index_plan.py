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


def test_big_descriptors_are_planned_within_memory():
    """MegaLoc / SALAD (8448-d) and BoQ (16384-d) at SF-XL scale: IVF-PQ at dim/8 bytes a vector
    (PCA only on request or above 16384-d), and every buffer (training sample, chunks,
    re-scoring batch) capped in bytes, not rows."""
    from pipeline.index_plan import FLAT_MAX_BYTES, chunk_rows_for, pca_dim, train_size_for

    # flat stays exact while the float32 descriptors fit 8 GB: 1 M x 512-d, not 1 M x 8448-d
    assert choose_factory(1_000_000, 512) == "Flat"
    assert choose_factory(236_000, 8448) == "Flat" and 4 * 236_000 * 8448 <= FLAT_MAX_BYTES
    assert choose_factory(300_000, 8448) == "IVF2048,PQ1056x8"
    assert choose_factory(2_800_000, 16384) == "IVF8192,PQ2048x8"
    assert choose_factory(2_800_000, 32768) == "PCAR1024,IVF8192,PQ128x8"  # e.g. NetVLAD: PCA first
    assert choose_factory(2_800_000, 8448, pca=1024) == "PCAR1024,IVF8192,PQ128x8"
    assert choose_factory(2_800_000, 8448, "ivfpq", m=64, pca=512) == "PCAR512,IVF8192,PQ64x8"
    with pytest.raises(ValueError, match="after PCA from 8448"):
        choose_factory(2_800_000, 8448, "ivfpq", m=100, pca=1024)
    with pytest.raises(ValueError, match="below the descriptor"):
        pca_dim(512, 1024)
    # the index holds 128 bytes a vector, the PCA matrix 35 MB
    f = choose_factory(2_800_000, 8448, pca=1024)
    assert index_bytes(f, 2_800_000, 8448) == pytest.approx(
        2_800_000 * (128 + 8) + 8192 * 1024 * 4 + 8449 * 1024 * 4)
    # buffers in bytes: 200 k x 512-d samples but 48 k x 8448-d; chunks of 8192 rows of 8448-d
    assert train_size_for(200_000, 512) == 200_000 and train_size_for(200_000, 8448) == 48_484
    assert chunk_rows_for(100_000, 512) == 100_000 and chunk_rows_for(100_000, 8448) == 8192
    # every released descriptor's job fits a 20 GB node at SF-XL scale (BoQ R50's 5.7 GB of codes
    # the most, as much as CosPlace's flat float32 index)
    for dim in (512, 2048, 4096, 8448, 12288, 16384, 32768):
        assert memory_mb("build", 2_800_000, dim) < 20_000 and memory_mb("search", 2_800_000, dim, rescore=4,
                                                                         n_queries=1000) < 20_000, dim


def test_pca_index_with_rescoring_finds_the_exact_neighbours(tmp_path):
    """A PCA-reduced IVF-PQ index (as big descriptors get) built and searched through the
    pipeline's functions: re-scoring with the exact descriptors restores the exact top-1."""
    import numpy as np

    from pipeline.retrieval import build_index, search
    from pipeline.topk import read_topk

    from .test_retrieval_index import brute_force, clustered, unit, write_store

    x = clustered(3000, 96, 60, 0.6, 3)
    rng = np.random.default_rng(4)
    qi = rng.choice(len(x), 40, replace=False)
    q = unit(x[qi] + 0.05 * rng.standard_normal((40, 96)))
    write_store(tmp_path / "db.zarr", x)
    write_store(tmp_path / "q.zarr", q, prefix="q")
    info = build_index([tmp_path / "db.zarr"], tmp_path / "faiss.index", "ivfpq", nlist=16, m=8, pca=32,
                       train_size=3000)
    assert info["factory"] == "PCAR32,IVF16,PQ8x8"
    _, J = brute_force(q, x, 10)
    hits = {}
    for rescore in (0, 4):
        out = tmp_path / f"top_{rescore}.h5"
        search(tmp_path / "faiss.index", tmp_path / "q.zarr", out, k=10, nprobe=16,
               database=[str(tmp_path / "db.zarr")], rescore=rescore)
        top1 = read_topk(out).candidate_index[:, 0]
        hits[rescore] = np.mean(top1 == J[:, 0])
    assert hits[4] == 1.0, hits  # the exact descriptors decide the order
    assert hits[0] < 1.0, hits   # PCA to 32-d + 8-byte codes alone do not (else the check is vacuous)
