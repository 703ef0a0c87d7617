import math

import numpy as np
import pytest

from pipeline.evaluate import candidate_distances, evaluate_topk, recall_at_n
from pipeline.topk import TopK, TopKFormatError, import_topk, read_topk, write_topk

from .conftest import FIXTURE_TOPK, need_shared, vg_name


def test_recall_hand_computed():
    # q0: first correct at rank 0; q1: at rank 2; q2: never; q3: at rank 4
    correct = np.zeros((4, 5), bool)
    correct[0, 0] = correct[0, 3] = True
    correct[1, 2] = True
    correct[3, 4] = True
    r = recall_at_n(correct, ns=(1, 2, 3, 5, 10))
    assert r[1] == 25.0
    assert r[2] == 25.0
    assert r[3] == 50.0
    assert r[5] == 75.0
    assert math.isnan(r[10])  # longer than the lists


def topk_from_positions(queries, candidates) -> TopK:
    qn = [vg_name(e, n, pano_id=f"q{i}") for i, (e, n) in enumerate(queries)]
    cn = [[vg_name(e, n, pano_id=f"c{i}{j}") for j, (e, n) in enumerate(row)] for i, row in enumerate(candidates)]
    k = len(candidates[0])
    return TopK(qn, cn, np.zeros((len(qn), k)), np.tile(np.arange(k, dtype=np.float32), (len(qn), 1)))


def test_positives_at_25_m():
    e, n = 550000.0, 4180000.0
    topk = topk_from_positions(
        [(e, n), (e, n), (e, n)],
        [[(e + 24.9, n), (e, n)], [(e + 25.1, n), (e + 15.0, n + 20.0)], [(e + 30, n), (e, n + 100)]],
    )
    d = candidate_distances(topk)
    np.testing.assert_allclose(d, [[24.9, 0], [25.1, 25.0], [30, 100]], atol=1e-6)
    r = evaluate_topk(topk, threshold=25.0, ns=(1, 2))
    assert r["R@1"] == pytest.approx(100 / 3)  # only q0's first candidate is within 25 m
    assert r["R@2"] == pytest.approx(200 / 3)  # q1's second is exactly 25 m: counts
    assert evaluate_topk(topk, threshold=20.0, ns=(1, 2))["R@2"] == pytest.approx(100 / 3)


def test_mixed_zones_are_reprojected():
    # a query just west of the zone 10/11 boundary and a candidate 10 m east of it, in zone 11
    import utm

    lat, lon = 37.0, -120.00005
    qe, qn, _, _ = utm.from_latlon(lat, lon, force_zone_number=10)
    ce, cn, _, _ = utm.from_latlon(lat, lon + 0.0001, force_zone_number=11)
    topk = TopK([vg_name(qe, qn, 10, "S")], [[vg_name(ce, cn, 11, "S")]], [[0]], [[0.0]])
    d = candidate_distances(topk)[0, 0]
    assert 5 < d < 15  # ~8.9 m, not the ~500 km between the raw UTM eastings


def test_fixture_reproduces_thesis_recalls():
    r = evaluate_topk(need_shared(FIXTURE_TOPK), threshold=25.0)
    got = [round(r[f"R@{n}"], 1) for n in (1, 5, 10, 100)]
    assert got == [26.3, 38.2, 46.1, 60.5]
    assert r["n_queries"] == 76 and r["k"] == 100


def test_import_round_trip(tmp_path):
    dst = tmp_path / "imported.h5"
    import_topk(need_shared(FIXTURE_TOPK), dst, k=50)
    t = read_topk(dst)
    assert t.k == 50 and len(t) == 76
    assert t.meta["imported_from"].endswith("occlusion.h5")
    assert round(evaluate_topk(t)["R@10"], 1) == 46.1


def test_import_rejects_bad_files(tmp_path):
    import h5py

    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["queries_filenames"] = np.array([b"q.jpg"])
    with pytest.raises(TopKFormatError, match="missing datasets"):
        import_topk(bad, tmp_path / "out.h5")
    names = tmp_path / "names.h5"
    write_topk(names, TopK(["photo.jpg"], [[vg_name(550000.0, 4180000.0)]], [[0]], [[0.0]]))
    with pytest.raises(TopKFormatError, match="photo.jpg"):
        import_topk(names, tmp_path / "out.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(TopKFormatError, match="garbage.h5"):
        read_topk(garbage)
    assert not (tmp_path / "out.h5").exists()


def test_topk_shape_checks():
    with pytest.raises(TopKFormatError):
        TopK(["a", "b"], [["x"]], [[0]], [[0.0]])


def test_lists_are_aligned_by_query_name():
    t = TopK(["q/a.jpg", "q/b.jpg", "q/c.jpg"], [["d/1.jpg"]] * 3, np.zeros((3, 1)), np.zeros((3, 1)))
    assert t.rows_of(["q/c.jpg", "q/a.jpg"]).tolist() == [2, 0]
    assert t.rows_of(["q/x.jpg", "q/b.jpg"], strict=False).tolist() == [-1, 1]
    with pytest.raises(ValueError, match="1 queries are not in the list, e.g. \\['q/x.jpg'\\]"):
        t.rows_of(["q/b.jpg", "q/x.jpg"])
    assert t.rows_of([]).tolist() == []


def test_left_out_queries_are_counted_and_can_count_as_misses():
    """22 query files: 6 left out at the index (skipped.csv), 1 at extraction (no descriptor),
    15 evaluated. R@N stays over the 15; R@N_all_found counts the 7 as misses."""
    names = [vg_name(550000.0 + 100 * i, 4180000.0) for i in range(15)]
    cands = [[vg_name(550000.0 + 100 * i + (5 if i < 12 else 60), 4180000.0)] for i in range(15)]
    topk = TopK(names, cands, np.zeros((15, 1)), np.zeros((15, 1)), {"skipped_queries": ["q_dark.jpg"]})
    summary = {"counts": {"database": 100, "queries": 16}, "skipped": {"database": 0, "queries": 6}}
    r = evaluate_topk(topk, 25.0, (1,), index_summary=summary)
    assert r["R@1"] == pytest.approx(100 * 12 / 15)
    assert (r["n_queries_found"], r["n_queries_indexed"], r["n_queries_extracted"], r["n_queries_evaluated"],
            r["n_queries_left_out"]) == (22, 16, 15, 15, 7)
    assert r["R@1_all_found"] == pytest.approx(100 * 12 / 22)
    assert "R@1_all_found" not in evaluate_topk(topk, 25.0, (1,))  # without the index: as before


def test_evaluate_command_reports_each_bad_file_and_evaluates_the_others(tmp_path, capsys, caplog):
    """python -m pipeline evaluate good.h5 garbage.h5 missing.h5 names.h5: a table for the good
    one, one error per bad one (advice fit for a user's file: never 'delete it'), exit 1."""
    from pipeline.cli import main

    good = tmp_path / "good.h5"
    write_topk(good, topk_from_positions([(550000.0, 4180000.0)], [[(550010.0, 4180000.0), (551000.0, 4180000.0)]]))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5")
    names = tmp_path / "names.h5"
    write_topk(names, TopK(["photo.jpg"], [[vg_name(550000.0, 4180000.0)]], [[0]], [[0.0]]))
    code = main(["evaluate", str(good), str(garbage), str(tmp_path / "missing.h5"), str(names), "--ns", "1", "2"])
    out = capsys.readouterr().out
    log = caplog.text
    assert code == 1
    assert "good" in out and "100.0" in out  # the good file's table
    for bad in ("garbage.h5", "missing.h5", "photo.jpg"):
        assert bad in log, bad
    assert "3 of 4 top-k files could not be evaluated" in log
    assert "delete" not in log and "check it, or copy or download it again" in log
    # a pipeline output gets the rebuild advice instead
    with pytest.raises(TopKFormatError, match="delete it and the workflow rebuilds it"):
        read_topk(garbage, made_here=True)


def test_no_harm_counts_broken_and_fixed_queries():
    from pipeline.evaluate import top1_changes

    e, n = 550000.0, 4180000.0
    near, far = (e + 5, n), (e + 500, n)
    # q0 right before and after; q1 right before, wrong after (broken); q2 and q3 wrong before, right after (fixed)
    before = topk_from_positions([(e, n)] * 4, [[near, far], [near, far], [far, near], [far, near]])
    after = TopK(before.query_names, before.candidate_names[:, ::-1].copy(), before.candidate_index, before.distances)
    after.candidate_names[0] = before.candidate_names[0]
    changes = top1_changes(before, after)
    assert changes == {"broken@1": 1, "fixed@1": 2, "R@1_change": pytest.approx(25.0)}
    assert changes["R@1_change"] == evaluate_topk(after, ns=(1,))["R@1"] - evaluate_topk(before, ns=(1,))["R@1"]
    # a re-ranked list over some of the queries is compared on those queries only
    part = TopK(after.query_names[2:], after.candidate_names[2:], after.candidate_index[2:], after.distances[2:])
    assert top1_changes(before, part) == {"broken@1": 0, "fixed@1": 2, "R@1_change": pytest.approx(100.0)}
