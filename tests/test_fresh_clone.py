"""The README's main command on a user's machine: a copy of the project with nothing beside it
(no ../shared), the real config.yaml and registry, and a server on 127.0.0.1 standing in for
the release hosts (``VG_ASSET_MIRROR``, ``VG_ASSET_MIRROR_ONLY``: the real hosts are never
reached, even where there is a network).

A user offline first: ``snakemake --cores 2`` stops before any job, naming every file it
needs with its URLs and where to put it, while a target that needs no download still runs.
Then online: the same command fetches the weights and the published file, verifies them,
and writes every default table; the thesis's stage-1 table reproduces the published recalls.

The demo dataset is made smaller (a config file given after config.yaml) to keep CI short.
"""

import os
import shutil
import subprocess
from urllib.parse import urlsplit

import pandas as pd
import pytest
import yaml

from pipeline.assets import find_asset

from .conftest import REPO, SHARED, WEIGHTS, need_shared
from .http_assets import Route, serve

#: the registered files the default target needs, and the local copy the test server serves
SERVED = {
    "aliked-n16": WEIGHTS / "aliked-n16.pth",
    "aliked-lightglue": WEIGHTS / "aliked_lightglue.pth",
    "thesis-cosplace-sfxl-occlusion": SHARED / "fixtures" / "cosplace_50_sf_xl_queries_occlusion.h5",
}
SMALL = {  # the demo, smaller: one street, 8 queries
    "datasets": {"demo": {"synthetic": {"seed": 0, "n_streets": 1, "street_length": 80.0, "n_queries": 8}}},
    "retrieval": {"k": 20},
    "evaluation": {"recall_at": [1, 5, 10, 20]},
    "rerank_methods": {"sift_ransac": {"k": 5}, "aliked_lightglue": {"k": 5}},
}
DEFAULT_TABLES = ["results/demo/vlad_sift.csv", "results/demo/vlad_aliked.csv", "results/demo/sift_ransac.csv",
                  "results/demo/aliked_lightglue.csv", "results/sfxl_occlusion/cosplace_thesis.csv",
                  "results/thesis/stage1.csv"]


def clone(dest):
    """The project's files as a clone has them (tracked and not ignored), nothing beside them."""
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True)
    if r.returncode != 0:
        pytest.skip("the project is not a git checkout")
    for rel in filter(None, r.stdout.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    assert not (dest.parent / "shared").exists()
    (dest / "small.yaml").write_text(yaml.safe_dump(SMALL))
    return dest


def run(wd, env, *args):
    r = subprocess.run(["snakemake", *args, "--cores", "2", "--configfile", "config.yaml", "small.yaml"], cwd=wd,
                       capture_output=True, text=True, env=env)
    return r.returncode, r.stdout + r.stderr


def environment(tmp_path, mirror):
    env = {**os.environ, "VG_WEIGHTS_DIR": str(tmp_path / "cache"), "VG_ASSET_MIRROR": mirror,
           "VG_ASSET_MIRROR_ONLY": "1", "VG_DOWNLOAD_RETRIES": "1"}
    for key in ("VG_WEIGHTS_PATH", "VG_ASSET_REGISTRY", "PYTHONPATH"):
        env.pop(key, None)
    return env


def mirror_path(url):
    parts = urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


def test_offline_then_online_on_a_clone_with_nothing_beside_it(tmp_path):
    data = {name: need_shared(path).read_bytes() for name, path in SERVED.items()}
    wd = clone(tmp_path / "clone")

    # offline: one early error naming every missing file, its URL and where to put it
    env = environment(tmp_path, "http://127.0.0.1:9")  # nothing listens there
    code, out = run(wd, env)
    assert code != 0
    assert "3 file(s) needed are not here" in out, out
    for name in SERVED:
        asset = find_asset(name)
        assert f"http://127.0.0.1:9{mirror_path(asset.urls[0])}" in out
        assert f"put it at {tmp_path / 'cache' / asset.file}" in out
    assert "results/demo/vlad_sift.csv" in out  # what still runs offline
    assert not (wd / "work").exists() and not (wd / "data" / "demo").exists()  # no job started
    # a target that needs no download runs
    code, out = run(wd, env, "results/demo/vlad_sift.csv")
    assert code == 0, out
    assert (wd / "results" / "demo" / "vlad_sift.csv").is_file()

    # online: the files come from the server, verified; every default table is written
    routes = {mirror_path(find_asset(name).urls[0]): Route(blob) for name, blob in data.items()}
    with serve(routes) as s:
        code, out = run(wd, environment(tmp_path, s.url))
        assert code == 0, out
        fetched = {p for p, _ in s.requests if p in routes}
    assert fetched == set(routes)
    for name in SERVED:
        assert (tmp_path / "cache" / find_asset(name).file).read_bytes() == data[name]
    for table in DEFAULT_TABLES:
        assert (wd / table).is_file(), table
    stage1 = pd.read_csv(wd / "results" / "thesis" / "stage1.csv").set_index("asset")
    assert len(stage1) == 7  # every published file has a row
    occ = stage1.loc["thesis-cosplace-sfxl-occlusion"]
    assert occ.status == "reproduced" and occ.n_queries == 76
    assert occ["R@1"] == pytest.approx(26.31578947) and occ["R@100"] == pytest.approx(60.52631579)
    # the others were neither here nor on the mirror: rows that say how to fetch them
    others = stage1.drop("thesis-cosplace-sfxl-occlusion")
    assert others.status.str.startswith("not here: python -m pipeline assets fetch").all()
    thesis = pd.read_csv(wd / "results" / "sfxl_occlusion" / "cosplace_thesis.csv").iloc[0]
    assert thesis["R@1"] == pytest.approx(26.32, abs=0.01)
    aliked = pd.read_csv(wd / "results" / "demo" / "aliked_lightglue.csv").iloc[1]
    assert "aliked-n16.pth sha256:5be8704840ed" in aliked.weights
