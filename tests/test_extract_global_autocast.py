"""Global extraction under autocast (``extraction.autocast``): recalls as in float32.

bfloat16 is the CPU's autocast dtype (float16 is for GPUs and refused on a CPU). The
demo's retrieval model (VLAD on ALIKED) runs its network under autocast; the recalls and
the retrieved lists on the synthetic set must be those of float32 up to near-ties.
"""

import numpy as np
import pytest
import zarr

from pipeline.datasets.index import read_table
from pipeline.evaluate import evaluate_topk
from pipeline.extract_global import extract_global

from .conftest import WEIGHTS, need_shared
from .test_retrieval_synthetic import run_retrieval, synthetic  # noqa: F401, F811 (the synthetic set, a fixture)


@pytest.fixture(scope="module")
def model():
    local = {"name": "aliked", "weights": str(need_shared(WEIGHTS / "aliked-n16.pth")), "max_keypoints": 512}
    return {"name": "vlad", "local": local, "n_clusters": 32, "dim": 64}


def _retrieve(tmp, model, autocast):
    # one fit for both runs; stores named by precision
    return run_retrieval(tmp, model, autocast or "float32", autocast=autocast, fit_name="shared")


def test_bfloat16_recalls_equal_float32(synthetic, model):  # noqa: F811
    full = _retrieve(synthetic, model, None)
    half = _retrieve(synthetic, model, "bfloat16")
    r_full, r_half = (evaluate_topk(t, 25.0, (1, 5, 10, 20)) for t in (full, half))
    # measured: identical recalls; descriptors agree to cosine >= 0.99
    for n in (1, 5, 10, 20):
        assert abs(r_full[f"R@{n}"] - r_half[f"R@{n}"]) <= 100 / 24 + 1e-9, (r_full, r_half)
    assert np.mean(full.candidate_names[:, 0] == half.candidate_names[:, 0]) >= 0.9
    a = np.asarray(zarr.open_group(str(synthetic / "float32_queries.zarr"), mode="r")["descriptors"][:], np.float64)
    b = np.asarray(zarr.open_group(str(synthetic / "bfloat16_queries.zarr"), mode="r")["descriptors"][:], np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98
    assert not np.array_equal(a, b)  # autocast did run the network in bfloat16
    attrs = dict(zarr.open_group(str(synthetic / "bfloat16_queries.zarr"), mode="r").attrs)
    assert attrs["autocast"] == "bfloat16"
    assert "autocast" not in dict(zarr.open_group(str(synthetic / "float32_queries.zarr"), mode="r").attrs)


def test_bad_autocast_fails_before_any_work(synthetic, model, tmp_path):  # noqa: F811
    names = read_table(synthetic / "index" / "queries.csv").name.tolist()[:2]
    with pytest.raises(ValueError, match="bfloat16"):
        extract_global(model, synthetic / "demo", names, tmp_path / "x.zarr", fit_state=synthetic / "shared.fit.pt",
                       device="cpu", autocast="float16")  # a GPU-only dtype on the CPU
    with pytest.raises(ValueError, match="autocast must be one of"):
        extract_global(model, synthetic / "demo", names, tmp_path / "x.zarr", fit_state=synthetic / "shared.fit.pt",
                       device="cpu", autocast="fp8")
    assert not (tmp_path / "x.zarr.partial").exists()
