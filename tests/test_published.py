"""The thesis's published stage-1 files beside their published recalls: reproduced to the
printed precision, a difference is an error, a file that is not here gets a row saying how
to fetch it."""

import pandas as pd
import pytest
import yaml

from pipeline import assets
from pipeline.published import NotReproduced, published_assets, published_recalls, stage1_table

from .conftest import FIXTURE_TOPK, need_shared

OCCLUSION = "thesis-cosplace-sfxl-occlusion"


def test_the_registry_has_the_seven_published_files_pinned_to_one_commit():
    pub = published_assets(assets.load_registry(assets.REGISTRY_FILE))
    assert len(pub) == 7
    for a in pub:
        assert a.kind == "data" and a.format == "topk" and a.git_sha1 and len(a.git_sha1) == 40
        assert all("2cc10625de07bffe10a4c7d8afbd54dd4112431c" in u for u in a.urls), a.name
        ns, values, tol = published_recalls(a)
        assert ns == [1, 5, 10, 100] and all(0 <= v <= 100 for v in values) and values == sorted(values)
        # the query count implies the printed recalls (hits / queries)
        n = a.published["n_queries"]
        assert all(abs(round(v * n / 100) - v * n / 100) < 1e-4 for v in values), a.name


def test_precision_is_the_printed_one():
    a = assets.Asset("x", "x.h5", (), published={"recall_at": [1, 5], "recalls": "80.         88.57142857"})
    assert published_recalls(a) == ([1, 5], [80.0, 88.57142857], pytest.approx(5e-9))
    a = assets.Asset("x", "x.h5", (), published={"recall_at": [1, 5], "recalls": "[76.7 82.5]"})
    assert published_recalls(a)[2] == pytest.approx(0.05)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """The shipped entry of the occlusion file (optionally changed), the fixture as its local copy."""
    need_shared(FIXTURE_TOPK)
    monkeypatch.setenv("VG_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VG_WEIGHTS_PATH", str(FIXTURE_TOPK.parent))
    monkeypatch.setattr(assets, "SHARED", tmp_path / "no_shared")
    shipped = yaml.safe_load(assets.REGISTRY_FILE.read_text())

    def write(published=None, names=(OCCLUSION, "thesis-cosplace-tokyo247-night")):
        entries = {n: dict(shipped[n]) for n in names}
        if published:
            entries[OCCLUSION]["published"] = {**entries[OCCLUSION]["published"], **published}
        (tmp_path / "assets.yaml").write_text(yaml.safe_dump(entries))
        monkeypatch.setenv("VG_ASSET_REGISTRY", str(tmp_path / "assets.yaml"))

    return write


def test_the_occlusion_file_reproduces_and_a_missing_file_gets_a_row(registry, tmp_path, capsys):
    registry()
    rows = stage1_table(None, tmp_path / "stage1.csv")
    df = pd.read_csv(tmp_path / "stage1.csv").set_index("asset")
    occ = df.loc[OCCLUSION]
    assert occ.status == "reproduced" and occ.n_queries == 76 == occ.n_queries_published
    assert occ["R@1"] == pytest.approx(26.31578947, abs=5e-9) and occ["R@10"] == pytest.approx(46.05263158, abs=5e-9)
    # on these real night/occlusion photos every retrieval signal predicts a right top-1 better
    # than chance (the share of right top-1s); measured: l2 0.625, SUE 0.604, ratio 0.422
    chance = occ.top1_right_pct / 100
    assert chance == pytest.approx(occ["R@1"] / 100, abs=1e-4)
    assert occ["AUC-PR_l2"] > 2 * chance and occ["AUC-PR_sue"] > 2 * chance and occ["AUC-PR_ratio"] > chance
    assert occ["AUC-PR_l2"] == pytest.approx(0.625, abs=1e-3) and occ["AUC-PR_sue"] == pytest.approx(0.604, abs=1e-3)
    assert df.loc["thesis-cosplace-tokyo247-night"].status.startswith(
        "not here: python -m pipeline assets fetch thesis-cosplace-tokyo247-night (https://")
    assert len(rows) == 2 and "reproduced" in capsys.readouterr().out


def test_a_difference_is_an_error_naming_the_file(registry, tmp_path):
    registry({"recalls": "26.31578947 38.15789474 46.05263159 60.52631579"})  # R@10 off in the last decimal
    with pytest.raises(NotReproduced, match="SF-XL test occlusion queries +DIFFERENT"):
        stage1_table([OCCLUSION], tmp_path / "stage1.csv")
    assert pd.read_csv(tmp_path / "stage1.csv").status[0] == "DIFFERENT"  # the table is there to read


def test_another_query_count_is_a_difference(registry, tmp_path):
    registry({"n_queries": 77})
    with pytest.raises(NotReproduced, match="76 queries, published 77"):
        stage1_table([OCCLUSION])


def test_the_report_shows_the_real_photo_recalls_and_signals(registry, tmp_path):
    from pipeline.reports.html import published_block

    registry()
    stage1_table(None, tmp_path / "stage1.csv")
    block = published_block(tmp_path / "stage1.csv", tmp_path / "report")
    assert "The thesis's stage-1 files (real photos)" in block
    occ = pd.read_csv(tmp_path / "stage1.csv").set_index("asset").loc[OCCLUSION]
    assert f"<td>{occ['AUC-PR_sue']:.3f}</td>" in block and f"<td>{occ['AUC-PR_l2']:.3f}</td>" in block
    assert "26.32 (26.31578947)" in block and "not here: python -m pipeline assets fetch" in block
    assert published_block(tmp_path / "missing.csv", tmp_path) == ""
