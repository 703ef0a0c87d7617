"""The registry of released files: found locally first, else fetched (through a mirror on
127.0.0.1 here), verified by checksum (or the lock file) and by the model's own loader."""

import hashlib
import logging

import pytest
import yaml

from pipeline import assets
from pipeline.download import DownloadError
from pipeline.random_weights import write_random
from pipeline.weights import fetch_weights, verify_file

from .conftest import FIXTURE_TOPK, WEIGHTS, need_shared
from .http_assets import Route, serve

HOST = "https://release.example.org"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An empty cache, no ../shared, a registry file the test fills, and a mirror to set."""
    monkeypatch.setenv("VG_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VG_WEIGHTS_PATH", raising=False)
    monkeypatch.setattr(assets, "SHARED", tmp_path / "no_shared")
    monkeypatch.setenv("VG_DOWNLOAD_RETRIES", "0")  # retries are test_download's; here they only wait on dead hosts
    path = tmp_path / "assets.yaml"
    monkeypatch.setenv("VG_ASSET_REGISTRY", str(path))

    def write(entries: dict):
        path.write_text(yaml.safe_dump(entries))
        return assets.load_registry()

    return write


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_shipped_registry_is_well_formed():
    reg = assets.load_registry(assets.REGISTRY_FILE)
    assert reg, "assets.yaml is empty"
    for a in reg.values():
        assert a.kind in ("weights", "data") and a.file and a.licence, a
        assert a.urls or a.manual, f"{a.name}: no URL and no manual step"
        assert all(u.startswith(("https://", "http://")) for u in a.urls), a.name
        assert a.sha256 is None or len(a.sha256) == 64
    # every shared file is registered with the sha256 of SHA256SUMS
    sums = dict(line.split()[::-1] for line in need_shared(WEIGHTS / "SHA256SUMS").read_text().splitlines())
    by_file = {a.file: a for a in reg.values()}
    for file, digest in sums.items():
        if file in by_file:
            assert by_file[file].sha256 in (None, digest), file


def test_fetch_verifies_with_the_loader_and_is_found_locally_next_time(registry, tmp_path, monkeypatch):
    data = need_shared(WEIGHTS / "aliked-n16.pth").read_bytes()
    registry({"aliked-n16": {"model": "aliked", "file": "aliked-n16.pth", "urls": [f"{HOST}/models/aliked-n16.pth"],
                             "sha256": sha(data), "size": len(data), "licence": "BSD-3-Clause"}})
    with serve({"/release.example.org/models/aliked-n16.pth": Route(data)}) as s:
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        got = fetch_weights("aliked-n16", progress=False)
        assert got["path"] == str(tmp_path / "cache" / "aliked-n16.pth") and got["sha256"] == sha(data)
        n = len(s.requests)
        again = fetch_weights("aliked-n16", progress=False)
        assert again["path"] == got["path"] and len(s.requests) == n  # found in the cache: no request


def test_weights_auto_in_a_conf_resolves_to_the_registered_file(registry, tmp_path, monkeypatch):
    from pipeline.local_features import build_model

    data = need_shared(WEIGHTS / "aliked-n16.pth").read_bytes()
    registry({"aliked-n16": {"model": "aliked", "file": "aliked-n16.pth", "urls": [f"{HOST}/a.pth"],
                             "sha256": sha(data), "licence": "BSD-3-Clause"}})
    monkeypatch.setenv("VG_WEIGHTS_PATH", str(WEIGHTS))  # a folder the user lists: found there, nothing fetched
    model = build_model({"name": "aliked", "weights": "auto", "max_keypoints": 64})
    by_name = build_model({"name": "aliked", "weights": "aliked-n16", "max_keypoints": 64})
    assert type(model).__name__ == type(by_name).__name__ == "ALIKED"
    assert assets.resolve_conf({"name": "aliked", "weights": "auto"})["weights"] == str(WEIGHTS / "aliked-n16.pth")


def test_auto_picks_the_file_that_fits_the_conf(registry):
    reg = registry({
        "lg-disk": {"model": "lightglue", "conf": {"features": "disk"}, "file": "d.pth", "urls": [f"{HOST}/d"],
                    "licence": "Apache-2.0"},
        "lg-aliked": {"model": "lightglue", "conf": {"features": "aliked"}, "file": "a.pth", "urls": [f"{HOST}/a"],
                      "licence": "Apache-2.0"}})
    assert assets.asset_for("lightglue", {"features": "aliked"}, reg).name == "lg-aliked"
    with pytest.raises(ValueError, match="no registered weights for lightglue"):
        assets.asset_for("lightglue", {"features": "sift"}, reg)
    # the model's defaults count: LightGlue's default features are DISK's
    from pipeline.weights import full_model_conf

    found = assets.conf_assets({"name": "lightglue", "weights": "auto"}, fill=full_model_conf)
    assert [a.name for a in found] == ["lg-disk"]


def test_a_file_of_another_model_is_refused_naming_the_file(registry, tmp_path, monkeypatch):
    wrong = tmp_path / "d2net.pth"
    write_random("d2net", wrong, 0)  # a real checkpoint layout, of another model
    data = wrong.read_bytes()
    registry({"superglue-outdoor": {"model": "superglue", "file": "superglue_outdoor.pth",
                                    "urls": [f"{HOST}/sg.pth"], "licence": "non-commercial", "non_commercial": True}})
    with serve({"/release.example.org/sg.pth": Route(data)}) as s:
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        with pytest.raises(ValueError, match=r"superglue_outdoor.pth: not superglue-outdoor's weights"):
            fetch_weights("superglue-outdoor", progress=False)
    assert not (tmp_path / "cache" / "superglue_outdoor.pth").exists()  # nothing left, nothing recorded
    assert not assets.lock_file().exists()


def test_first_use_is_locked_and_a_changed_file_is_refused(registry, tmp_path, monkeypatch, caplog):
    good = tmp_path / "sg.pth"
    write_random("superglue", good, 0)
    registry({"superglue-outdoor": {"model": "superglue", "file": "superglue_outdoor.pth",
                                    "urls": [f"{HOST}/sg.pth"], "licence": "Magic Leap non-commercial",
                                    "non_commercial": True}})
    routes = {"/release.example.org/sg.pth": Route(good.read_bytes())}
    with serve(routes) as s, caplog.at_level(logging.WARNING, logger="pipeline.assets"):
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        fetch_weights("superglue-outdoor", progress=False)
        assert "NON-COMMERCIAL" in caplog.text  # the licence, shown before the download
        locked = assets.expected_sha256(assets.find_asset("superglue-outdoor"))
        assert locked == sha(good.read_bytes())
        # the release is swapped for another file: the cached copy is fine, a new download is refused
        other = tmp_path / "sg1.pth"
        write_random("superglue", other, 1)
        routes["/release.example.org/sg.pth"].data = other.read_bytes()
        (tmp_path / "cache" / "superglue_outdoor.pth").unlink()
        with pytest.raises(DownloadError, match="wrong sha256"):
            fetch_weights("superglue-outdoor", progress=False)
    # and a swapped local file is refused too
    with pytest.raises(assets.ChecksumError, match="recorded in .*lock.json on first use"):
        verify_file(other, "superglue-outdoor")


def test_an_archive_is_unpacked_and_its_savedmodel_loads(registry, tmp_path, monkeypatch):
    """DELG's release is a tar.gz of a TF SavedModel: the model gets the extracted folder."""
    import tarfile

    write_random("delg_tf", tmp_path / "r50delg_gld_20200814", 0)
    with tarfile.open(tmp_path / "delg.tar.gz", "w:gz") as t:
        t.add(tmp_path / "r50delg_gld_20200814", arcname="r50delg_gld_20200814")
    registry({"delg": {"model": "delg_tf", "file": "r50delg_gld_20200814.tar.gz", "unpack": "variables",
                       "urls": [f"{HOST}/delf/r50delg_gld_20200814.tar.gz"], "licence": "Apache-2.0"}})
    with serve({"/release.example.org/delf/r50delg_gld_20200814.tar.gz":
                Route((tmp_path / "delg.tar.gz").read_bytes())}) as s:
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        got = fetch_weights("delg", progress=False)
    folder = tmp_path / "cache" / "delg.unpacked" / "r50delg_gld_20200814"
    assert got["path"] == str(folder) and (folder / "variables" / "variables.index").is_file()
    assert assets.locate(assets.find_asset("delg")) == folder  # found again, not re-extracted


def test_a_git_blob_id_checks_a_file_without_a_sha256(registry, tmp_path, monkeypatch):
    good = tmp_path / "sg.pth"
    write_random("superglue", good, 0)
    blob = assets.git_blob_sha1(good)
    reg = registry({"sg": {"model": "superglue", "file": "superglue_outdoor.pth", "git_sha1": blob,
                           "urls": [f"{HOST}/sg.pth"], "licence": "x"}})
    assert assets.check_file(reg["sg"], good)
    other = tmp_path / "other.pth"
    write_random("superglue", other, 1)
    with pytest.raises(assets.ChecksumError, match="git blob id"):
        assets.check_file(reg["sg"], other)


def test_no_url_works_names_the_urls_and_the_manual_step(registry, tmp_path):
    registry({"cvnet-r50": {"model": "cvnet", "file": "CVNet_R50.pyth", "urls": ["https://127.0.0.1:9/CVNet_R50.pyth"],
                            "licence": "MIT", "manual": "Google Drive link in the CVNet README"}})
    with pytest.raises(DownloadError) as e:
        assets.fetch(assets.find_asset("cvnet-r50"), progress=False)
    msg = str(e.value)
    assert "https://127.0.0.1:9/CVNet_R50.pyth" in msg and str(tmp_path / "cache" / "CVNet_R50.pyth") in msg
    assert "Google Drive link in the CVNet README" in msg


def test_weights_list_command(registry, capsys):
    from pipeline.cli import main

    registry({"x": {"model": "aliked", "file": "x.pth", "urls": [f"{HOST}/x"], "licence": "BSD-3-Clause",
                    "size": 2_000_000}})
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "x.pth" in out and "2.0 MB" in out and "missing" in out


def _topk_entry(data: bytes, **extra):
    return {"kind": "data", "format": "topk", "file": "stage1.h5", "urls": [f"{HOST}/outputs/stage1.h5"],
            "sha256": sha(data), "size": len(data), "licence": "none given", "title": "a query set", **extra}


def test_a_data_file_is_fetched_and_read_as_a_topk_file(registry, tmp_path, monkeypatch):
    data = need_shared(FIXTURE_TOPK).read_bytes()
    registry({"stage1": _topk_entry(data)})
    with serve({"/release.example.org/outputs/stage1.h5": Route(data)}) as s:
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        done = fetch_weights("stage1", progress=False)
    assert done["path"] == str(tmp_path / "cache" / "stage1.h5") and done["sha256"] == sha(data)


def test_a_data_file_that_is_no_topk_file_is_refused_and_deleted(registry, tmp_path, monkeypatch):
    data = b"not an HDF5 file at all"
    registry({"stage1": {**_topk_entry(data), "sha256": None, "size": None}})
    with serve({"/release.example.org/outputs/stage1.h5": Route(data)}) as s:
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        with pytest.raises(ValueError, match="not stage1's top-k file"):
            fetch_weights("stage1", progress=False)
    assert not (tmp_path / "cache" / "stage1.h5").exists()


def test_unavailable_files_are_named_together_with_their_urls(registry, tmp_path, monkeypatch):
    here = tmp_path / "cache" / "here.pth"
    here.parent.mkdir(parents=True)
    here.write_bytes(b"local copy")
    reg = registry({
        "here": {"file": "here.pth", "urls": [f"{HOST}/here.pth"], "licence": "MIT"},
        "served": {"file": "served.pth", "urls": [f"{HOST}/served.pth"], "licence": "MIT"},
        "gone": {"file": "gone.pth", "urls": [f"{HOST}/gone.pth"], "licence": "MIT", "size": 3_000_000,
                 "manual": "ask its authors"},
    })
    with serve({"/release.example.org/served.pth": Route(b"x" * 10)}) as s:
        monkeypatch.setenv("VG_ASSET_MIRROR", s.url)
        monkeypatch.setenv("VG_ASSET_MIRROR_ONLY", "1")
        missing = assets.unavailable(list(reg.values()), timeout=5)
        assert [a.name for a, _ in missing] == ["gone"]  # here: found; served: downloadable
        msg = assets.missing_message(missing)
    assert "gone.pth" in msg and "3.0 MB" in msg and f"{s.url}/release.example.org/gone.pth: HTTP 404" in msg
    assert f"put it at {tmp_path / 'cache' / 'gone.pth'} (ask its authors)" in msg
    assert f"{HOST}/gone.pth" not in msg  # mirror only: the official host was not tried
