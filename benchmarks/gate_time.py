"""Gated re-ranking: its wall time against (fraction re-ranked x full stage-2 time + gate cost).

One run on the same data: the synthetic demo set with VLAD-SIFT retrieval; stage 2 (local
feature extraction of the queries sent and their K candidates, matching, scoring) runs from
scratch for the full query set and for gates that send a given share of the queries (the
threshold is the matching quantile of the signal). Prints per share the measured wall time,
the prediction, their ratio, and R@1 (with the queries broken and fixed by re-ranking).

    python benchmarks/gate_time.py                       # SIFT + MNN + RANSAC, K = 20, signal ratio
    python benchmarks/gate_time.py --features aliked --signal sue --shares 1 0.5 0.25 0.1 0
    python benchmarks/gate_time.py --signal inliers      # the gate matches each query's top-1 first
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rerank_time import FEATURES, SCORER, retrieval  # noqa: E402

from pipeline.datasets.synthetic import generate  # noqa: E402
from pipeline.evaluate import evaluate_topk, top1_changes  # noqa: E402
from pipeline.extract_local import extract_local  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.rerank import match_topk, needed_images, score_topk  # noqa: E402
from pipeline.topk import read_topk, write_topk  # noqa: E402
from pipeline.gate_probe import probe_top1  # noqa: E402
from pipeline.uncertainty import GATE_SIGNALS, PROBE_SIGNAL, gate_topk, retrieval_confidence  # noqa: E402


def stage2(tmp: Path, root: Path, topk_path: Path, full_path: Path, k: int, ext: dict, matcher: dict, tag: str):
    """Extraction + matching + scoring from scratch (own store and pair store); wall seconds."""
    t0 = time.perf_counter()
    names = needed_images([(topk_path, k)])
    write_json(tmp / f"feat_{tag}.json", extract_local(ext, root, names, tmp / f"local_{tag}", device="cpu"))
    match_topk(tmp / f"feat_{tag}.json", matcher, topk_path, k, tmp / f"m_{tag}.h5", device="cpu",
               store_base=tmp / f"pairs_{tag}")
    score_topk(tmp / f"feat_{tag}.json", tmp / f"m_{tag}.h5", SCORER, topk_path, k, tmp / f"rr_{tag}.h5",
               merge_into=full_path, workers=2)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", choices=sorted(FEATURES), default="sift")
    p.add_argument("--signal", choices=GATE_SIGNALS, default="ratio",
                   help="inliers: the method's RANSAC inliers with each query's top-1 (one pair per query, "
                        "matched into the run's stores, which stage 2 then reuses)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    a = p.parse_args()
    ext, matcher = FEATURES[a.features]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = tmp / "demo"
        generate(root, {"seed": 0})
        full_path = retrieval(tmp, root, a.k, a.queries)
        full = read_topk(full_path)

        def probe(tag):  # the inliers gate works in the run's own stores, as the workflow's in the dataset's
            return {"features": ext, "matcher": matcher, "scorer": SCORER, "root": str(root), "device": "cpu",
                    "feature_base": str(tmp / f"local_{tag}"), "pair_base": str(tmp / f"pairs_{tag}")}

        probing = a.signal == PROBE_SIGNAL
        # the thresholds giving each share (for inliers: from a probe in stores of its own, not timed)
        conf = probe_top1(full, probe("quantiles"))[0] if probing else retrieval_confidence(full, a.signal)
        rows, base_time = [], None
        for share in sorted(a.shares, reverse=True):
            threshold = math.inf if share >= 1 else (-math.inf if share <= 0 else float(np.quantile(conf, share)))
            t0 = time.perf_counter()
            gated, info = gate_topk(full, a.signal, threshold, probe=probe(f"{share}") if probing else None)
            write_topk(tmp / f"gate_{share}.h5", gated)
            gate_s = time.perf_counter() - t0
            wall = stage2(tmp, root, tmp / f"gate_{share}.h5", full_path, a.k, ext, matcher, f"{share}") + gate_s
            if base_time is None and share >= 1:
                base_time = wall - gate_s
            out = read_topk(tmp / f"rr_{share}.h5")
            r1 = evaluate_topk(out, ns=(1,))["R@1"]
            rows.append((info["fraction_reranked"], wall, gate_s, r1, top1_changes(full, out)))
        print(f"{a.features} + {matcher['name']} + RANSAC, K={a.k}, {len(full)} queries, gate signal {a.signal}; "
              f"retrieval R@1 {evaluate_topk(full, ns=(1,))['R@1']:.1f}")
        print(f"{'re-ranked':>9} {'wall s':>8} {'predicted s':>11} {'wall/pred':>9} {'gate s':>7} {'R@1':>6} "
              f"{'broken':>6} {'fixed':>5}")
        for frac, wall, gate_s, r1, ch in rows:
            pred = frac * base_time + gate_s if base_time else math.nan
            ratio = f"{wall / pred:9.2f}" if pred > 0.05 else f"{'-':>9}"
            print(f"{100 * frac:8.0f}% {wall:8.2f} {pred:11.2f} {ratio} {gate_s:7.3f} {r1:6.1f} "
                  f"{ch['broken@1']:6d} {ch['fixed@1']:5d}")
        sent = [(f, w) for f, w, *_ in rows if f > 0]
        if len(sent) >= 2:  # wall = fixed + per-share cost: what a gate cannot save (model loading, pools)
            slope, fixed = np.polyfit([f for f, _ in sent], [w for _, w in sent], 1)
            print(f"fit over the runs that re-ranked something: wall = {fixed:.2f} s fixed + {slope:.2f} s x share "
                  f"(full run {base_time:.2f} s: {100 * fixed / base_time:.0f}% of it is fixed)")


if __name__ == "__main__":
    main()
