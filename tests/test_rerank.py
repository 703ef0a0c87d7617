"""Re-ranking: real-pair inliers, features extracted once, matching resume, re-ordering."""


import numpy as np
import pytest
import torch

import pipeline.rerank as rr
from pipeline.datasets.index import index_dataset, read_table
from pipeline.images import load_tensor
from pipeline.io import write_json
from pipeline.local_features import build_model
from pipeline.local_store import FeatureStore
from pipeline.extract_local import extract_local
from pipeline.matchers import build_matcher
from pipeline.scorers import build_scorer
from pipeline.topk import TopK, read_topk, write_topk

from .conftest import SHARED, WEIGHTS, need_shared

PAIRS = SHARED / "fixtures" / "pairs"

# extractor conf, matcher conf, image size (longer side); weights relative to ../shared/weights.
# The issue asks for a clear gap with SIFT, DISK+LightGlue and R2D2 (>= 3x); LightGlue also matches the two
# cathedrals' similar architecture, so ALIKED+LightGlue is held to 2x (measured 259 vs 97 at 640 px).
FACTOR = {"aliked_lightglue": 2.0}
COMBOS = {
    "sift": ({"name": "sift", "max_keypoints": 4096}, {"name": "mnn", "ratio": 0.8}, 1024),
    "disk_lightglue": ({"name": "disk", "weights": "disk-depth-save.pth", "max_keypoints": 1024},
                       {"name": "lightglue", "features": "disk", "weights": "disk_lightglue.pth"}, 640),
    "aliked_lightglue": ({"name": "aliked", "weights": "aliked-n16.pth", "max_keypoints": 1024},
                         {"name": "lightglue", "features": "aliked", "weights": "aliked_lightglue.pth"}, 640),
    "xfeat_lighterglue": ({"name": "xfeat", "weights": "xfeat.pt", "max_keypoints": 1024},
                          {"name": "lighterglue", "weights": "xfeat-lighterglue.pt"}, 640),
    "r2d2_mnn": ({"name": "r2d2", "weights": "r2d2_WASF_N16.pt", "max_keypoints": 2000}, {"name": "mnn"}, 640),
}


def with_weights(conf):
    conf = dict(conf)
    if "weights" in conf:
        conf["weights"] = str(need_shared(WEIGHTS / conf["weights"]))
    return conf


def inliers(extractor, matcher, a, b, size):
    fa = extractor(load_tensor(PAIRS / a, size))
    fb = extractor(load_tensor(PAIRS / b, size))
    for f, name in ((fa, a), (fb, b)):
        img = load_tensor(PAIRS / name, size)
        f["image_size"] = torch.tensor([img.shape[2], img.shape[1]])
    m = matcher(fa, fb)["matches"].numpy()
    return build_scorer({"name": "ransac"}).score_pair(fa["keypoints"].numpy(), fb["keypoints"].numpy(), m, {}, {})[0]


# R2D2 describes at several scales on the CPU: 18 s of CI, and its parity is tests/test_r2d2.py's
@pytest.mark.parametrize("combo", [pytest.param(c, marks=pytest.mark.slow) if c == "r2d2_mnn" else c
                                   for c in sorted(COMBOS)])
def test_same_place_gets_many_more_inliers_than_look_alike(combo):
    need_shared(PAIRS / "montmartre_close.jpg")
    ext_conf, match_conf, size = COMBOS[combo]
    extractor = build_model(with_weights(ext_conf))
    matcher = build_matcher(with_weights(match_conf))
    same = inliers(extractor, matcher, "montmartre_close.jpg", "montmartre_far.jpg", size)
    other = inliers(extractor, matcher, "notre_dame.jpg", "chartres.jpg", size)
    assert same >= 30 and same >= FACTOR.get(combo, 3.0) * other, (same, other)


def small_topk(index_dir, k=4):
    """Each query's candidates: the database in a fixed, deliberately wrong order."""
    db = read_table(index_dir / "database.csv").name.tolist()
    q = read_table(index_dir / "queries.csv").name.tolist()
    cands = [[db[(3 * j + 1 + r) % len(db)] for r in range(k - 1)] + [db[(3 * j) % len(db)]] for j in range(len(q))]
    return TopK(q, cands, np.zeros((len(q), k)), np.tile(np.arange(k, dtype=np.float32), (len(q), 1)))


@pytest.fixture
def prepared(tiny_dataset, tmp_path):
    index_dataset(tiny_dataset, tmp_path / "index")
    topk = small_topk(tmp_path / "index")
    write_topk(tmp_path / "topk.h5", topk)
    return tiny_dataset, tmp_path


SIFT = {"name": "sift", "max_keypoints": 500}


def test_features_extracted_once(prepared):
    root, tmp = prepared
    topk = read_topk(tmp / "topk.h5")
    # a second list sharing most images
    write_topk(tmp / "topk2.h5", TopK(topk.query_names, topk.candidate_names[:, ::-1], topk.candidate_index, topk.distances))
    names = rr.needed_images([(tmp / "topk.h5", 4), (tmp / "topk2.h5", 4)])
    assert len(names) == len(set(names)) == 4 + len(set(topk.candidate_names.ravel()))
    info = extract_local(SIFT, root, names + names[:3], tmp / "local", device="cpu")
    assert info["extracted_this_run"] == len(names)
    again = extract_local(SIFT, root, names, tmp / "local", device="cpu")
    assert again["extracted_this_run"] == 0 and again["images"] == info["images"]
    # another conf is another store: never mixed with these features
    other = extract_local({**SIFT, "max_keypoints": 100}, root, names[:2], tmp / "local", device="cpu")
    assert other["folder"] != info["folder"] and other["extracted_this_run"] == 2
    write_json(tmp / "feat.json", info)
    store = FeatureStore(tmp / "feat.json")
    f = store.get(names[0])
    assert f["keypoints"].shape[1] == 2 and f["descriptors"].dtype == np.float16
    assert tuple(f["image_size"]) == (128, 96) and tuple(f["original_size"]) == (128, 96)
    with pytest.raises(KeyError, match="no features for"):
        store.check(["database/missing.jpg"])


def test_rerank_reorders_true_match_first(prepared):
    root, tmp = prepared
    names = rr.needed_images([(tmp / "topk.h5", 4)])
    write_json(tmp / "feat.json", extract_local(SIFT, root, names, tmp / "local", device="cpu"))
    rr.match_topk(tmp / "feat.json", {"name": "mnn", "ratio": 0.9}, tmp / "topk.h5", 4, tmp / "m.h5", device="cpu")
    out = rr.score_topk(tmp / "feat.json", tmp / "m.h5", {"name": "ransac", "threshold": 8}, tmp / "topk.h5", 4, tmp / "rr.h5")
    before = read_topk(tmp / "topk.h5")
    # the true database image (a brighter copy of the query) was last; now it is first
    assert list(out.candidate_names[:, 0]) == list(before.candidate_names[:, 3])
    assert out.meta["rerank_k"] == 4 and out.meta["seconds_per_query_matching"] > 0
    import h5py

    with h5py.File(tmp / "rr.h5") as f:
        s = f["rerank_scores"][:]
    assert (np.diff(s, axis=1) <= 0).all()  # sorted by score


def test_matching_resumes_after_interruption(prepared, monkeypatch):
    from pipeline import match_store

    root, tmp = prepared
    monkeypatch.setattr(rr, "BLOCK_PAIRS", 4)  # one query's pairs per block
    monkeypatch.setattr(match_store, "PART_PAIRS", 4)  # and per part file
    names = rr.needed_images([(tmp / "topk.h5", 4)])
    write_json(tmp / "feat.json", extract_local(SIFT, root, names, tmp / "local", device="cpu"))
    calls = {"n": 0, "crash_at": 10}  # queries 0 and 1 (4 pairs each) done, query 2 under way
    real_build = rr.build_matcher

    def counting_build(conf):
        matcher = real_build(conf)

        def match(f0, f1):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise KeyboardInterrupt
            return type(matcher).forward(matcher, f0, f1)

        matcher.forward = match
        return matcher

    monkeypatch.setattr(rr, "build_matcher", counting_build)
    with pytest.raises(KeyboardInterrupt):
        rr.match_topk(tmp / "feat.json", {"name": "mnn"}, tmp / "topk.h5", 4, tmp / "m.h5", device="cpu")
    parts = list((tmp / "pairs").glob("mnn-*/part_*.h5"))
    assert not (tmp / "m.h5").exists() and len(parts) == 2
    assert not list((tmp / "pairs").glob("mnn-*/*.tmp*"))  # no half-written part left
    calls.update(n=0, crash_at=-1)
    info = rr.match_topk(tmp / "feat.json", {"name": "mnn"}, tmp / "topk.h5", 4, tmp / "m.h5", device="cpu")
    assert calls["n"] == 2 * 4  # only the two unfinished queries were matched
    assert info["pairs_matched_this_run"] == 8 and info["pairs_reused"] == 8
    m = rr.Matches(tmp / "m.h5")
    assert m.info["n_queries"] == 4 and m.k == 4 and len(m.count) == 4 * 4
    # the same matches as one uninterrupted run
    rr.match_topk(tmp / "feat.json", {"name": "mnn"}, tmp / "topk.h5", 4, tmp / "fresh" / "m.h5", device="cpu")
    fresh = rr.Matches(tmp / "fresh" / "m.h5")
    assert fresh.info["pairs_matched_this_run"] == 16
    for qi in range(4):
        for rank in range(4):
            np.testing.assert_array_equal(m.pair(qi, rank), fresh.pair(qi, rank))


def test_unreadable_candidate_scores_zero(prepared):
    root, tmp = prepared
    topk = read_topk(tmp / "topk.h5")
    bad = topk.candidate_names[0, 0]
    (root / bad).write_bytes(b"broken")
    names = rr.needed_images([(tmp / "topk.h5", 4)])
    info = extract_local(SIFT, root, names, tmp / "local", device="cpu")
    assert list(info["errors"]) == [bad]
    write_json(tmp / "feat.json", info)
    rr.match_topk(tmp / "feat.json", {"name": "mnn"}, tmp / "topk.h5", 4, tmp / "m.h5", device="cpu")
    out = rr.score_topk(tmp / "feat.json", tmp / "m.h5", {"name": "ransac"}, tmp / "topk.h5", 4, tmp / "rr.h5")
    import h5py

    with h5py.File(tmp / "rr.h5") as f:
        scores = f["rerank_scores"][0]
    ranked = list(out.candidate_names[0, :4])
    assert bad in ranked  # still listed, not dropped
    pos = ranked.index(bad)
    # the unreadable candidate scores zero and every candidate with inliers ranks above it
    assert scores[pos] == 0 and scores.max() > 0
    assert (scores[:pos] > 0).sum() == (scores > 0).sum()  # all positive scores rank before it


def test_store_folder_follows_the_model_defaults(tmp_path, monkeypatch):
    """A default changed in the code (not in config.yaml) gives a new feature store, not stale features."""
    from pipeline.local_features.sift import SIFT
    from pipeline.local_store import store_dir

    conf = {"name": "sift", "max_keypoints": 100}
    before = store_dir(tmp_path, conf)
    assert store_dir(tmp_path, dict(conf)) == before
    monkeypatch.setattr(SIFT, "default_conf", {**SIFT.default_conf, "contrast_threshold": 0.03})
    assert store_dir(tmp_path, conf) != before
    # spelling out a default in the conf is the same store as leaving it out
    monkeypatch.undo()
    assert store_dir(tmp_path, {**conf, "contrast_threshold": SIFT.default_conf["contrast_threshold"]}) == before


def test_gate_limits_every_query_is_todays_reranking_none_is_retrieval(prepared):
    import math

    import h5py

    from pipeline.uncertainty import gate_topk

    root, tmp = prepared
    base = read_topk(tmp / "topk.h5")  # confidence (minus the top-1 distance) falls query after query
    full = TopK(base.query_names, base.candidate_names, base.candidate_index,
                base.distances + 0.1 * np.arange(len(base), dtype=np.float32)[:, None])
    write_topk(tmp / "full.h5", full)
    write_json(tmp / "feat.json", extract_local(SIFT, root, rr.needed_images([(tmp / "full.h5", 4)]), tmp / "local",
                                                device="cpu"))
    mnn, ransac = {"name": "mnn", "ratio": 0.9}, {"name": "ransac", "threshold": 8}
    rr.match_topk(tmp / "feat.json", mnn, tmp / "full.h5", 4, tmp / "m.h5", device="cpu")
    today = rr.score_topk(tmp / "feat.json", tmp / "m.h5", ransac, tmp / "full.h5", 4, tmp / "today.h5")

    def gated_run(threshold, tag):
        gated, info = gate_topk(full, "l2", threshold)
        write_topk(tmp / f"{tag}.h5", gated)
        rr.match_topk(tmp / "feat.json", mnn, tmp / f"{tag}.h5", 4, tmp / f"m_{tag}.h5", device="cpu")
        out = rr.score_topk(tmp / "feat.json", tmp / f"m_{tag}.h5", ransac, tmp / f"{tag}.h5", 4, tmp / f"rr_{tag}.h5",
                            merge_into=tmp / "full.h5")
        with h5py.File(tmp / f"rr_{tag}.h5") as f:
            return out, info, f["rerank_scores"][:]

    with h5py.File(tmp / "today.h5") as f:
        today_scores = f["rerank_scores"][:]
    out, info, scores = gated_run(math.inf, "all")  # every query: today's re-ranking exactly
    assert info["n_reranked"] == len(full)
    for key in ("candidate_names", "candidate_index", "distances"):
        np.testing.assert_array_equal(getattr(out, key), getattr(today, key))
    np.testing.assert_array_equal(scores, today_scores)
    out, info, scores = gated_run(-math.inf, "none")  # no query: the retrieval alone, and nothing matched
    assert info["n_reranked"] == 0 and np.isnan(scores).all()
    for key in ("candidate_names", "candidate_index", "distances"):
        np.testing.assert_array_equal(getattr(out, key), getattr(full, key))
    assert out.meta["seconds_per_query_matching"] == 0
    # a threshold between: the least confident queries re-ranked, the others in retrieval order
    conf = -np.sqrt(full.distances[:, 0])
    out, info, _ = gated_run(float(np.median(conf)), "half")
    sent = conf < np.median(conf)
    assert info["n_reranked"] == sent.sum() > 0 and out.meta["fraction_reranked"] == pytest.approx(sent.mean())
    np.testing.assert_array_equal(out.candidate_names[sent], today.candidate_names[sent])
    np.testing.assert_array_equal(out.candidate_names[~sent], full.candidate_names[~sent])


def test_inliers_gate_probes_the_top1_pair_and_stage_2_reuses_it(prepared):
    """The `inliers` signal: the method's own stage 2 on each query's top-1 pair only. Queries
    whose top-1 is right (many inliers) are not re-ranked; the features and matches of the
    probe are in the shared stores, so stage 2 extracts and matches only what it lacks."""
    import math

    from pipeline.gate_probe import probe_top1
    from pipeline.uncertainty import gate_fit, gate_topk

    root, tmp = prepared
    base = read_topk(tmp / "topk.h5")  # the true database image is last for every query
    right_first = np.arange(len(base)) % 2 == 0  # ... and first for queries 0, 2
    names = base.candidate_names.copy()
    names[right_first] = names[right_first][:, ::-1]
    topk = TopK(base.query_names, names, base.candidate_index, base.distances)
    write_topk(tmp / "mixed.h5", topk)
    probe = {"features": SIFT, "matcher": {"name": "mnn", "ratio": 0.9}, "scorer": {"name": "ransac", "threshold": 8},
             "root": str(root), "feature_base": str(tmp / "local"), "pair_base": str(tmp / "pairs"),
             "index_dir": str(tmp / "index"), "device": "cpu"}
    conf, info = probe_top1(topk, probe)
    assert info["pairs"] == len(topk) and conf.shape == (len(topk),)
    # a right top-1 (a darker copy of the query) has many inliers, a wrong one few
    assert conf[right_first].min() > 3 * max(conf[~right_first].max(), 1), conf
    threshold = float(conf[~right_first].max()) + 1
    gated, ginfo = gate_topk(topk, "inliers", threshold, probe=probe)
    assert list(gated.query_names) == list(np.asarray(topk.query_names)[~right_first])
    assert ginfo["n_reranked"] == (~right_first).sum() and ginfo["seconds"] > 0
    assert gate_topk(topk, "inliers", math.inf, probe=probe)[1]["n_reranked"] == len(topk)
    # stage 2 of the gated queries: the probed images and pairs are not extracted or matched again
    write_topk(tmp / "gated.h5", gated)
    needed = rr.needed_images([(tmp / "gated.h5", 4)])
    info = extract_local(SIFT, root, needed, tmp / "local", device="cpu")
    probed = set(topk.query_names) | set(topk.candidate_names[:, 0])
    assert info["extracted_this_run"] == len(set(needed) - probed) < len(needed)
    write_json(tmp / "feat.json", info)
    m = rr.match_topk(tmp / "feat.json", probe["matcher"], tmp / "gated.h5", 4, tmp / "m.h5", device="cpu",
                      store_base=tmp / "pairs")
    assert m["pairs_reused"] == len(gated) and m["pairs_matched_this_run"] == 3 * len(gated), m
    # a fitted threshold on the inliers: the right top-1s are predicted right (5 m: the
    # database is 10 m apart, only the true image is right)
    fit = gate_fit(topk, "inliers", threshold_m=5.0, probe=probe)
    assert fit["signal"] == "inliers" and fit["b"] > 0
    assert conf[~right_first].max() < fit["threshold"] < conf[right_first].min()
    with pytest.raises(ValueError, match="needs the method's probe"):
        gate_topk(topk, "inliers", 1.0)
    with pytest.raises(ValueError, match="takes no probe"):
        gate_topk(topk, "l2", 1.0, probe=probe)
