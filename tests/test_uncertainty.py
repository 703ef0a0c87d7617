"""Uncertainty signals of a retrieval (is the top-1 right?): SUE and AUC-PR as the SUE authors
compute them (upstream's code on seeded inputs: tests/reference/make_uncertainty_reference.py),
and the signals on the thesis's real stage-1 output."""

import numpy as np
import pandas as pd
import pytest

from pipeline.topk import TopK, read_topk
from pipeline.uncertainty import auc_pr, local_offsets, signals, sue

from .conftest import FIXTURE_TOPK, need_shared, vg_name



@pytest.fixture(scope="module")
def ref():
    from pathlib import Path

    return np.load(Path(__file__).parent / "fixtures" / "uncertainty_reference.npz")


def topk_of(ref) -> TopK:
    poses, preds = ref["ref_poses"], ref["preds"]
    names = np.array([[vg_name(*poses[j], pano_id=f"r{j}") for j in row] for row in preds])
    queries = [vg_name(*poses[row[0]], pano_id=f"q{i}") for i, row in enumerate(preds)]
    return TopK(queries, names, preds, ref["dists"] ** 2)  # top-k files keep squared L2


def test_sue_matches_the_authors_code(ref):
    got = sue(topk_of(ref))
    # names keep positions to the centimetre: the variance agrees to 1e-4 (spreads of kilometres)
    np.testing.assert_allclose(got, ref["sue"], rtol=1e-4)
    assert (ref["sue"] > 0).all() and np.ptp(ref["sue"]) > 1e4  # the inputs exercise the weights and the clip


def test_auc_pr_matches_scikit_learn(ref):
    for conf, want in zip(ref["confidences"], ref["auc_pr"]):
        assert auc_pr(ref["right"], conf) == pytest.approx(float(want), abs=1e-12)


def test_auc_pr_limits():
    right = np.array([True, True, False, False])
    assert auc_pr(right, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(1.0)  # a perfect signal
    assert np.isnan(auc_pr(np.zeros(4, bool), np.arange(4.0)))  # no top-1 right: undefined
    assert auc_pr(right, np.array([0.9, np.nan, 0.2, 0.1])) == pytest.approx(1.0)  # NaN signals left out


def test_offsets_across_utm_zones_are_metres_on_the_ground():
    # the top-1 just west of the zone 10/11 boundary (120 W), a candidate 100 m east of it in zone 11
    import utm

    lat, lon = 37.0, -120.0005
    e0, n0, z0, l0 = utm.from_latlon(lat, lon)
    e1, n1, z1, l1 = utm.from_latlon(lat, lon + 100 / (111320 * np.cos(np.radians(lat))))
    assert (z0, z1) == (10, 11)
    names = np.array([[vg_name(e0, n0, z0, l0, pano_id="a"), vg_name(e1, n1, z1, l1, pano_id="b")]])
    off = local_offsets(TopK([names[0, 0]], names, np.zeros((1, 2)), np.zeros((1, 2))))
    np.testing.assert_allclose(off[0, 1], [100.0, 0.0], atol=0.5)


def test_signals_on_the_thesis_stage1_output(tmp_path):
    topk = read_topk(need_shared(FIXTURE_TOPK))
    sig = signals(topk)
    assert len(sig["query"]) == 76 and sig["top1_right"].mean() == pytest.approx(0.2631578947)  # R@1 26.3
    for name in ("l2", "ratio", "sue"):
        assert np.isfinite(sig[name]).all()
        # every signal beats chance (the share of right top-1s) on this set
        assert auc_pr(sig["top1_right"], sig[name]) > sig["top1_right"].mean()
    from pipeline.uncertainty import write_tables

    rows = write_tables(sig, tmp_path / "s.csv", tmp_path / "auc.csv", tmp_path / "pr.png")
    assert [r["signal"] for r in rows] == ["l2", "ratio", "sue"]
    assert pd.read_csv(tmp_path / "auc.csv").auc_pr.between(0, 1).all() and (tmp_path / "pr.png").stat().st_size > 1000


def test_inliers_of_the_retrieval_top1_come_from_the_reranked_file(tmp_path):
    from pipeline.topk import write_topk
    from pipeline.uncertainty import top1_scores

    e, n = 550000.0, 4180000.0
    cands = np.array([[vg_name(e + 10 * j, n + i, pano_id=f"c{i}{j}") for j in range(3)] for i in range(3)])
    retrieval = TopK([vg_name(e, n + i, pano_id=f"q{i}") for i in range(3)], cands, np.zeros((3, 3)), np.ones((3, 3)))
    order = np.array([[2, 0, 1], [0, 1, 2]])  # q0 and q1 re-ranked; q2 not in the re-ranked list
    scores = np.array([[50.0, 7.0, 3.0], [12.0, 9.0, 1.0]])
    reranked = TopK(retrieval.query_names[:2], np.take_along_axis(cands[:2], order, 1), np.zeros((2, 3)),
                    np.ones((2, 3)), {"rerank_k": 3})
    write_topk(tmp_path / "rr.h5", reranked, extra={"rerank_scores": scores})
    got = top1_scores(retrieval, tmp_path / "rr.h5")
    np.testing.assert_array_equal(got[:2], [7.0, 12.0])  # the score of each query's retrieval top-1
    assert np.isnan(got[2])


def test_risk_coverage_reranks_the_least_confident_first():
    from pipeline.uncertainty import risk_coverage

    before = np.array([True, False, False, True])
    after = np.array([True, True, False, False])  # q1 fixed, q3 broken
    conf = np.array([0.9, 0.1, 0.5, 0.8])  # least confident first: q1, q2, q3, q0
    frac, r1 = risk_coverage(before, after, conf)
    np.testing.assert_allclose(frac, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(r1, [50, 75, 75, 50, 50])  # retrieval alone ... every query re-ranked
    # a NaN signal counts as least confident
    _, r1 = risk_coverage(before, after, np.array([0.9, 0.1, 0.5, np.nan]))
    np.testing.assert_allclose(r1, [50, 25, 50, 50, 50])


def test_logistic_fit_recovers_the_model_and_gives_the_threshold():
    from pipeline.uncertainty import fit_logistic

    rng = np.random.default_rng(0)
    c = rng.normal(-1.0, 0.5, 20000)
    right = rng.random(len(c)) < 1 / (1 + np.exp(-(2.0 + 3.0 * c)))  # P(right) = sigmoid(2 + 3c)
    a, b = fit_logistic(c, right)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(3.0, abs=0.15)
    with pytest.raises(ValueError, match="right and queries whose top-1 is wrong"):
        fit_logistic(c, np.ones(len(c), bool))


def test_gate_fitted_on_one_set_applies_to_another(tmp_path):
    from pipeline.cli import main
    from pipeline.io import read_json
    from pipeline.topk import write_topk
    from pipeline.uncertainty import gate_fit, retrieval_confidence

    topk = read_topk(need_shared(FIXTURE_TOPK))
    fit = gate_fit(topk, "l2", p_right=0.5)
    assert fit["b"] > 0 and 0 < fit["fraction_reranked_here"] < 1
    conf = retrieval_confidence(topk, "l2")
    # the threshold is where the model says 50%: queries below it are sent
    assert 1 / (1 + np.exp(-(fit["a"] + fit["b"] * fit["threshold"]))) == pytest.approx(0.5)
    write_topk(tmp_path / "t.h5", topk)
    assert main(["gate-fit", "--topk", str(tmp_path / "t.h5"), "--signal", "l2", "--out", str(tmp_path / "fit.json")]) == 0
    assert read_json(tmp_path / "fit.json")["threshold"] == pytest.approx(fit["threshold"])
    assert main(["gate", "--topk", str(tmp_path / "t.h5"), "--signal", "l2", "--fit", str(tmp_path / "fit.json"),
                 "--out", str(tmp_path / "g.h5")]) == 0
    assert len(read_topk(tmp_path / "g.h5")) == int((conf < fit["threshold"]).sum())
    assert main(["gate", "--topk", str(tmp_path / "t.h5"), "--signal", "sue", "--fit", str(tmp_path / "fit.json"),
                 "--out", str(tmp_path / "g2.h5")]) != 0  # a fit of another signal is refused


def test_gate_on_a_dataset_whose_names_carry_no_positions(tiny_dataset, tmp_path):
    """Positions from the index tables (a positions CSV): the gate, its fit and the signals use them."""
    from pipeline.cli import main
    from pipeline.datasets.index import index_dataset, read_table
    from pipeline.topk import write_topk

    from .test_index import plain_named_dataset

    csv = plain_named_dataset(tiny_dataset, tmp_path)
    index_dataset(tiny_dataset, tmp_path / "index", positions=csv)
    db = read_table(tmp_path / "index" / "database.csv").name.tolist()
    queries = read_table(tmp_path / "index" / "queries.csv").name.tolist()
    cands = [[db[(3 * j + 6 + r) % 12] for r in range(3)] for j in range(len(queries))]
    cands[0][0] = db[0]  # query 0's top-1 is right (2.2 m away)
    dist = np.array([[0.1, 0.5, 0.6], [0.9, 1.0, 1.1], [0.95, 1.0, 1.2], [1.2, 1.3, 1.4]])[: len(queries)]
    write_topk(tmp_path / "t.h5", TopK(queries, cands, np.zeros(dist.shape), dist))
    idx = ["--index-dir", str(tmp_path / "index")]
    assert main(["gate", "--topk", str(tmp_path / "t.h5"), "--signal", "sue", "--threshold=-1e9",
                 "--out", str(tmp_path / "g.h5"), *idx]) == 0
    assert main(["uncertainty", "--topk", str(tmp_path / "t.h5"), "--out", str(tmp_path / "s.csv"),
                 "--summary", str(tmp_path / "a.csv"), *idx]) == 0
    sig = pd.read_csv(tmp_path / "s.csv")
    assert sig.top1_right.tolist() == [True] + [False] * (len(queries) - 1)
    # without the index tables the names (IMG_*.jpg) say nothing
    assert main(["gate", "--topk", str(tmp_path / "t.h5"), "--signal", "sue", "--threshold=0",
                 "--out", str(tmp_path / "g2.h5")]) != 0


def test_gated_runs_are_measured_points_on_the_risk_coverage_plot(tmp_path):
    """A gated copy of a method appears on that method's risk-coverage plot as a measured point
    (share re-ranked, R@1 over every query, time per query with the gate's), not as a signal."""
    from pipeline.reports.html import uncertainty_block
    from pipeline.rerank import merge_reranked
    from pipeline.topk import write_topk

    rng = np.random.default_rng(0)
    n, k = 20, 5
    q_pos = [(550000.0 + 100 * i, 4180000.0) for i in range(n)]
    queries = [vg_name(*p, pano_id=f"q{i}") for i, p in enumerate(q_pos)]
    right = [vg_name(e + 3, nn, pano_id=f"r{i}") for i, (e, nn) in enumerate(q_pos)]
    wrong = [[vg_name(e + 40 + 10 * j, nn, pano_id=f"w{i}_{j}") for j in range(k - 1)] for i, (e, nn) in enumerate(q_pos)]
    first = rng.random(n) < 0.4  # retrieval: the right image first for some queries, last for the others
    names = np.array([[right[i]] + wrong[i] if first[i] else wrong[i] + [right[i]] for i in range(n)])
    dist = np.sort(rng.random((n, k)).astype(np.float32), 1)
    retrieval = TopK(queries, names, np.zeros((n, k), np.int64), dist)
    full = TopK(queries, np.array([[right[i]] + wrong[i] for i in range(n)]), np.zeros((n, k), np.int64), dist,
                {"seconds_per_query_matching": 0.2, "seconds_per_query_scoring": 0.1})
    write_topk(tmp_path / "retrieval.h5", retrieval)
    write_topk(tmp_path / "full.h5", full, extra={"rerank_scores": np.tile(np.arange(k, 0, -1.0), (n, 1))})
    sent = np.flatnonzero(~first)[:5]  # a gate that sent 5 of the 12 wrong top-1s
    part = TopK([queries[i] for i in sent], full.candidate_names[sent], full.candidate_index[sent], dist[sent],
                dict(full.meta))
    gated, scores = merge_reranked(retrieval, part, np.ones((len(sent), k)), {"signal": "l2", "seconds": 0.04})
    write_topk(tmp_path / "gated.h5", gated, extra={"rerank_scores": scores})
    out = uncertainty_block(str(tmp_path / "retrieval.h5"), {"m": str(tmp_path / "full.h5")}, tmp_path / "u", 25.0,
                            measured={"m": {"m_gated": str(tmp_path / "gated.h5")}})
    rc = pd.read_csv(out["files"]["risk_coverage/m"]["csv"])
    point = rc[rc.signal == "measured: m_gated"].iloc[0]
    assert point.fraction_reranked == pytest.approx(5 / n)
    assert point["R@1"] == pytest.approx(100.0 * (first.sum() + 5) / n)
    assert point.est_seconds_per_query == pytest.approx(0.3 * 5 / n + 0.04 / n)
    auc = pd.read_csv(out["files"]["auc_pr"]).signal.tolist()
    assert "m" in auc and "m_gated" not in auc  # the gated copy is no signal
    assert "markers: the gated copies" in out["html"]
    assert (tmp_path / "u" / "retrieval_m_risk_coverage.png").stat().st_size > 0
