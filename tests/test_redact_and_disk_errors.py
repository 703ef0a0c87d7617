"""Secrets are redacted from every log line; disk errors name the output that failed."""

from __future__ import annotations

import errno
import logging

import pytest

from pipeline.io import atomic_path, write_json
from pipeline.redact import RedactSecrets, install, redact


@pytest.mark.parametrize("line, secret", [
    ("https://api.flickr.com/services/rest/?method=flickr.photos.search&api_key=0123abcd&bbox=1,2,3,4", "0123abcd"),
    ('"GET /services/rest/?format=json&api_key=deadbeef99&page=2 HTTP/1.1" 200 None', "deadbeef99"),
    ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi.payload.sig"),
    ("token=s3cr3t; password=hunter2", "hunter2"),
    ('{"api_key": "abc123def"}', "abc123def"),
])
def test_redact(line, secret):
    out = redact(line)
    assert secret not in out and "***" in out


def test_third_party_debug_lines_are_redacted(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    old_level = root.level
    try:
        root.setLevel(logging.DEBUG)
        install()
        assert any(isinstance(f, RedactSecrets) for f in handler.filters)
        # urllib3 logs the request line with %-arguments, at DEBUG
        logging.getLogger("urllib3.connectionpool").debug(
            '%s://%s:%s "%s %s %s" %s %s', "https", "api.flickr.com", 443, "GET",
            "/services/rest/?method=flickr.photos.search&api_key=0123abcd&page=1", "HTTP/1.1", 200, None)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    err = capsys.readouterr().err
    assert "api.flickr.com" in err and "api_key=***" in err and "0123abcd" not in err


def test_disk_full_names_the_output(tmp_path):
    out = tmp_path / "results" / "table.csv"
    with pytest.raises(OSError) as e:
        with atomic_path(out) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk raises mid-write
    assert e.value.errno == errno.ENOSPC and str(out) in str(e.value)
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))  # nothing half-written left
    # other errors pass through unchanged
    with pytest.raises(OSError, match="^boom$"):
        with atomic_path(out):
            raise OSError("boom")
    write_json(out.with_suffix(".json"), {"ok": 1})


def test_the_reason_reaches_stdout_when_the_log_disk_is_full(tmp_path):
    """A rule's stderr goes to its log on the work disk; on a full disk (here /dev/full, where
    every write fails with ENOSPC) the reason still reaches Snakemake's output via stdout."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    repo = Path(__file__).resolve().parents[1]
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", str(tmp_path / "missing.h5")],
                           cwd=repo, stdout=subprocess.PIPE, stderr=full, text=True)
    assert r.returncode != 0
    assert "python -m pipeline evaluate: error:" in r.stdout and "missing.h5" in r.stdout, r.stdout
