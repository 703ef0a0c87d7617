"""Downloads against a local server: resume, retries, mirrors, redirects, confirmation pages,
checksums, and the error when every URL fails."""

import hashlib
import os

import pytest

from pipeline.download import ChecksumError, DownloadError, download, mirrored, probe

from .http_assets import Route, serve

DATA = os.urandom(3 * (1 << 20) + 12345)  # a few MB: several chunks
SHA = hashlib.sha256(DATA).hexdigest()


def fetch(server, paths, dest, **kw):
    return download([server.url + p for p in paths], dest, progress=False, backoff=0.01, **kw)


def test_plain_download_is_verified_and_atomic(tmp_path):
    with serve({"/w.pth": Route(DATA)}) as s:
        r = fetch(s, ["/w.pth"], tmp_path / "w.pth", sha256=SHA, size=len(DATA))
    assert (tmp_path / "w.pth").read_bytes() == DATA and r.sha256 == SHA
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]  # no part file left


def test_a_cut_connection_resumes_with_a_range_request(tmp_path):
    with serve({"/w.pth": Route(DATA, cut_after=1_000_000)}) as s:
        fetch(s, ["/w.pth"], tmp_path / "w.pth", sha256=SHA)
        ranges = [r for p, r in s.requests if p == "/w.pth"]
    assert (tmp_path / "w.pth").read_bytes() == DATA
    assert ranges[0] is None and ranges[1].startswith("bytes=") and 900_000 <= int(ranges[1][6:-1]) <= 1_000_000


def test_an_interrupted_run_resumes_from_its_part_file(tmp_path):
    (tmp_path / "w.pth.part").write_bytes(DATA[:2_000_000])  # what a killed run left
    with serve({"/w.pth": Route(DATA)}) as s:
        r = fetch(s, ["/w.pth"], tmp_path / "w.pth", sha256=SHA)
        assert s.requests == [("/w.pth", "bytes=2000000-")]
    assert r.resumed_from == 2_000_000 and (tmp_path / "w.pth").read_bytes() == DATA


def test_a_server_without_ranges_restarts_the_file(tmp_path):
    (tmp_path / "w.pth.part").write_bytes(b"x" * 1000)  # not even the right bytes
    with serve({"/w.pth": Route(DATA, ranges=False)}) as s:
        fetch(s, ["/w.pth"], tmp_path / "w.pth", sha256=SHA)
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_404_then_a_working_mirror(tmp_path):
    with serve({"/mirror/w.pth": Route(DATA)}) as s:
        r = fetch(s, ["/dead/w.pth", "/mirror/w.pth"], tmp_path / "w.pth", sha256=SHA)
    assert r.url.endswith("/mirror/w.pth") and "404" in r.attempts[0].error


def test_redirect_is_followed(tmp_path):
    with serve({"/releases/w.pth": Route(redirect="/storage/abc"), "/storage/abc": Route(DATA)}) as s:
        fetch(s, ["/releases/w.pth"], tmp_path / "w.pth", sha256=SHA)
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_confirmation_page_is_followed(tmp_path):
    with serve({"/uc": Route(DATA, confirm=True)}) as s:
        fetch(s, ["/uc"], tmp_path / "w.pth", sha256=SHA)
        assert any(p == "/uc" for p, _ in s.requests)
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_wrong_checksum_is_refused_and_nothing_is_left(tmp_path):
    with serve({"/w.pth": Route(DATA)}) as s, pytest.raises(DownloadError, match="wrong sha256") as e:
        fetch(s, ["/w.pth"], tmp_path / "cache" / "w.pth", sha256="0" * 64)
    assert "put it at" in str(e.value) and os.listdir(tmp_path / "cache") == []
    with serve({"/w.pth": Route(DATA)}) as s, pytest.raises(DownloadError, match="wrong size"):
        fetch(s, ["/w.pth"], tmp_path / "cache" / "w.pth", size=len(DATA) + 1)
    assert os.listdir(tmp_path / "cache") == []


def test_every_url_failing_names_each_url_and_the_manual_step(tmp_path):
    with serve({"/busy": Route(status=503)}) as s:
        urls = [s.url + "/gone", s.url + "/busy"]
        with pytest.raises(DownloadError) as e:
            download(urls, tmp_path / "w.pth", progress=False, retries=2, backoff=0.01, manual="from the authors' page")
        busy = [p for p, _ in s.requests if p == "/busy"]
    msg = str(e.value)
    assert all(u in msg for u in urls) and "404" in msg and "503" in msg and "after 2 retries" in msg
    assert f"put it at {tmp_path / 'w.pth'}" in msg and "from the authors' page" in msg
    assert len(busy) == 3  # a 503 is retried, a 404 is not


def test_no_server_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="cannot connect"):
        download(["http://127.0.0.1:9/w.pth"], tmp_path / "w.pth", progress=False, retries=1, backoff=0.01)


def test_an_html_page_is_not_taken_for_the_file(tmp_path):
    with serve({"/page": Route(b"<html>login</html>")}) as s:
        s.routes["/page"].data = b"<html><body>please log in</body></html>"
        # served as octet-stream: only a checksum can tell; as text/html it is refused outright
        with pytest.raises(DownloadError, match="wrong sha256"):
            fetch(s, ["/page"], tmp_path / "w.pth", sha256=SHA)


def test_mirror_rewrites_every_url_and_tries_it_first(monkeypatch):
    monkeypatch.setenv("VG_ASSET_MIRROR", "http://127.0.0.1:8000/m/")
    assert mirrored(["https://github.com/a/b/releases/download/v1/x.pth"]) == [
        "http://127.0.0.1:8000/m/github.com/a/b/releases/download/v1/x.pth",
        "https://github.com/a/b/releases/download/v1/x.pth"]
    monkeypatch.delenv("VG_ASSET_MIRROR")
    assert mirrored(["https://x/y"]) == ["https://x/y"]


def test_checksum_error_type():
    assert issubclass(ChecksumError, ValueError)


def test_mirror_only_never_names_the_official_hosts(monkeypatch):
    monkeypatch.setenv("VG_ASSET_MIRROR", "http://127.0.0.1:8000")
    monkeypatch.setenv("VG_ASSET_MIRROR_ONLY", "1")
    assert mirrored(["https://a.org/x.pth"]) == ["http://127.0.0.1:8000/a.org/x.pth"]


def test_probe_says_which_url_answers_and_why_the_others_do_not(monkeypatch):
    monkeypatch.delenv("VG_ASSET_MIRROR", raising=False)
    with serve({"/b/x.pth": Route(b"x" * 100)}) as s:
        url, attempts = probe([f"{s.url}/a/x.pth", f"{s.url}/b/x.pth"], timeout=5)
        assert url == f"{s.url}/b/x.pth"
        assert [(a.url, a.error) for a in attempts] == [(f"{s.url}/a/x.pth", "HTTP 404")]
        assert s.requests[-1] == ("/b/x.pth", "bytes=0-0")  # one byte asked for, not the file
    url, attempts = probe(["http://127.0.0.1:9/x.pth"], timeout=5)
    assert url is None and "Connection refused" in attempts[0].error
