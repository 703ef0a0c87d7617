"""The Snakemake workflow end to end on a tiny dataset: outputs, no-op reruns,
and that deleting one shard re-runs only that shard and what depends on it."""

import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from .conftest import REPO, make_dataset
from .test_index import plain_named_dataset

METHOD = {
    "model": {"name": "vlad", "local": {"name": "sift", "max_keypoints": 300}, "n_clusters": 8, "dim": 8,
              "fit_images": 20},
    "extraction": {"batch_size": 4, "device": "cpu", "num_workers": 0},
}


def snakemake(workdir, *args):
    r = subprocess.run(
        ["snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args],
        capture_output=True, text=True,
    )
    return r.returncode, r.stdout + r.stderr


def job_counts(output: str, stamps: bool = False) -> dict:
    """The 'Job stats' table of a (dry) run: rule -> count. ``stamp`` jobs are left out unless
    ``stamps``: a dry run shows a rebuild after a deleted input as one (it writes nothing; the
    run itself writes the stamp before it starts, see rebuild_if_inputs_missing)."""
    counts = {}
    m = re.search(r"Job stats:\n(.*?)\n\s*total", output, re.S)
    if m:
        for line in m.group(1).splitlines()[2:]:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "all" and (stamps or parts[0] != "stamp"):
                counts[parts[0]] = int(parts[1])
    return counts


def tree_state(root) -> dict:
    """Every file and folder under ``root`` (Snakemake's own .snakemake aside) with its mtime and size."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if ".snakemake" not in p.parts}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    make_dataset(wd / "data" / "tiny", n_db=12, n_q=4)
    # the same images named IMG_*.jpg, their positions in a CSV
    plain = make_dataset(wd / "data" / "plain", n_db=12, n_q=4)
    plain_named_dataset(plain, wd)
    config = {
        "datasets": {"tiny": {"root": "data/tiny"}, "plain": {"root": "data/plain", "positions": "positions.csv"}},
        "global_methods": {"vlad_a": METHOD, "vlad_b": {**METHOD, "model": {**METHOD["model"], "n_clusters": 6}}},
        "retrieval": {"k": 5, "shard_size": 5},
        "evaluation": {"recall_at": [1, 5]},
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    code, out = snakemake(wd)
    assert code == 0, out
    return wd


def test_results_written(project):
    for m in ("vlad_a", "vlad_b"):
        df = pd.read_csv(project / "results" / "tiny" / f"{m}.csv")
        assert list(df.columns[:6]) == ["dataset", "method", "R@1", "R@5", "n_queries", "n_skipped_queries"]
        assert df.n_queries[0] == 4 and df["R@5"][0] == 100.0
        # every query file accounted for; none left out here, so both recall sets agree
        assert (df.n_queries_found[0], df.n_queries_indexed[0], df.n_queries_left_out[0]) == (4, 4, 0)
        assert df["R@1_all_found"][0] == df["R@1"][0]
    shards = sorted(p.name for p in (project / "work/tiny/global/vlad_a/database").iterdir())
    assert shards == ["shard_0000.zarr", "shard_0001.zarr", "shard_0002.zarr"]


def test_positions_csv_dataset(project):
    tiny = pd.read_csv(project / "results" / "tiny" / "vlad_a.csv")
    plain = pd.read_csv(project / "results" / "plain" / "vlad_a.csv")
    assert plain.n_queries[0] == 4
    # same images, same positions: the same recalls whether positions come from names or the CSV
    assert plain["R@1"][0] == tiny["R@1"][0] and plain["R@5"][0] == 100.0


def test_second_invocation_has_nothing_to_do(project):
    code, out = snakemake(project, "-n")
    assert code == 0 and "Nothing to be done" in out, out


def test_deleting_one_shard_reruns_only_it(project):
    shutil.rmtree(project / "work/tiny/global/vlad_a/database/shard_0001.zarr")
    before = tree_state(project)
    code, out = snakemake(project, "-n")
    assert code == 0, out
    assert tree_state(project) == before, "snakemake -n wrote or touched files"
    planned = job_counts(out)
    assert planned == {
        "extract_database_shard": 1, "gather_database": 1, "build_index": 1, "search": 1, "results": 1,
    }, out
    assert job_counts(out, stamps=True)["stamp"] == 1  # how the dry run shows the rebuild
    assert "shard_0001.zarr" in out and "output: work/tiny/global/vlad_a/database/shard_0000.zarr" not in out
    code, out = snakemake(project)
    assert code == 0, out
    assert job_counts(out, stamps=True) == planned  # the run does what the dry run said, no more
    assert "Nothing to be done" in snakemake(project, "-n")[1]


def test_changing_one_method_reruns_only_that_method(project):
    cfg = yaml.safe_load((project / "config.yaml").read_text())
    cfg["global_methods"]["vlad_b"]["model"]["n_clusters"] = 5
    (project / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = snakemake(project, "-n")
    assert code == 0, out
    assert "vlad_a" not in out.split("Job stats")[0]
    counts = job_counts(out)
    # for both datasets: nothing of vlad_a, no indexing
    assert counts == {"fit_global": 2, "extract_database_shard": 6, "extract_queries": 2, "gather_database": 2,
                      "build_index": 2, "search": 2, "results": 2}, out
