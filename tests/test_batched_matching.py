"""Blocks of pairs matched as padded batches give each pair the matches it gets on its own."""

import numpy as np
import pytest
import torch

from pipeline.matchers import build_matcher
from pipeline.matchers.base import pad_features

from .conftest import SHARED, WEIGHTS, need_shared

PAIRS = SHARED / "fixtures" / "pairs"


def _feats(n, d=64, seed=0, size=(320, 240), levels=3):
    g = torch.Generator().manual_seed(seed)
    return {"keypoints": torch.rand(n, 2, generator=g) * torch.tensor(size, dtype=torch.float32),
            "descriptors": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
            "scores": torch.rand(n, generator=g), "image_size": torch.tensor(size),
            "levels": torch.randint(0, levels, (n,), generator=g)}


def _related(f, seed, noise=0.3, keep=0.7):
    """A second image sharing ``keep`` of ``f``'s features (noisy), the rest new."""
    g = torch.Generator().manual_seed(seed)
    n = len(f["keypoints"])
    idx = torch.randperm(n, generator=g)[: int(keep * n)]
    other = _feats(max(1, n - len(idx)), f["descriptors"].shape[1], seed + 1000)
    d = torch.nn.functional.normalize(f["descriptors"][idx] + noise * torch.randn(len(idx), f["descriptors"].shape[1],
                                                                                   generator=g), dim=1)
    return {"keypoints": torch.cat([f["keypoints"][idx] + 2.0, other["keypoints"]]).clamp(0, 239),
            "descriptors": torch.cat([d, other["descriptors"]]), "scores": torch.cat([f["scores"][idx],
                                                                                       other["scores"]]),
            "image_size": f["image_size"], "levels": torch.cat([f["levels"][idx], other["levels"]])}


def _block(counts=(1, 2, 7, 300, 1500, 40)):
    """Pairs of very different keypoint counts (1 to 1500), related and unrelated."""
    feats = [_feats(n, seed=i) for i, n in enumerate(counts)]
    pairs = [(a, b) for a in feats for b in feats if a is not b]
    pairs += [(f, _related(f, i)) for i, f in enumerate(feats)]
    return pairs


def assert_same(single, block, atol):
    assert len(single) == len(block)
    n_matches = 0
    for s, b in zip(single, block):
        assert set(s) == set(b)
        if "matches" in s:
            torch.testing.assert_close(b["matches"], s["matches"], rtol=0, atol=0)
            n_matches += len(s["matches"])
        torch.testing.assert_close(b["scores"], s["scores"], rtol=0, atol=atol)
    return n_matches


@pytest.mark.parametrize("conf", [
    {"name": "mnn"},
    {"name": "mnn", "ratio": 0.9},
    {"name": "mnn", "by_level": True},
    {"name": "mnn", "by_level": True, "ratio": 0.95},
    {"name": "mnn", "mutual": False, "max_distance": 1.0},
    {"name": "mnn", "similarity": "dot"},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "name") or "mutual")
def test_mnn_block_equals_pair_at_a_time(conf):
    pairs = _block()
    single = [build_matcher(conf)(a, b) for a, b in pairs]
    for bs in (3, 64):
        block = build_matcher({**conf, "batch_size": bs}).match_block(pairs)
        assert assert_same(single, block, atol=1e-6) > 100


def test_block_keeps_pair_order_and_empty_pairs():
    m = build_matcher({"name": "mnn", "batch_size": 8})
    f, empty = _feats(50), _feats(0)
    pairs = [(f, _related(f, 1)), (f, empty), (None, f), (f, f)]
    out = m.match_block(pairs)
    assert len(out[1]["matches"]) == 0 and len(out[2]["matches"]) == 0
    assert out[3]["matches"].tolist() == [[i, i] for i in range(50)]
    assert torch.equal(out[0]["matches"], m(*pairs[0])["matches"])


def test_pad_features_masks_the_padding():
    padded, valid, counts = pad_features([_feats(3), _feats(5)])
    assert padded["descriptors"].shape == (2, 5, 64) and counts.tolist() == [3, 5]
    assert valid.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert (padded["keypoints"][0, 3:] == 0).all()


@pytest.mark.parametrize("bad", [0, -2, 1.5, "many", True])
def test_batch_size_must_be_auto_or_positive(bad):
    with pytest.raises(ValueError, match="batch_size must be 'auto' or a positive integer"):
        build_matcher({"name": "mnn", "batch_size": bad})


def test_auto_batch_size_is_one_pair_on_cpu_and_bounded_by_memory():
    m = build_matcher({"name": "mnn"})
    assert m.batch_size(2048, 2048, "cpu") == 1  # measured: batches are slower on a CPU
    m.cpu_batch_size = None  # the memory budget alone
    small, large = m.batch_size(100, 100, "cpu"), m.batch_size(8000, 8000, "cpu")
    assert small > large >= 1 and small <= 256
    assert build_matcher({"name": "mnn", "batch_size": 7}).batch_size(10, 10, "cpu") == 7


@pytest.fixture(scope="module")
def aliked_pairs():
    from pipeline.images import load_tensor
    from pipeline.local_features import build_model

    need_shared(WEIGHTS / "aliked-n16.pth")
    ext = build_model({"name": "aliked", "weights": str(WEIGHTS / "aliked-n16.pth"), "max_keypoints": 512}).eval()
    feats = {}
    for name in ("montmartre_close", "montmartre_far", "notre_dame", "chartres"):
        img = load_tensor(need_shared(PAIRS / f"{name}.jpg"), 480)
        with torch.inference_mode():
            f = ext(img)
        f["image_size"] = torch.tensor([img.shape[-1], img.shape[-2]])
        feats[name] = f
    # the same image with fewer keypoints: pairs of very different sizes in one block
    f = feats["montmartre_far"]
    feats["far_120"] = {k: (v[:120] if k in ("keypoints", "descriptors", "scores") else v) for k, v in f.items()}
    names = list(feats)
    return [(feats[a], feats[b]) for a in names for b in names if a != b]


@pytest.mark.parametrize("opts", [{}, {"width_confidence": -1, "depth_confidence": -1}],
                         ids=["pruning+early-stop", "full-depth"])
def test_lightglue_block_equals_pair_at_a_time_on_real_pairs(aliked_pairs, opts):
    need_shared(WEIGHTS / "aliked_lightglue.pth")
    conf = {"name": "lightglue", "features": "aliked", "weights": str(WEIGHTS / "aliked_lightglue.pth"), **opts}
    m = build_matcher(conf)
    single = [m(a, b) for a, b in aliked_pairs]
    block = build_matcher({**conf, "batch_size": 8}).match_block(aliked_pairs)
    n = assert_same(single, block, atol=2e-4)
    close_far = len(single[0]["matches"])  # montmartre close x far: the same place
    assert close_far > 100 and n > 300


def test_superglue_block_equals_pair_at_a_time(tmp_path):
    from pipeline.matchers.superglue import write_random_checkpoint

    write_random_checkpoint(tmp_path / "sg.pth", seed=0, conf={"gnn_layers": ["self", "cross"] * 2,
                                                               "sinkhorn_iterations": 30})
    conf = {"name": "superglue", "weights": str(tmp_path / "sg.pth"), "gnn_layers": ["self", "cross"] * 2,
            "sinkhorn_iterations": 30, "match_threshold": 0.0}
    g = torch.Generator().manual_seed(0)

    def sp(n, seed):
        f = _feats(n, d=256, seed=seed)
        f["descriptors"] = f["descriptors"] * 4  # peaked assignments: clear mutual maxima
        return f

    feats = [sp(n, i) for i, n in enumerate((3, 60, 250, 17))]
    pairs = [(a, b) for a in feats for b in feats if a is not b]
    pairs += [(f, {**f, "descriptors": f["descriptors"] + 0.05 * torch.randn(f["descriptors"].shape, generator=g)})
              for f in feats]
    m = build_matcher(conf)
    single = [m(a, b) for a, b in pairs]
    block_m = build_matcher({**conf, "batch_size": 16})
    block = block_m.match_block(pairs)
    assert assert_same(single, block, atol=1e-5) > 50
    # the batched log assignment, cut to each pair's rows and columns, is the pair's own
    f0, _, n0 = pad_features([p[0] for p in pairs])
    f1, _, n1 = pad_features([p[1] for p in pairs])
    f0["image_size"] = torch.stack([p[0]["image_size"] for p in pairs])
    f1["image_size"] = torch.stack([p[1]["image_size"] for p in pairs])
    with torch.inference_mode():
        la = block_m.net.forward_batch(f0, f1, n0, n1)
        for b, (a, c) in enumerate(pairs):
            own = m.log_assignment(a, c)
            z, r, k = la[b], int(n0[b]), int(n1[b])
            cut = torch.cat([torch.cat([z[:r, :k], z[:r, -1:]], 1), torch.cat([z[-1:, :k], z[-1:, -1:]], 1)])
            torch.testing.assert_close(cut, own, rtol=0, atol=1e-4)


@pytest.mark.parametrize("main_scores", [True, False], ids=["shared", "all_in_pool"])
def test_scoring_in_processes_equals_one_process(tmp_path, tiny_dataset, monkeypatch, caplog, main_scores):
    """Queries scored in the pool (all of them, or those the pool takes while this
    process scores from the front) get exactly the one-process scores."""
    import logging
    import multiprocessing as mp
    import time

    import h5py

    from pipeline import rerank as rr
    from pipeline.datasets.index import index_dataset
    from pipeline.io import write_json
    from pipeline.extract_local import extract_local
    from pipeline.topk import TopK, read_topk, write_topk

    from .test_rerank import small_topk

    index_dataset(tiny_dataset, tmp_path / "index")
    write_topk(tmp_path / "topk.h5", small_topk(tmp_path / "index"))
    t = read_topk(tmp_path / "topk.h5")
    names = rr.needed_images([(tmp_path / "topk.h5", 4)])
    write_json(tmp_path / "feat.json", extract_local({"name": "sift", "max_keypoints": 500}, tiny_dataset, names,
                                                     tmp_path / "local", device="cpu"))
    rr.match_topk(tmp_path / "feat.json", {"name": "mnn"}, tmp_path / "topk.h5", 4, tmp_path / "m.h5", device="cpu")
    scorer = {"name": "ransac", "threshold": 8, "max_iters": 500}
    one = rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", scorer, tmp_path / "topk.h5", 4, tmp_path / "a.h5")
    monkeypatch.setattr(rr, "MAIN_SCORES", main_scores)
    bystander = mp.get_context("spawn").Process(target=time.sleep, args=(30,))  # a child that is not the pool's
    bystander.start()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.rerank"):
            two = rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", scorer, tmp_path / "topk.h5", 4,
                                tmp_path / "b.h5", workers=2)
        # the pool's workers are gone; the other child is left alone
        assert mp.active_children() == [bystander] and bystander.is_alive()
    finally:
        bystander.terminate()
        bystander.join()
    if not main_scores:
        assert "4 of 4 queries scored in the pool" in caplog.text
    assert isinstance(one, TopK) and (one.candidate_names == two.candidate_names).all()
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        np.testing.assert_array_equal(a["rerank_scores"][:], b["rerank_scores"][:])
        assert a["rerank_scores"][:].max() > 8  # real inlier counts, not all zeros
    assert len(t) == 4


def test_a_dead_scoring_worker_does_not_hang_or_lose_queries(tmp_path, tiny_dataset, monkeypatch, caplog):
    """A worker killed (as the OOM killer would) breaks the pool: this process scores the
    queries the pool had, with a warning, and the scores are still the one-process ones."""
    import logging
    import multiprocessing as mp
    import os
    import signal
    import threading
    import time

    import h5py

    from pipeline import rerank as rr
    from pipeline.datasets.index import index_dataset
    from pipeline.io import write_json
    from pipeline.extract_local import extract_local
    from pipeline.topk import write_topk

    from .test_rerank import small_topk

    index_dataset(tiny_dataset, tmp_path / "index")
    write_topk(tmp_path / "topk.h5", small_topk(tmp_path / "index"))
    names = rr.needed_images([(tmp_path / "topk.h5", 4)])
    write_json(tmp_path / "feat.json", extract_local({"name": "sift", "max_keypoints": 500}, tiny_dataset, names,
                                                     tmp_path / "local", device="cpu"))
    rr.match_topk(tmp_path / "feat.json", {"name": "mnn"}, tmp_path / "topk.h5", 4, tmp_path / "m.h5", device="cpu")
    scorer = {"name": "ransac", "threshold": 8, "max_iters": 500}
    rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", scorer, tmp_path / "topk.h5", 4, tmp_path / "a.h5")
    monkeypatch.setattr(rr, "MAIN_SCORES", False)  # every query goes to the pool, which dies
    killed = []

    def kill_worker():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for p in mp.active_children():
                if p.pid:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_worker, daemon=True)
    killer.start()
    with caplog.at_level(logging.INFO, logger="pipeline.rerank"):
        rr.score_topk(tmp_path / "feat.json", tmp_path / "m.h5", scorer, tmp_path / "topk.h5", 4,
                      tmp_path / "b.h5", workers=2)
    killer.join(5)
    assert killed
    assert "scoring pool broke" in caplog.text and "0 of 4 queries scored in the pool" in caplog.text
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        np.testing.assert_array_equal(a["rerank_scores"][:], b["rerank_scores"][:])
