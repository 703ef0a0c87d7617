"""Qualitative report (thesis Figures 4.9-4.13): the CSV beside each figure holds what it shows."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline.rerank as rr
from pipeline.datasets.index import index_dataset
from pipeline.evaluate import candidate_distances, index_positions
from pipeline.io import write_json
from pipeline.local_store import FeatureStore, described_keypoints
from pipeline.extract_local import extract_local
from pipeline.reports.qualitative import (
    GROUPS,
    choose_queries,
    plot_keypoints,
    plot_matches,
    prediction_strip,
    qualitative_report,
)
from pipeline.scorers import build_scorer
from pipeline.topk import TopK, read_topk, write_topk

from .conftest import make_dataset

# described at 128 x 96, images are 256 x 192: keypoints are drawn at twice their stored coordinates
SIFT = {"name": "sift", "max_keypoints": 300, "resize": 128}
MNN = {"name": "mnn", "ratio": 0.9}
RANSAC = {"name": "ransac", "threshold": 8}
K = 4
THRESHOLD = 25.0


def _names(root, split):
    return sorted(f"{split}/{p.name}" for p in (root / split).iterdir())


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    """(Made once for the module; tests write to their own folders and never change it.) A tiny dataset (database every 40 m: only a query's own place is within 25 m), a retrieval
    top-k (query 0's true image first, the others' last), SIFT features, MNN matches and the
    RANSAC re-ranking."""
    tmp_path = tmp_path_factory.mktemp("method")
    root = make_dataset(tmp_path / "ds", n_db=12, n_q=4, spacing=40.0, size=(192, 256))
    db, q = _names(root, "database"), _names(root, "queries")
    cands = []
    for j in range(len(q)):
        true = db[3 * j]
        wrong = [db[(3 * j + 1 + r) % len(db)] for r in range(K - 1)]
        cands.append([true] + wrong if j == 0 else wrong + [true])
    topk = TopK(q, cands, np.zeros((len(q), K)), np.tile(np.arange(K, dtype=np.float32), (len(q), 1)))
    write_topk(tmp_path / "topk.h5", topk)
    names = rr.needed_images([(tmp_path / "topk.h5", K)])
    write_json(tmp_path / "feat.json", extract_local(SIFT, root, names, tmp_path / "local", device="cpu"))
    rr.match_topk(tmp_path / "feat.json", MNN, tmp_path / "topk.h5", K, tmp_path / "m.h5", device="cpu")
    rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", RANSAC, tmp_path / "topk.h5", K, tmp_path / "rr.h5")
    return root, tmp_path


def _report(root, tmp, out="report", **kw):
    args = {"threshold_m": THRESHOLD, "n_queries": 3, "features": tmp / "feat.json", "matches": tmp / "m.h5",
            "scorer_conf": RANSAC}
    args.update(kw)
    return qualitative_report(root, tmp / "topk.h5", tmp / "rr.h5", tmp / out, **args)


def fig_of(manifest, name):
    (fig,) = [f for f in manifest["figures"] if f["name"] == name]
    return fig


def _check_png(path, min_w=300, min_h=200):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h, im.size
        return np.asarray(im.convert("RGB"))


def _correct(names_q, names_c):
    t = TopK(names_q, [[c] for c in names_c], np.zeros((len(names_q), 1)), np.zeros((len(names_q), 1)))
    d = candidate_distances(t)[:, 0]
    return d <= THRESHOLD, d


def test_report_data_match_evaluation_and_scorer(method):
    root, tmp = method
    out = tmp / "report"
    manifest = _report(root, tmp)

    # manifest: every file listed exists, with a caption; manifest.json is the same dict
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))
    assert [f["name"] for f in manifest["figures"]] == ["keypoints", "matches", "predictions"]  # thesis order
    assert not manifest["skipped"]
    for rel, caption in manifest["files"].items():
        assert (out / rel).is_file() and caption, rel

    # Figure 4.13: the strip's flags and distances are those of the evaluation
    strip = pd.read_csv(out / "predictions.csv")
    assert list(strip.columns[:7]) == ["query", "baseline_top1", "baseline_correct", "baseline_dist_m",
                                       "reranked_top1", "reranked_correct", "reranked_dist_m"]
    assert len(strip) == 3
    base, rer = read_topk(tmp / "topk.h5"), read_topk(tmp / "rr.h5")
    row = {n: i for i, n in enumerate(base.query_names)}
    idx = [row[n] for n in strip["query"]]
    assert list(strip.baseline_top1) == [base.candidate_names[i, 0] for i in idx]
    assert list(strip.reranked_top1) == [rer.candidate_names[i, 0] for i in idx]
    for prefix, names in (("baseline", strip.baseline_top1), ("reranked", strip.reranked_top1)):
        ok, d = _correct(list(strip["query"]), list(names))
        assert strip[f"{prefix}_correct"].tolist() == ok.tolist()
        np.testing.assert_allclose(strip[f"{prefix}_dist_m"], d, atol=1e-3)
    # selection: queries whose top-1 changed come before the unchanged ones
    changed = (strip.baseline_top1 != strip.reranked_top1).tolist()
    assert changed == sorted(changed, reverse=True)
    assert set(strip.selection) <= set(GROUPS)
    # re-ranking brings each query's own place first here: the strip shows corrections
    assert strip.reranked_correct.all() and not strip.baseline_correct.all()
    img = _check_png(out / "predictions.png")
    green = np.all(np.abs(img.astype(int) - [26, 152, 80]) < 12, axis=2).sum()
    red = np.all(np.abs(img.astype(int) - [215, 48, 39]) < 12, axis=2).sum()
    assert green > 100 and red > 100  # frames of correct and wrong top-1s

    # the figure pair: the first shown query and its first true positive among the re-ranked top-K
    fig = fig_of(manifest, "matches")
    qname = strip["query"][0]
    qi = row[qname]
    ok, _ = _correct([qname] * K, list(rer.candidate_names[qi, :K]))
    cname = rer.candidate_names[qi, int(np.argmax(ok))]
    assert ok.any() and fig["query"] == qname and fig["candidate"] == cname and fig["positive"]

    # Figure 4.12: the CSV's inliers are the RANSAC scorer's score of that pair
    store = FeatureStore(tmp / "feat.json")
    fq, fc = store.get(qname), store.get(cname)
    ret_rank = list(base.candidate_names[qi]).index(cname)
    m = rr.Matches(tmp / "m.h5").pair(qi, ret_rank)
    score = build_scorer(RANSAC).score_pair(fq["keypoints"], fc["keypoints"], m, fq, fc)[0]
    matches = pd.read_csv(out / "matches_ransac.csv")
    assert list(matches.columns) == ["xq", "yq", "xc", "yc", "inlier"]
    assert len(matches) == len(m) == fig["n_matches"] > 0
    assert matches.inlier.sum() == score == fig["n_inliers"] >= 8
    # positions at original-image pixels, as the store holds them (the model saw half the size)
    assert tuple(fq["original_size"]) == (256, 192) and tuple(fq["image_size"]) == (128, 96)
    np.testing.assert_allclose(matches[["xq", "yq"]], fq["keypoints"][m[:, 0]], atol=2e-3)
    np.testing.assert_allclose(matches[["xc", "yc"]], fc["keypoints"][m[:, 1]], atol=2e-3)
    described = described_keypoints(fq)
    assert described.max(0)[0] < 128 and described.max(0)[1] < 96 and fq["keypoints"].max() > 128
    np.testing.assert_allclose((described + 0.5) * 2 - 0.5, fq["keypoints"], atol=1e-3)
    _check_png(out / "matches_ransac.png")

    # Figure 4.9: every stored keypoint of the query, at original-image pixels
    kp = pd.read_csv(out / "keypoints_query.csv")
    assert len(kp) == len(fq["keypoints"]) == fig_of(manifest, "keypoints")["n_keypoints"] > 0
    np.testing.assert_allclose(kp[["x", "y"]], fq["keypoints"], atol=2e-3)
    _check_png(out / "keypoints_query.png", 200, 150)
    store.close()

    # deterministic: a second run writes the same data
    again = _report(root, tmp, out="again")
    for name in ("predictions.csv", "matches_ransac.csv", "keypoints_query.csv"):
        assert (out / name).read_text() == (tmp / "again" / name).read_text()
    assert again["queries"] == manifest["queries"]


def test_corrupt_images_are_drawn_as_placeholders(method, tmp_path):
    root, tmp = method
    root = Path(shutil.copytree(root, tmp_path / "ds"))  # features are keyed by name: they serve the copy
    first = _report(root, tmp, out="before")
    fig = fig_of(first, "matches")
    # the figure query and a wrong baseline top-1 shown in the strip become unreadable
    strip = pd.read_csv(tmp / "before" / "predictions.csv")
    wrong = strip.baseline_top1[~strip.baseline_correct].iloc[0]
    for name in (fig["query"], wrong):
        (root / name).write_bytes(b"not an image")
    manifest = _report(root, tmp, out="after")
    out = tmp / "after"
    assert {fig["query"], wrong} <= set(manifest["image_errors"])
    assert "cannot read image" in manifest["image_errors"][fig["query"]]
    for key in ("predictions", "keypoints", "matches"):
        _check_png(out / fig_of(manifest, key)["png"], 150, 100)
    # the data do not depend on the pixels
    for name in ("predictions.csv", "matches_ransac.csv", "keypoints_query.csv"):
        assert (out / name).read_text() == (tmp / "before" / name).read_text()
    # a placeholder is grey where the image was
    res = plot_keypoints(root / fig["query"], np.array([[10.0, 20.0]]), tmp_path / "kp.png", "broken",
                         size_hint=(256, 192))
    assert res["error"] and pd.read_csv(res["csv"]).shape == (1, 2)
    img = _check_png(res["png"], 200, 150)
    assert (np.abs(img.astype(int) - 200).max(axis=2) < 3).mean() > 0.5


def test_features_unreadable_at_extraction(tmp_path):
    """An image broken before extraction has no features: the keypoint figure is skipped with the reason."""
    root = make_dataset(tmp_path / "ds", n_db=6, n_q=2, spacing=40.0)
    db, q = _names(root, "database"), _names(root, "queries")
    (root / q[0]).write_bytes(b"broken")
    cands = [[db[0], db[1]], [db[3], db[4]]]
    write_topk(tmp_path / "topk.h5", TopK(q, cands, np.zeros((2, 2)), np.zeros((2, 2))))
    write_topk(tmp_path / "rr.h5", TopK(q, [c[::-1] for c in cands], np.zeros((2, 2)), np.zeros((2, 2)), {"rerank_k": 2}))
    names = rr.needed_images([(tmp_path / "topk.h5", 2)])
    write_json(tmp_path / "feat.json", extract_local(SIFT, root, names, tmp_path / "local", device="cpu"))
    rr.match_topk(tmp_path / "feat.json", MNN, tmp_path / "topk.h5", 2, tmp_path / "m.h5", device="cpu")
    manifest = qualitative_report(root, tmp_path / "topk.h5", tmp_path / "rr.h5", tmp_path / "out", n_queries=2,
                                  features=tmp_path / "feat.json", matches=tmp_path / "m.h5", scorer_conf=RANSAC)
    assert manifest["queries"][0]["query"] == q[0]
    assert "unreadable" in manifest["skipped"]["keypoints"] and "no local features" in manifest["skipped"]["matches"]
    assert q[0] in manifest["image_errors"]
    _check_png(tmp_path / "out" / "predictions.png")


def test_pair_score_matches_draw_no_match_figure(method):
    root, tmp = method
    from pipeline import match_store

    t = read_topk(tmp / "topk.h5")
    pairs = [(q, c) for q, row in zip(t.query_names, t.candidate_names) for c in row]
    store = tmp / "ps_store"
    match_store.write_part(store / "part_x_000000.h5", "pair_score", pairs,
                           [{"pair_score": np.zeros(1)} for _ in pairs], np.zeros(len(pairs)))
    match_store.write_view(tmp / "ps.h5", store, match_store.scan(store), list(t.query_names),
                           [list(r) for r in t.candidate_names], {"kind": "pair_score", "matcher": {"name": "rrt"}})
    manifest = _report(root, tmp, out="ps", matches=tmp / "ps.h5", scorer_conf={"name": "pair_score"})
    assert "pair scores" in manifest["skipped"]["matches"]
    assert [f["name"] for f in manifest["figures"]] == ["keypoints", "predictions"]


def test_matches_of_another_topk_are_refused(method):
    root, tmp = method
    base = read_topk(tmp / "topk.h5")
    write_topk(tmp / "shuffled.h5", TopK(base.query_names[::-1], base.candidate_names[::-1], base.candidate_index,
                                         base.distances))
    with pytest.raises(ValueError, match="matches of the retrieval top-k"):
        qualitative_report(root, tmp / "shuffled.h5", tmp / "rr.h5", tmp / "refused", features=tmp / "feat.json",
                           matches=tmp / "m.h5", scorer_conf=RANSAC)


def test_imported_bare_names_with_index_tables(tmp_path):
    """Imported top-k files hold bare file names: images found and positions read through the index tables."""
    root = make_dataset(tmp_path / "ds", n_db=6, n_q=2, spacing=40.0)
    index_dataset(root, tmp_path / "index")
    db, q = _names(root, "database"), _names(root, "queries")

    def bare(names):
        return [Path(n).name for n in names]

    write_topk(tmp_path / "topk.h5", TopK(bare(q), [bare([db[1], db[0]]), bare([db[3], db[4]])],
                                          np.zeros((2, 2)), np.zeros((2, 2))))
    write_topk(tmp_path / "rr.h5", TopK(bare(q), [bare([db[0], db[1]]), bare([db[4], db[3]])],
                                        np.zeros((2, 2)), np.zeros((2, 2))))
    manifest = qualitative_report(root, tmp_path / "topk.h5", tmp_path / "rr.h5", tmp_path / "out", n_queries=2,
                                  index_dir=tmp_path / "index")
    assert not manifest["image_errors"]
    strip = pd.read_csv(tmp_path / "out" / "predictions.csv")
    # query 0 corrected, query 1 worsened (its own place is db[3])
    assert strip.selection.tolist() == ["corrected", "worsened"]
    pos = {Path(n).name: p for n, p in index_positions(tmp_path / "index").items()}
    t = TopK(list(strip["query"]), [[c] for c in strip.reranked_top1], np.zeros((2, 1)), np.zeros((2, 1)))
    assert strip.reranked_correct.tolist() == (candidate_distances(t, pos)[:, 0] <= 25).tolist() == [True, False]


def test_choose_queries_rule():
    b = ["a", "b", "c", "d", "e", "f"]
    r = ["a", "x", "c", "y", "z", "w"]
    bc = [True, False, False, True, False, False]
    rc = [True, True, False, False, False, True]
    # corrected: 1, 5; worsened: 3; changed (wrong -> other wrong): 4; unchanged: 0, 2
    assert choose_queries(b, r, bc, rc, 3) == [(1, "corrected"), (3, "worsened"), (4, "changed")]
    assert choose_queries(b, r, bc, rc, 6) == [(1, "corrected"), (3, "worsened"), (4, "changed"), (5, "corrected"),
                                               (0, "unchanged"), (2, "unchanged")]
    assert choose_queries(b, r, bc, rc, 10)[-2:] == [(0, "unchanged"), (2, "unchanged")]


def test_plot_functions_standalone(tmp_path):
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, 40:] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    kq = np.array([[10.0, 10.0], [20.0, 30.0], [70.0, 50.0]])
    res = plot_matches(tmp_path / "a.png", tmp_path / "missing.png", kq, kq + 1, np.array([[0, 0], [2, 1]]),
                       [True, False], tmp_path / "m.png", "t")
    df = pd.read_csv(res["csv"])
    assert df.values.tolist() == [[10.0, 10.0, 11.0, 11.0, True], [70.0, 50.0, 21.0, 31.0, False]]
    assert list(res["errors"]) == ["candidate"] and res["n_inliers"] == 1
    _check_png(res["png"], 200, 100)
    with pytest.raises(ValueError, match="inlier flags"):
        plot_matches(tmp_path / "a.png", tmp_path / "a.png", kq, kq, None, [True], tmp_path / "m2.png")
    rows = [{"query": "a.png", "baseline_top1": "a.png", "baseline_correct": False, "baseline_dist_m": 40.0,
             "reranked_top1": "a.png", "reranked_correct": True, "reranked_dist_m": 3.25}]
    res = prediction_strip(rows, tmp_path / "s.png", root=tmp_path)
    df = pd.read_csv(res["csv"])
    assert df.loc[0, "reranked_dist_m"] == 3.25 and not df.loc[0, "baseline_correct"] and not res["errors"]
    _check_png(res["png"])


@pytest.mark.parametrize("conf", [
    RANSAC,
    {"name": "ransac"},
    {"name": "ransac", "threshold": 4, "direction": "candidate_to_query"},
    {"name": "ransac", "threshold": 8, "model": "affine", "min_matches": 12},
])
def test_figure_inliers_are_the_scorers_for_every_pair(method, conf):
    """Same points, order and seed as the scorer: the drawn inliers count what it counts, also with outliers."""
    from pipeline.reports.qualitative import ransac_inliers, ransac_settings

    _, tmp = method
    base = read_topk(tmp / "topk.h5")
    matches, store = rr.Matches(tmp / "m.h5"), FeatureStore(tmp / "feat.json")
    scorer = build_scorer(conf)
    used, _ = ransac_settings(conf)
    partial = 0
    for qi, q in enumerate(base.query_names):
        fq = store.get(q)
        for rank, c in enumerate(base.candidate_names[qi]):
            fc, m = store.get(c), matches.pair(qi, rank)
            mask = ransac_inliers(fq["keypoints"], fc["keypoints"], m, used, fq, fc)
            assert mask.sum() == scorer.score_pair(fq["keypoints"], fc["keypoints"], m, fq, fc)[0]
            partial += 0 < mask.sum() < len(m)
    assert partial > 0  # some pairs have inliers and outliers
    store.close()


def test_detector_free_points(method):
    """Kind "points" (LoFTR-like): positions in the matcher's resized input, scaled to the image; without a
    feature store the keypoint figure shows the query's points matched with the figure candidate (Fig. 4.10)."""
    root, tmp = method
    base = read_topk(tmp / "topk.h5")
    matches, store = rr.Matches(tmp / "m.h5"), FeatureStore(tmp / "feat.json")
    from pipeline import match_store

    pairs, results = [], []
    for qi, q in enumerate(base.query_names):
        fq = store.get(q)
        for rank, c in enumerate(base.candidate_names[qi]):
            m, fc = matches.pair(qi, rank), store.get(c)
            pairs.append((q, c))
            results.append({"keypoints0": fq["keypoints"][m[:, 0]], "keypoints1": fc["keypoints"][m[:, 1]],
                            "scores": np.ones(len(m))})
    store.close()
    folder = tmp / "pts_store"
    match_store.write_part(folder / "part_x_000000.h5", "points", pairs, results, np.zeros(len(pairs)))
    # the matcher saw the images with their longer side at 128 px: half their size
    match_store.write_view(tmp / "pts.h5", folder, match_store.scan(folder), list(base.query_names),
                           [list(r) for r in base.candidate_names],
                           {"kind": "points", "matcher": {"name": "loftr", "resize": 128}})
    manifest = _report(root, tmp, out="pts", features=None, matches=tmp / "pts.h5")
    fig = fig_of(manifest, "matches")
    qi = list(base.query_names).index(fig["query"])
    p = rr.Matches(tmp / "pts.h5").pair(qi, fig["retrieval_rank"] - 1)
    idx = np.repeat(np.arange(len(p))[:, None], 2, 1)
    score = build_scorer(RANSAC).score_pair(p[:, :2], p[:, 2:], idx, {}, {})[0]
    df = pd.read_csv(tmp / "pts" / "matches_ransac.csv")
    assert df.inlier.sum() == score == fig["n_inliers"] and len(df) == len(p) > 0
    np.testing.assert_allclose(df[["xq", "yq", "xc", "yc"]], p * 2, atol=2e-3)
    kp = pd.read_csv(tmp / "pts" / "keypoints_query.csv")
    np.testing.assert_allclose(kp[["x", "y"]], p[:, :2] * 2, atol=2e-3)
    assert fig_of(manifest, "keypoints")["candidate"] == fig["candidate"]
