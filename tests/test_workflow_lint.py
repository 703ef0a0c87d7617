"""`snakemake --lint` finds nothing: named inputs in shell commands, the command prefix through
params, helper functions only in common.smk / paths.smk, a log for every rule."""

import subprocess

import pytest

from .conftest import REPO


@pytest.mark.slow  # .ci/run runs `snakemake --lint` itself before the suite
def test_snakemake_lint_is_clean():
    r = subprocess.run(["snakemake", "--lint", "--snakefile", str(REPO / "Snakefile"), "-d", str(REPO)],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Lints for" not in out, out
