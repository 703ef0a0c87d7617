"""Re-ranking time: this pipeline against the naive approach, in one run on the same data.

- naive (the thesis's reference code): for every query, extract the query and
  all its K candidates, match, score;
- ours: extract each needed image once (queries + union of candidates) into the
  feature store, then match and score every pair from the store.

Both produce the same re-ranked lists (checked for every method: identical_reranked_lists).
With ``--scorers N`` both score with N scorer variants, and with ``--matchers M`` both
match with M matchers on the same features (a benchmark of M x N methods): ours extracts
once, matches once per matcher and re-uses the matches for every scorer; the naive way
redoes everything per method.

    python benchmarks/rerank_time.py --k 100 --scorers 3 --matchers 2   # the issue-13 figure

    python benchmarks/rerank_time.py                 # synthetic demo set, VLAD-SIFT retrieval, SIFT+MNN+RANSAC
    python benchmarks/rerank_time.py --queries 20 --k 10 --features aliked

The synthetic dataset and its retrieval are built in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets.index import index_dataset, read_table  # noqa: E402
from pipeline.datasets.synthetic import generate  # noqa: E402
from pipeline.extract_global import extract_global, fit_global  # noqa: E402
from pipeline.gpus import pick_device  # noqa: E402
from pipeline.images import load_tensor  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.local_features import build_model  # noqa: E402
from pipeline.extract_local import extract_local  # noqa: E402
from pipeline.matchers import build_matcher  # noqa: E402
from pipeline.rerank import match_topk, needed_images, score_topk  # noqa: E402
from pipeline.retrieval import build_index, search  # noqa: E402
from pipeline.scorers import build_scorer  # noqa: E402
from pipeline.topk import TopK, read_topk, write_topk  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
FEATURES = {
    "sift": ({"name": "sift", "max_keypoints": 2048}, {"name": "mnn", "ratio": 0.9}),
    "xfeat": ({"name": "xfeat", "weights": str(WEIGHTS / "xfeat.pt"), "max_keypoints": 1024},
              {"name": "lighterglue", "weights": str(WEIGHTS / "xfeat-lighterglue.pt")}),
    "aliked": ({"name": "aliked", "weights": str(WEIGHTS / "aliked-n16.pth"), "max_keypoints": 1024},
               {"name": "lightglue", "features": "aliked", "weights": str(WEIGHTS / "aliked_lightglue.pth")}),
}
SCORER = {"name": "ransac", "threshold": 24.0, "max_iters": 2000}
# further scorer variants for --scorers N (a benchmark compares several scorers on the same matches)
# --matchers M: matchers sharing the extractor (the first is FEATURES' own)
MATCHER_VARIANTS = [{"name": "mnn"}, {"name": "mnn", "ratio": 0.8}]
VARIANTS = [SCORER, {"name": "ransac", "method": "magsac", "threshold": 8.0}, {"name": "match_count"},
            {"name": "ransac", "threshold": 12.0, "max_iters": 2000}]


def retrieval(tmp: Path, root: Path, k: int, n_queries: int) -> Path:
    index_dataset(root, tmp / "index")
    model = {"name": "vlad", "local": {"name": "sift", "max_keypoints": 1000}, "n_clusters": 64, "dim": 128,
             "fit_images": 400}
    fit_global(model, root, tmp / "index" / "database.csv", tmp / "fit.pt", device="cpu")
    for split in ("database", "queries"):
        names = read_table(tmp / "index" / f"{split}.csv").name.tolist()
        extract_global(model, root, names, tmp / f"{split}.zarr", fit_state=tmp / "fit.pt", device="cpu")
    build_index([tmp / "database.zarr"], tmp / "faiss.index")
    t = search(tmp / "faiss.index", tmp / "queries.zarr", tmp / "full.h5", k=k, database=tmp / "database.zarr")
    sub = TopK(t.query_names[:n_queries], t.candidate_names[:n_queries], t.candidate_index[:n_queries],
               t.distances[:n_queries])
    write_topk(tmp / "topk.h5", sub)
    return tmp / "topk.h5"


def naive(root: Path, topk: TopK, k: int, ext_conf: dict, match_conf: dict, device: str,
          scorer_conf: dict = SCORER) -> np.ndarray:
    dev = pick_device(device)
    extractor, matcher = build_model(ext_conf).to(dev), build_matcher(match_conf).to(dev)
    scorer = build_scorer(scorer_conf)

    def describe(name):
        img = load_tensor(root / name, ext_conf.get("resize")).to(dev)
        f = extractor(img)
        f["image_size"] = torch.tensor([img.shape[2], img.shape[1]], device=dev)
        return f

    order = np.zeros((len(topk), k), np.int64)
    for qi, qname in enumerate(topk.query_names):
        fq = describe(qname)
        scores = []
        for cname in topk.candidate_names[qi, :k]:
            fc = describe(cname)
            m = matcher(fq, fc)["matches"].cpu().numpy()
            scores.append(scorer.score_pair(fq["keypoints"].cpu().numpy(), fc["keypoints"].cpu().numpy(), m, {}, {}))
        order[qi] = np.argsort(-scorer.finalize(np.asarray(scores)), kind="stable")
    return order


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--features", choices=sorted(FEATURES), default="sift")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="device for extraction and matching (cpu, cuda, auto)")
    p.add_argument("--scorers", type=int, default=1, choices=range(1, len(VARIANTS) + 1),
                   help="score with this many scorer variants (ours re-uses features and matches)")
    p.add_argument("--matchers", type=int, default=1, choices=range(1, len(MATCHER_VARIANTS) + 2),
                   help="match with this many matchers on the one extractor (ours extracts once)")
    p.add_argument("--workers", type=int, default=2, help="scoring processes of ours (the score rule's threads)")
    p.add_argument("--descriptors", choices=("float32", "float16"), default="float32",
                   help="descriptor storage of ours: float32 (default) holds the values the naive way matches, so "
                        "the re-ranked lists must be identical; float16 (the store's default) halves the store "
                        "and may flip near-tie matches")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ext_conf, match_conf = FEATURES[a.features]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "demo"
        generate(root, {"seed": 0})
        topk_path = retrieval(tmp, root, a.k, a.queries)
        topk = read_topk(topk_path)

        # warm-up (CUDA context, kernels, caches) outside both timings: one naive query
        naive(root, TopK(topk.query_names[:1], topk.candidate_names[:1], topk.candidate_index[:1],
                         topk.distances[:1]), 2, ext_conf, match_conf, a.device)

        t0 = time.perf_counter()
        names = needed_images([(topk_path, a.k)])
        stored = {**ext_conf, "store": {"descriptors": a.descriptors}}
        write_json(tmp / "feat.json", extract_local(stored, root, names, tmp / "local", device=a.device))
        t1 = time.perf_counter()
        matchers = ([match_conf] + MATCHER_VARIANTS)[: a.matchers]
        methods = [(mi, si) for mi in range(a.matchers) for si in range(a.scorers)]
        for mi, conf in enumerate(matchers):
            match_topk(tmp / "feat.json", conf, topk_path, a.k, tmp / f"m{mi}.h5", device=a.device)
        t2 = time.perf_counter()
        ours_all = [score_topk(tmp / "feat.json", tmp / f"m{mi}.h5", VARIANTS[si], topk_path, a.k,
                               tmp / f"rr{mi}_{si}.h5", workers=a.workers)
                    for mi, si in methods]
        ours = ours_all[0]
        ours_s = time.perf_counter() - t0
        stages = {"extract_s": round(t1 - t0, 2), "match_s": round(t2 - t1, 2), "score_s": round(ours_s - t2 + t0, 2)}

        t0 = time.perf_counter()
        orders = [naive(root, topk, a.k, ext_conf, matchers[mi], a.device, VARIANTS[si]) for mi, si in methods]
        naive_s = time.perf_counter() - t0

    # the whole re-ranked lists, for every scorer variant
    differing = [int((np.take_along_axis(topk.candidate_names[:, : a.k], order, 1)
                      != o.candidate_names[:, : a.k]).any(1).sum()) for order, o in zip(orders, ours_all)]
    identical = not any(differing)
    naive_names = np.take_along_axis(topk.candidate_names[:, : a.k], orders[0], 1)
    same = float(np.mean(naive_names[:, 0] == ours.candidate_names[:, 0]))
    print(json.dumps({
        "features": a.features, "device": a.device, "matchers": a.matchers, "scorers": a.scorers, "queries": len(topk), "k": a.k, "images_extracted_ours": len(names),
        "images_extracted_naive": len(topk) * (a.k + 1) * len(methods), "ours_s": round(ours_s, 2), "ours_stages": stages, "naive_s": round(naive_s, 2),
        "ours_s_per_query": round(ours_s / len(topk), 3), "naive_s_per_query": round(naive_s / len(topk), 3),
        "speedup_naive_over_ours": round(naive_s / ours_s, 2), "same_top1": same,
        "identical_reranked_lists": bool(identical), "queries_with_other_lists_per_method": differing,
        "score_workers": a.workers, "descriptors": a.descriptors,
    }, indent=2))


if __name__ == "__main__":
    main()
