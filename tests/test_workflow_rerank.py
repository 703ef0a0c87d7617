"""Stage 2 through Snakemake on the built-in synthetic dataset: re-ranking beats
retrieval, features are extracted once, a scorer change re-runs only scoring."""

import json

import pandas as pd
import pytest
import yaml

from pipeline.global_store import GlobalStore
from pipeline.rerank import needed_images

from .test_workflow import job_counts, snakemake

CONFIG = {
    "datasets": {"syn": {"root": "data/syn", "synthetic": {
        "n_streets": 3, "street_length": 100.0, "n_queries": 24, "image_size": [160, 120], "seed": 1}}},
    "global_methods": {"vlad_sift": {
        "model": {"name": "vlad", "local": {"name": "sift", "max_keypoints": 800}, "n_clusters": 32, "dim": 64},
        "extraction": {"device": "cpu", "num_workers": 0, "batch_size": 8}}},
    "local_features": {"sift": {"name": "sift", "max_keypoints": 1000}},
    "matchers": {"mnn_ratio": {"name": "mnn", "ratio": 0.9}},
    "scorers": {"ransac": {"name": "ransac", "threshold": 24}, "count": {"name": "match_count"}},
    "rerank_methods": {
        "sift_ransac": {"retrieval": "vlad_sift", "features": "sift", "matcher": "mnn_ratio", "scorer": "ransac",
                        "k": 20, "device": "cpu"},
        "sift_count": {"retrieval": "vlad_sift", "features": "sift", "matcher": "mnn_ratio", "scorer": "count",
                       "k": 10, "device": "cpu"},
    },
    # 60-image shards, deleted once gathered (retrieval.keep_shards: false): nothing re-runs for their absence
    "retrieval": {"k": 20, "shard_size": 60, "keep_shards": False},
    "evaluation": {"recall_at": [1, 5, 10, 20]},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf_rerank")
    (wd / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    code, out = snakemake(wd)
    assert code == 0, out
    counts = job_counts(out)
    return wd, counts


def test_rerank_raises_recall_at_1(project):
    wd, _ = project
    df = pd.read_csv(wd / "results" / "syn" / "sift_ransac.csv")
    base, rr = df.iloc[0], df.iloc[1]
    assert (base.method, rr.method) == ("vlad_sift", "sift_ransac")
    assert rr["R@1"] > base["R@1"], df
    assert rr["R@20"] == base["R@20"]  # re-ranking the top 20 cannot change R@20
    # no harm: queries fixed minus queries broken is the R@1 change
    assert rr["R@1_change"] == pytest.approx(rr["R@1"] - base["R@1"], abs=0.02)  # each rounded to 0.01
    assert rr["fixed@1"] - rr["broken@1"] == round(rr["R@1_change"] * rr.n_queries / 100) and rr["fixed@1"] > 0
    assert rr.rerank_k == 20 and rr.rerank_s_per_query > 0
    # time per query = extraction of the query + its 20 candidates, matching, scoring
    assert rr.extract_s_per_query > 0 and rr.match_s_per_query > 0
    assert rr.rerank_s_per_query == pytest.approx(
        rr.extract_s_per_query + rr.match_s_per_query + rr.score_s_per_query, abs=0.02)
    assert rr.weights == "none"  # SIFT + RANSAC: no weight files
    # what caching the features costs: the store's bytes per image, and for a million images
    store = json.loads((wd / "work" / "syn" / "local" / "sift.json").read_text())
    assert rr.features_bytes_per_image == pytest.approx(store["store_bytes"] / len(store["images"]), abs=1)
    assert rr.features_GB_per_1M_images == pytest.approx(rr.features_bytes_per_image / 1e3, rel=0.01)
    # the size SIFT described the images at: its default cap (the 160 px images are not enlarged)
    assert json.loads(rr.input_size) == {"resize": None, "resize_max": 1600}


def test_gathered_shards_are_dropped_and_stay_dropped(project):
    wd, _ = project
    gdir = wd / "work" / "syn" / "global" / "vlad_sift"
    # one job per shard (jobs after the index checkpoint are not in the first job table: count their logs)
    n_db = len(GlobalStore(gdir / "database.zarr"))
    shards = len(list((wd / "work" / "logs").glob("extract_syn_vlad_sift_database_*.log")))
    assert shards == -(-n_db // 60) >= 2, (shards, n_db)
    assert not list((gdir / "database").glob("shard_*")), "keep_shards: false should delete the gathered shards"
    assert "Nothing to be done" in snakemake(wd, "-n")[1]


def test_each_image_extracted_once(project):
    wd, counts = project
    # two methods use the same features (K=20 and K=10): one extraction job, one matching job
    assert counts["extract_local"] == 1 and counts["match"] == 1, counts
    info = json.loads((wd / "work" / "syn" / "local" / "sift.json").read_text())
    needed = needed_images([(wd / "work" / "syn" / "topk" / "vlad_sift.h5", 20)])
    assert info["extracted_this_run"] == len(needed) == len(info["images"])


def test_deleting_matches_rebuilds_them_and_what_follows(project):
    wd, _ = project
    (wd / "work" / "syn" / "matches" / "vlad_sift" / "sift+mnn_ratio.h5").unlink()
    code, out = snakemake(wd, "-n")
    assert code == 0, out
    assert job_counts(out) == {"match": 1, "score": 2, "rerank_results": 2}, out
    code, out = snakemake(wd)
    assert code == 0, out


def test_scorer_change_reruns_only_scoring(project):
    wd, _ = project
    assert "Nothing to be done" in snakemake(wd, "-n")[1]
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["scorers"]["ransac"]["threshold"] = 12
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = snakemake(wd, "-n")
    assert code == 0, out
    assert job_counts(out) == {"score": 1, "rerank_results": 1}, out


def _browser():
    import shutil

    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


def test_reports_target_builds_the_html_report(project):
    import re
    import subprocess

    wd, _ = project
    code, out = snakemake(wd, "reports")
    assert code == 0, out
    report = wd / "results" / "report"
    pages = sorted(report.rglob("*.html"))
    assert report / "index.html" in pages and report / "syn" / "index.html" in pages
    for page in pages:  # every image a page references exists
        for src in re.findall(r'<img src="([^"]+)"', page.read_text()):
            assert (page.parent / src).is_file(), (page, src)
    # the numbers behind the plots are the pipeline's results
    res = {m: pd.read_csv(wd / "results" / "syn" / f"{m}.csv").iloc[1] for m in ("sift_ransac", "sift_count")}
    t = pd.read_csv(report / "syn" / "recall_vs_time.csv").set_index("method")
    for m, r in res.items():
        assert t.loc[m, "R@1"] == pytest.approx(r["R@1"], abs=0.01)
        assert t.loc[m, "seconds_per_query"] == pytest.approx(r.rerank_s_per_query, abs=0.01)
    curves = pd.read_csv(report / "syn" / "recall_vs_k.csv")
    for m, k in (("sift_ransac", 20), ("sift_count", 10)):
        c = curves[curves.method == m].set_index("K")
        assert c.index.max() == k
        assert c.loc[k, "reranked_R@1"] == pytest.approx(res[m]["R@1"], abs=0.01)  # replaying K = the run
        assert c.loc[1, "reranked_R@1"] == pytest.approx(c.loc[1, "retrieval_R@1"])  # K=1 changes nothing
    # uncertainty of the retrieval: SUE, L2, ratio and each method's score of the top-1, with their AUC-PR
    auc = pd.read_csv(report / "syn" / "uncertainty" / "vlad_sift_auc_pr.csv").set_index("signal")
    assert set(auc.index) == {"l2", "ratio", "sue", "sift_ransac", "sift_count"} and auc.auc_pr.between(0, 1).all()
    assert "Is the top-1 right?" in (report / "syn" / "index.html").read_text()
    # risk-coverage: re-ranking none is retrieval alone, re-ranking all is the method's R@1
    rc = pd.read_csv(report / "syn" / "uncertainty" / "vlad_sift_sift_ransac_risk_coverage.csv")
    base_r1 = pd.read_csv(wd / "results" / "syn" / "sift_ransac.csv").iloc[0]["R@1"]
    assert set(rc.signal) == {"l2", "ratio", "sue", "sift_ransac", "sift_count"}
    for _, g in rc.groupby("signal"):
        assert g["R@1"].iloc[0] == pytest.approx(base_r1, abs=0.01)
        assert g["R@1"].iloc[-1] == pytest.approx(res["sift_ransac"]["R@1"], abs=0.01)
        assert g.est_seconds_per_query.iloc[-1] == pytest.approx(res["sift_ransac"].rerank_s_per_query, abs=0.01)
    # the signals as a stage of their own (rule uncertainty): the report's numbers
    code, out = snakemake(wd, "results/syn/uncertainty/vlad_sift_auc_pr.csv")
    assert code == 0, out
    stage = pd.read_csv(wd / "results" / "syn" / "uncertainty" / "vlad_sift_auc_pr.csv").set_index("signal")
    pd.testing.assert_series_equal(stage.auc_pr.sort_index(), auc.auc_pr.sort_index(), atol=1e-9)
    assert (wd / "results" / "syn" / "uncertainty" / "vlad_sift_pr.png").stat().st_size > 0
    assert "R@1 change" in (report / "syn" / "index.html").read_text()  # the no-harm columns
    per_dataset = pd.read_csv(wd / "results" / "syn" / "summary_table.csv").set_index("method")
    assert set(per_dataset.index) == {"vlad_sift", "sift_ransac", "sift_count"}
    table = pd.read_csv(report / "summary_table.csv").set_index("method")
    assert table.loc["sift_ransac", "syn R@1"] == pytest.approx(res["sift_ransac"]["R@1"], abs=0.01)
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium (CI installs chromium-headless-shell)")
    for page in (report / "index.html", report / "syn" / "index.html"):
        dom = subprocess.run([browser, "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        assert 'data-rendered="1"' in dom, dom[:500]
        assert 'data-loaded="0"' not in dom  # every figure decoded in the browser
    assert 'data-loaded="1"' in dom


def test_matches_are_keyed_by_pair(project):
    """Raising K matches only the new pairs; a second retrieval matches only the pairs the first lacked."""
    import shutil

    import numpy as np

    from pipeline.match_store import MatchView
    from pipeline.topk import TopK, read_topk, write_topk

    wd, _ = project
    syn = wd / "work" / "syn"
    shutil.rmtree(syn / "matches")  # views and the pair store: start from no matches at all
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["rerank_methods"]["sift_ransac"]["k"] = 10
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = snakemake(wd)
    assert code == 0, out
    first = read_topk(syn / "topk" / "vlad_sift.h5")

    def pairs(t, k):
        return {(q, c) for q, row in zip(t.query_names, t.candidate_names) for c in row[:k]}

    view = MatchView(syn / "matches" / "vlad_sift" / "sift+mnn_ratio.h5")
    assert view.k == 10 and view.info["pairs_matched_this_run"] == len(pairs(first, 10))
    assert view.info["pairs_reused"] == 0

    # a second retrieval: the first's candidates from rank 5 on (ranks 10-14 are new pairs at K=10)
    shifted = TopK(first.query_names, np.roll(first.candidate_names, -5, 1), np.roll(first.candidate_index, -5, 1),
                   np.roll(first.distances, -5, 1))
    write_topk(wd / "shifted.h5", shifted)
    cfg["global_methods"]["shifted"] = {"import": {"syn": str(wd / "shifted.h5")}}
    cfg["rerank_methods"]["sift_shifted"] = {"retrieval": "shifted", "features": "sift", "matcher": "mnn_ratio",
                                             "scorer": "count", "k": 10, "device": "cpu"}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = snakemake(wd)
    assert code == 0, out
    view2 = MatchView(syn / "matches" / "shifted" / "sift+mnn_ratio.h5")
    new = pairs(shifted, 10) - pairs(first, 10)
    assert view2.info["pairs_matched_this_run"] == len(new) > 0
    assert view2.info["pairs_reused"] == len(pairs(shifted, 10)) - len(new)

    # raising the first retrieval's K to 20 matches exactly the pairs neither list had at K=10
    cfg["rerank_methods"]["sift_ransac"]["k"] = 20
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = snakemake(wd)
    assert code == 0, out
    view3 = MatchView(syn / "matches" / "vlad_sift" / "sift+mnn_ratio.h5")
    assert view3.k == 20
    assert view3.info["pairs_matched_this_run"] == len(pairs(first, 20) - pairs(first, 10) - pairs(shifted, 10))
    # a shared pair has one set of matches, whichever view reads it
    qi = 0
    c = shifted.candidate_names[qi, 0]  # rank 5 of the first list
    np.testing.assert_array_equal(view2.pair(qi, 0), view3.pair(qi, list(first.candidate_names[qi]).index(c)))
    assert "Nothing to be done" in snakemake(wd, "-n")[1]


def test_a_gate_sends_only_uncertain_queries_to_stage2(project):
    """Gated copies of sift_ransac: re-ranking none gives the retrieval's results, a threshold
    between re-ranks that share and matches only their pairs (every query: tests/test_rerank.py)."""
    import math

    import numpy as np

    from pipeline.topk import read_topk

    wd, _ = project
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    retrieval = read_topk(wd / "work" / "syn" / "topk" / "vlad_sift.h5")
    median = float(np.median(-np.sqrt(retrieval.distances[:, 0])))
    for name, gate in (("gated_none", {"threshold": -math.inf}), ("gated_half", {"threshold": median}),
                       ("gated_fit", {"fit": {"dataset": "syn", "p_right": 0.5}}),
                       ("gated_inliers", {"signal": "inliers", "threshold": 20})):
        cfg["rerank_methods"][name] = {**cfg["rerank_methods"]["sift_ransac"], "gate": {"signal": "l2", **gate}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/syn/{m}.csv" for m in ("gated_none", "gated_half", "gated_fit", "gated_inliers")]
    code, out = snakemake(wd, *targets)
    assert code == 0, out
    assert job_counts(out)["gate"] == 4 and job_counts(out)["gate_fit"] == 1
    # the inliers gate: the method's own RANSAC inliers with each query's top-1 (one pair per
    # query, from the shared stores), the same numbers the full re-ranking gave that pair
    from pipeline.uncertainty import top1_scores

    inliers = top1_scores(retrieval, wd / "work" / "syn" / "rerank" / "sift_ransac.h5")
    gated = pd.read_csv(wd / "results" / "syn" / "gated_inliers.csv").iloc[1]
    assert gated.gate == "inliers < 20"
    assert gated.fraction_reranked == pytest.approx(np.mean(inliers < 20), abs=0.01)
    # a learnt threshold: the logistic model fitted on the dataset's retrieval decides
    fit = json.loads((wd / "work" / "syn" / "gate_fit" / "gated_fit.json").read_text())
    fitted = pd.read_csv(wd / "results" / "syn" / "gated_fit.csv").iloc[1]
    assert fitted.fraction_reranked == pytest.approx(fit["fraction_reranked_here"], abs=0.01)  # CSV: 2 decimals
    assert fitted.gate == f"l2 < {fit['threshold']:g}"
    res = {m: pd.read_csv(wd / "results" / "syn" / f"{m}.csv").iloc[1] for m in ("gated_none", "gated_half")}
    base = pd.read_csv(wd / "results" / "syn" / "sift_ransac.csv").iloc[0]
    assert res["gated_none"]["R@1"] == base["R@1"] and res["gated_none"].fraction_reranked == 0  # none: retrieval
    assert res["gated_none"].match_s_per_query == 0
    half = res["gated_half"]
    assert 0 < half.fraction_reranked < 1 and half.gate == f"l2 < {median:g}"
    from pipeline.match_store import MatchView

    view = MatchView(wd / "work" / "syn" / "matches" / "vlad_sift~gated_half" / "sift+mnn_ratio.h5")
    assert view.info["n_queries"] == round(half.fraction_reranked * len(retrieval)) < len(retrieval)
    assert view.info["pairs_matched_this_run"] == 0  # sift_ransac had matched every pair: reused
