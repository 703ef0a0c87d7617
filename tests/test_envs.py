"""The conda environment files stay in step with pyproject.toml."""

import re
import tomllib

import yaml

from .conftest import REPO

# pip name -> conda name where they differ
CONDA_NAMES = {"torch": "pytorch", "opencv-python-headless": "opencv", "snakemake": "snakemake-minimal",
               "matplotlib": "matplotlib-base", "faiss-cpu": "faiss-cpu"}


def requirement_names(reqs):
    return [re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in reqs]


def env_names(path):
    deps = yaml.safe_load(path.read_text())["dependencies"]
    return {re.split(r"[<>=! ]", d, maxsplit=1)[0].lower() for d in deps if isinstance(d, str)}


def test_every_dependency_in_both_envs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    common = requirement_names(project["dependencies"] + extras["test"])
    for env, extra, faiss in (("pipeline.yaml", "cpu", "faiss-cpu"), ("pipeline-gpu.yaml", "gpu", "faiss-gpu")):
        have = env_names(REPO / "envs" / env)
        for name in common:
            conda = CONDA_NAMES.get(name, name)
            assert conda in have, f"envs/{env} lacks {conda} (pyproject.toml needs {name})"
        assert requirement_names(extras[extra])[0].startswith(faiss)
        assert faiss in have, f"envs/{env} lacks {faiss} (pyproject.toml extra [{extra}])"
