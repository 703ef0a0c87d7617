"""The modern stage-1 descriptors through Snakemake: `results/<dataset>/megaloc.csv` and the others
(slow: CI runs MixVPR's target in tests/test_workflow_methods.py).

No released weights exist here: the workflow writes seeded random checkpoints in each
model's released layout (rule random_weights: MegaLoc's safetensors, SALAD's and MixVPR's
Lightning .ckpt, BoQ's and EigenPlaces' .pth), the models load them through the loaders a
released file goes through (their upstream parity is in tests/test_<model>.py), and every
result says RANDOM. Images are described at a small size here to keep the CPU test short;
without `resize` each model runs at its authors' test resolution (tests/test_<model>.py).
"""

import pandas as pd
import pytest
import yaml

from .conftest import make_dataset
from .test_workflow import job_counts, snakemake

RW = "work/random_weights"
# (MegaLoc and SALAD need more patches than their 64 clusters: at least 126 x 126 px)
SMALL = {"extraction": {"batch_size": 4, "device": "cpu", "num_workers": 0}}
MODELS = {  # entry -> model conf (random checkpoint in the released file's layout)
    "megaloc": {"name": "megaloc", "checkpoint": f"{RW}/megaloc_seed0.safetensors", "resize": [126, 168]},
    "salad": {"name": "salad", "checkpoint": f"{RW}/salad_seed0.ckpt", "resize": [126, 168]},
    "boq_dinov2": {"name": "boq", "backbone": "dinov2", "checkpoint": f"{RW}/boq-dinov2_seed0.pth",
                   "resize": [70, 98]},
    "boq_r50": {"name": "boq", "backbone": "resnet50", "checkpoint": f"{RW}/boq_seed0.pth", "resize": [96, 128]},
    "eigenplaces": {"name": "eigenplaces", "checkpoint": f"{RW}/eigenplaces_seed0.pth"},
    "mixvpr": {"name": "mixvpr", "checkpoint": f"{RW}/mixvpr_seed0.ckpt"},  # 320x320 only: its MLP sizes fix it
}
DIMS = {"megaloc": 8448, "salad": 8448, "boq_dinov2": 12288, "boq_r50": 16384, "eigenplaces": 2048, "mixvpr": 4096}


def project(wd, names):
    make_dataset(wd / "data" / "tiny", n_db=12, n_q=4)
    config = {
        "datasets": {"tiny": {"root": "data/tiny"}},
        "global_methods": {n: {"model": MODELS[n], **SMALL} for n in names},
        "retrieval": {"k": 5},
        "evaluation": {"recall_at": [1, 3, 5]},
        "default_target": {"methods": [], "published": False},
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    return wd


def check(wd, names):
    targets = [f"results/tiny/{n}.csv" for n in names]
    code, out = snakemake(wd, *targets)
    assert code == 0, out
    counts = job_counts(out)
    assert counts["random_weights"] == len(names) and counts["search"] == len(names), counts
    for n in names:
        row = pd.read_csv(wd / "results" / "tiny" / f"{n}.csv").iloc[0]
        assert row.n_queries_evaluated == 4, row
        assert str(row.weights).startswith("RANDOM"), row.weights  # never mistaken for the model's recalls
        info = (wd / "work" / "tiny" / "global" / n / "faiss.index.json").read_text()
        assert f'"dim": {DIMS[n]}' in info, (n, info)
    assert "Nothing to be done" in snakemake(wd, "-n", *targets)[1]


@pytest.mark.slow
def test_every_modern_descriptor_target(tmp_path):
    """`snakemake results/<dataset>/megaloc.csv` and the others (about 2 minutes on 2 cores)."""
    names = list(MODELS)
    check(project(tmp_path, names), names)


@pytest.mark.slow
def test_megaloc_target_fetches_its_weights_and_runs_at_its_resolution(tmp_path):
    """The README's `snakemake results/demo/megaloc.csv` with the repository's config.yaml on a
    clone with nothing beside it: MegaLoc's registered file is downloaded (from a local mirror
    serving a random checkpoint in the release's safetensors format) and verified into the
    cache, and the model describes the images at its authors' 322 x 322 (a smaller demo)."""
    from pipeline.assets import find_asset
    from pipeline.random_weights import write_random

    from .http_assets import Route, serve
    from .test_fresh_clone import clone, environment, mirror_path, run

    asset = find_asset("megaloc")
    blob = tmp_path / "model.safetensors"
    write_random("megaloc", blob)
    wd = clone(tmp_path / "clone")
    routes = {mirror_path(asset.urls[0]): Route(blob.read_bytes())}
    with serve(routes) as s:
        code, out = run(wd, environment(tmp_path, s.url), "results/demo/megaloc.csv")
        assert code == 0, out[-5000:]
        assert {p for p, _ in s.requests} == set(routes)
    assert (tmp_path / "cache" / asset.file).read_bytes() == blob.read_bytes()
    row = pd.read_csv(wd / "results" / "demo" / "megaloc.csv").iloc[0]
    assert row.n_queries_evaluated == 8 and row.resize == "[322, 322]", row
    assert str(row.weights).startswith("megaloc_model.safetensors sha256:"), row.weights
    info = (wd / "work" / "demo" / "global" / "megaloc" / "faiss.index.json").read_text()
    assert '"dim": 8448' in info
