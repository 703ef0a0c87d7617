"""Time every configured re-ranking method, stage by stage, on one dataset's retrieval.

    python benchmarks/rerank_methods.py --dataset demo --device cuda --k 10 \
        [--methods d2net_ransac loftr ...] [--queries 20]

Runs the stage functions the Snakemake rules call (local features -> matching ->
scoring -> recalls) for each method of ``config.yaml`` on the retrieval top-k already
in ``work/{dataset}/topk/`` (build it first, e.g. ``snakemake work/demo/topk/vlad_aliked.h5``),
in a scratch folder (``--work``), and prints per method: extraction, matching and
scoring seconds per query (query + K candidates) and R@1 before / after re-ranking.
Weight files under ``work/random_weights/`` that do not exist yet are written as
seeded random checkpoints (the recalls are then meaningless; the times are not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from pipeline.evaluate import evaluate_topk  # noqa: E402
from pipeline.extract_local import extract_local  # noqa: E402
from pipeline.assets import weight_paths  # noqa: E402
from pipeline.random_weights import parse_name, write_random  # noqa: E402
from pipeline.rerank import NameResolver, match_topk, needed_images, score_topk  # noqa: E402
from pipeline.topk import TopK, read_topk, write_topk  # noqa: E402


def ensure_weights(conf: dict) -> None:
    for p in weight_paths(conf):
        if "random_weights/" in p and not Path(p).exists():
            model, seed = parse_name(p)
            write_random(model, p, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "config.yaml"))
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--methods", nargs="*", default=None, help="rerank_methods entries (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--k", type=int, default=None, help="override each method's K")
    ap.add_argument("--queries", type=int, default=None, help="only the first N queries")
    ap.add_argument("--work", default="/tmp/rerank_methods_bench")
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    root = cfg["datasets"][a.dataset]["root"]
    wdir = Path(cfg.get("work_dir", "work"))
    index_dir = wdir / a.dataset / "index"
    resolve = NameResolver(root, index_dir)
    work = Path(a.work)
    rows = []
    for m in a.methods or list(cfg["rerank_methods"]):
        c = cfg["rerank_methods"][m]
        k = a.k or c.get("k", 100)
        topk_path = wdir / a.dataset / "topk" / f"{c['retrieval']}.h5"
        t = read_topk(topk_path)
        if a.queries:
            t = TopK(t.query_names[: a.queries], t.candidate_names[: a.queries], t.candidate_index[: a.queries],
                     t.distances[: a.queries], t.meta)
            topk_path = work / a.dataset / f"{c['retrieval']}_{a.queries}.h5"
            write_topk(topk_path, t)
        matcher = cfg["matchers"][c["matcher"]]
        ensure_weights(matcher)
        features = None
        t0 = time.perf_counter()
        if c.get("features"):
            fconf = cfg["local_features"][c["features"]]
            ensure_weights(fconf)
            names = needed_images([(topk_path, k)], resolve)
            info = extract_local(fconf, root, names, work / a.dataset / "local", a.device)
            features = work / a.dataset / "local" / f"{c['features']}.json"
            features.write_text(json.dumps(info, default=str))
        t_extract_wall = time.perf_counter() - t0
        mfile = work / a.dataset / "matches" / f"{m}.h5"
        match_topk(features, matcher, topk_path, k, mfile, resolve, a.device, root=root)
        out = work / a.dataset / "rerank" / f"{m}.h5"
        rr = score_topk(features, mfile, cfg["scorers"][c["scorer"]], topk_path, k, out, resolve)
        base_r1 = evaluate_topk(topk_path, ns=[1])["R@1"]
        rr_r1 = evaluate_topk(rr, ns=[1])["R@1"]
        meta = rr.meta
        rows.append({
            "method": m, "K": k, "queries": len(t), "extract_wall_s": t_extract_wall,
            "extract_s_per_query": meta.get("seconds_per_query_extraction") or 0.0,
            "match_s_per_query": meta["seconds_per_query_matching"],
            "score_s_per_query": meta["seconds_per_query_scoring"], "R@1 retrieval": base_r1, "R@1 reranked": rr_r1,
        })
    keys = list(rows[0]) if rows else []
    print("\t".join(keys))
    for r in rows:
        print("\t".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
