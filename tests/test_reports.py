"""Reports: the summary table, recall vs time and recall vs K, checked on their data."""

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluate import write_results
from pipeline.reports import plots, summary
from pipeline.topk import TopK, write_topk

from .conftest import vg_name

E0, N0 = 550000.0, 4180000.0


def _results(tmp_path):
    d = tmp_path / "results" / "demo"
    write_results(d / "vlad.csv", [{"method": "vlad", "dataset": "demo", "R@1": 40.0, "R@5": 60.0, "R@10": 70.0,
                                    "R@100": 95.0, "n_queries": 10, "k": 100}])
    conf = {"method": {"retrieval": "vlad", "k": 20}, "features": {"name": "sift"}, "matcher": {"name": "mnn"},
            "scorer": {"name": "ransac"}}
    base = {"method": "vlad", "dataset": "demo", "R@1": 40.0, "R@5": 60.0, "R@10": 70.0, "R@100": 95.0,
            "rerank_k": 0, "rerank_s_per_query": 0.0}
    write_results(d / "sift_ransac.csv", [base, {
        "method": "sift_ransac", "dataset": "demo", "R@1": 55.0, "R@5": 66.0, "R@10": 70.0, "R@100": 95.0,
        "broken@1": 1, "fixed@1": 16, "R@1_change": 15.0, "rerank_k": 20, "rerank_s_per_query": 1.5, "extract_s_per_query": 1.0, "match_s_per_query": 0.4,
        "score_s_per_query": 0.1, "weights": "none", "conf": conf}])
    write_results(d / "loftr.csv", [base, {
        "method": "loftr", "dataset": "demo", "R@1": 45.0, "R@5": 62.0, "R@10": 70.0, "R@100": 95.0,
        "rerank_k": 20, "rerank_s_per_query": 3.0, "extract_s_per_query": 0.0, "match_s_per_query": 2.9,
        "score_s_per_query": 0.1, "weights": "RANDOM untrained weights (loftr seed 0): recalls are not meaningful",
        "conf": {**conf, "features": None, "matcher": {"name": "loftr"}}}])
    return sorted(d.glob("*.csv"))


def test_summary_table_has_the_thesis_shape(tmp_path):
    files = summary.write_summary(_results(tmp_path), tmp_path / "out")
    table = pd.read_csv(files["table"])
    assert list(table.method) == ["vlad", "loftr", "sift_ransac"]  # the retrieval baseline first
    row = table.set_index("method").loc["sift_ransac"]
    assert (row["demo R@1"], row["demo R@5"], row["demo R@10"]) == (55.0, 66.0, 70.0)
    assert (row.extractor, row.matcher, row.scorer) == ("sift", "mnn", "ransac")
    assert table.set_index("method").loc["loftr"].extractor == "- (images)"
    md = open(files["markdown"]).read()
    assert "demo: retrieval R@100 = 95.0" in md and "RANDOM untrained weights" in md and "loftr" in md
    assert '<tr class="random"><td>loftr' in open(files["html"]).read()
    # no harm: the R@1 change with the queries broken and fixed, beside the recalls
    assert (row["demo R@1 change"], row["demo broken@1"], row["demo fixed@1"]) == (15.0, 1, 16)
    assert "| sift_ransac | sift | mnn + ransac | 55.0 | 66.0 | 70.0 | +15.0 (1/16) |" in md
    assert "<td>+15.0 (1/16)</td>" in open(files["html"]).read()


def test_recall_vs_time_data(tmp_path):
    df = summary.read_results(_results(tmp_path))
    out = plots.recall_vs_time(df, "demo", tmp_path / "fig" / "recall_vs_time")
    data = pd.read_csv(out["csv"])
    assert list(data.method) == ["sift_ransac", "loftr"]  # by time
    assert list(data.seconds_per_query) == [1.5, 3.0] and list(data["R@1"]) == [55.0, 45.0]
    assert list(data.random_weights) == [False, True]
    assert all(open(p, "rb").read(4) in (b"\x89PNG", b"<?xm") for p in out["figures"])


def _topks(tmp_path):
    """3 queries, 4 candidates each; True = within 25 m of the query."""
    correct = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], bool)
    q = [vg_name(E0 + 1000 * i, N0, pano_id=f"q{i}") for i in range(3)]
    c = np.array([[vg_name(E0 + 1000 * i + (5 if correct[i, r] else 300 + r), N0, pano_id=f"c{i}{r}")
                   for r in range(4)] for i in range(3)])
    idx = np.arange(12).reshape(3, 4)
    base = TopK(np.array(q), c, idx, np.zeros((3, 4), np.float32), {})
    write_topk(tmp_path / "base.h5", base)
    # re-ranking scores per retrieval rank; the re-ranked file lists the candidates by score
    scores = np.array([[1.0, 0.0, 5.0, 2.0], [3.0, 3.0, 0.0, 9.0], [0.0, 1.0, 2.0, 3.0]])
    order = np.argsort(-scores, axis=1, kind="stable")
    rows = np.arange(3)[:, None]
    rr = TopK(np.array(q), c[rows, order], idx[rows, order], np.zeros((3, 4), np.float32), {"rerank_k": 4})
    write_topk(tmp_path / "rr.h5", rr, extra={"rerank_scores": np.take_along_axis(scores, order, 1)})
    return tmp_path / "base.h5", tmp_path / "rr.h5"


def test_recall_at_1_by_k_replays_smaller_k(tmp_path):
    base, rr = _topks(tmp_path)
    curve = plots.recall_at_1_by_k(base, rr).set_index("K")
    # K=1: retrieval's top-1 (query 1 correct); K=2: q1 tie 3.0/3.0 keeps rank 0 (correct);
    # K=3: q0 picks rank 2 (correct), q1 rank 0; K=4: q1 picks rank 3 (wrong), q2 picks rank 3 (correct)
    assert list(curve["reranked_R@1"].round(2)) == [33.33, 33.33, 66.67, 66.67]
    assert list(curve["upper_bound_R@K"].round(2)) == [33.33, 33.33, 66.67, 100.0]
    assert (curve["retrieval_R@1"].round(2) == 33.33).all()
    out = plots.recall_vs_k({"m": curve.reset_index()}, "demo", tmp_path / "recall_vs_k")
    assert len(pd.read_csv(out["csv"])) == 4


def test_recall_at_1_by_k_needs_a_reranked_file(tmp_path):
    base, _ = _topks(tmp_path)
    with pytest.raises(ValueError, match="not a re-ranked top-k file"):
        plots.recall_at_1_by_k(base, base)
