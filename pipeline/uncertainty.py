"""Per-query uncertainty of a retrieval: is its top-1 right? Signals and how well they tell.

When to re-rank at all (the thesis authors' follow-up, "To Match or Not to Match", CVPRW 2025):
a query whose top-1 is surely right gains nothing from re-ranking and may be broken by it. The
signals here say, per query, how confident the retrieval is (higher = more confident):

- ``l2``: minus the L2 distance of the query's descriptor to its top-1 (top-k files keep
  squared L2 of unit vectors, ``2 - 2 cos``);
- ``ratio``: minus the distance ratio d1/d2 of the top-1 and top-2 (the "PA score");
- ``sue``: minus SUE (Zaffar et al., CVPR 2024): the spatial spread of the top-10 candidates'
  positions, each weighted by ``exp(-slope * d_i)`` of its descriptor distance (slope 350, 10
  neighbours, differences clipped at 500 m from above, as MubarizZaffar/SUE ``sue.py``);
- ``inliers``: the re-ranking score (RANSAC inliers) of the query and its retrieval top-1,
  from a re-ranking method's output, where one is given.

:func:`auc_pr` is the area under the precision-recall curve of "the top-1 is right" against a
signal, computed as scikit-learn's ``precision_recall_curve`` + ``auc`` (what SUE reports):
SUE's paper ranks the signals 0.93-0.97 (inliers), 0.885 (SUE), 0.797 (L2), 0.774 (ratio).

``python -m pipeline uncertainty --topk T [--reranked R ...] --out signals.csv --summary auc.csv``
writes both tables and a precision-recall plot.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .evaluate import _positions, candidate_distances
from .args import json_arg
from .io import atomic_path
from .topk import TopK, read_extra, read_topk

logger = logging.getLogger(__name__)

SUE_NEIGHBOURS, SUE_SLOPE, SUE_CLIP_M = 10, 350.0, 500.0


def descriptor_distances(topk: TopK) -> np.ndarray:
    """``[Q, k]`` L2 distances of the descriptors (top-k files store squared ones)."""
    return np.sqrt(np.maximum(np.asarray(topk.distances, np.float64), 0.0))


def local_offsets(topk: TopK, positions=None, k: int | None = None) -> np.ndarray:
    """``[Q, k, 2]`` east/north metres of each query's first ``k`` candidates from its top-1:
    UTM differences where they share a UTM zone (what SUE uses), else Earth-centred positions
    projected on the tangent plane at the top-1 (right across zones and hemispheres)."""
    k = topk.k if k is None else min(k, topk.k)
    pos = _positions(topk.candidate_names[:, :k].ravel(), positions)
    xyz = pos.xyz.reshape(len(topk), k, 3)
    origin = xyz[:, :1]
    lon = np.arctan2(origin[..., 1], origin[..., 0])
    lat = np.arctan2(origin[..., 2], np.hypot(origin[..., 0], origin[..., 1]))
    east = np.stack([-np.sin(lon), np.cos(lon), np.zeros_like(lon)], -1)
    north = np.stack([-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)], -1)
    rel = xyz - origin
    tangent = np.stack([(rel * east).sum(-1), (rel * north).sum(-1)], -1)
    xy = pos.xy.reshape(len(topk), k, 2)
    frame = pos.frame.reshape(len(topk), k)
    one_zone = ((frame == frame[:, :1]) & (frame != 0)).all(1)
    return np.where(one_zone[:, None, None], xy - xy[:, :1], tangent)


def sue(topk: TopK, positions=None, neighbours: int = SUE_NEIGHBOURS, slope: float = SUE_SLOPE,
        clip_m: float = SUE_CLIP_M) -> np.ndarray:
    """SUE's uncertainty per query: the weighted variance (m^2, mean of east and north) of the
    top-``neighbours`` candidates' positions, weights ``exp(-slope * d)`` of their descriptor
    L2 distances (normalised; computed relative to the smallest, which leaves them unchanged
    and never underflows). Differences are clipped at ``clip_m`` from above, as upstream."""
    xy = local_offsets(topk, positions, neighbours)
    d = descriptor_distances(topk)[:, : xy.shape[1]]
    w = np.exp(-slope * (d - d.min(1, keepdims=True)))
    w /= w.sum(1, keepdims=True)
    mean = (w[..., None] * xy).sum(1, keepdims=True)
    diff = np.minimum(clip_m, xy - mean)
    var = (w[..., None] * diff ** 2).sum(1)  # [Q, 2]
    return var.mean(1)


def top1_scores(retrieval: TopK, reranked_path) -> np.ndarray:
    """Per retrieval query, the re-ranking score of its retrieval top-1 (NaN where the
    re-ranked list has not that query or that candidate)."""
    reranked = read_topk(reranked_path, made_here=True)
    scores = read_extra(reranked_path, "rerank_scores")
    out = np.full(len(retrieval), np.nan)
    rows = reranked.rows_of(list(retrieval.query_names), strict=False)
    for i, (j, top1) in enumerate(zip(rows, retrieval.candidate_names[:, 0])):
        if j < 0:
            continue
        hit = np.flatnonzero(reranked.candidate_names[j, : scores.shape[1]] == top1)
        if hit.size:
            out[i] = scores[j, hit[0]]
    return out


def signals(topk: TopK, threshold: float = 25.0, positions=None, reranked: dict | None = None) -> dict:
    """Per query: ``query``, ``top1_right`` and a confidence per signal (higher = surer).
    ``reranked``: signal name -> re-ranked top-k file, whose scores of the top-1 become a signal."""
    if topk.k < 2:
        raise ValueError("uncertainty signals need at least 2 candidates per query")
    out = {"query": np.asarray(topk.query_names),
           "top1_right": candidate_distances(topk, positions)[:, 0] <= threshold,
           **{name: retrieval_confidence(topk, name, positions) for name in RETRIEVAL_SIGNALS}}
    for name, path in (reranked or {}).items():
        out[name] = top1_scores(topk, path)
    return out


def precision_recall_curve(right: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``precision_recall_curve`` (since 1.1: every distinct confidence, also past
    full recall): precision and recall from the lowest threshold up, then the (1, 0) end point."""
    right = np.asarray(right, bool)
    confidence = np.asarray(confidence, np.float64)
    order = np.argsort(-confidence, kind="mergesort")
    conf, hits = confidence[order], right[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(conf)), len(conf) - 1]  # the last index of each distinct value
    tps = np.cumsum(hits)[last]
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def auc_pr(right, confidence) -> float:
    """Area under the precision-recall curve (trapezoids over recall, as ``sklearn.metrics.auc``).
    Queries whose signal is NaN are left out; NaN when no query is right or none is left."""
    right, confidence = np.asarray(right, bool), np.asarray(confidence, np.float64)
    keep = ~np.isnan(confidence)
    if not keep.any() or not right[keep].any():
        return math.nan
    precision, recall = precision_recall_curve(right[keep], confidence[keep])
    return float(abs(np.trapezoid(precision, recall)))


def summary_rows(sig: dict) -> list[dict]:
    names = [k for k in sig if k not in ("query", "top1_right")]
    right = sig["top1_right"]
    return [{"signal": n, "auc_pr": auc_pr(right, sig[n]), "n_queries": int((~np.isnan(sig[n])).sum()),
             "top1_right_pct": 100.0 * float(right.mean())} for n in names]


def write_tables(sig: dict, out, summary_out, plot_out=None, title: str = "") -> list[dict]:
    import pandas as pd

    with atomic_path(out) as tmp:
        pd.DataFrame(sig).to_csv(tmp, index=False, float_format="%.6g")
    rows = summary_rows(sig)
    with atomic_path(summary_out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.4f")
    if plot_out is not None:
        plot_pr(sig, plot_out, title)
    return rows


def plot_pr(sig: dict, out, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    right = sig["top1_right"]
    for row in summary_rows(sig):
        conf = sig[row["signal"]]
        keep = ~np.isnan(conf)
        if math.isnan(row["auc_pr"]):
            continue
        p, r = precision_recall_curve(right[keep], conf[keep])
        ax.plot(r, p, label=f"{row['signal']} (AUC-PR {row['auc_pr']:.3f})")
    ax.axhline(float(right.mean()), color="grey", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="recall (queries whose top-1 is right)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title or "Is the top-1 right?")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)


def risk_coverage(right_before, right_after, confidence) -> tuple[np.ndarray, np.ndarray]:
    """R@1 (%) when only the least confident queries are re-ranked: ``(fraction, r_at_1)`` for
    0, 1, ..., Q queries re-ranked, least confident first (NaN signals count as least
    confident; ties in the order of the queries). Fraction 0 is retrieval alone, 1 the full
    re-ranking."""
    before, after = np.asarray(right_before, bool), np.asarray(right_after, bool)
    conf = np.nan_to_num(np.asarray(confidence, np.float64), nan=-np.inf)
    order = np.argsort(conf, kind="mergesort")
    gain = np.r_[0, np.cumsum(after[order].astype(int) - before[order].astype(int))]
    n = len(before)
    return np.arange(n + 1) / max(n, 1), 100.0 * (before.sum() + gain) / max(n, 1)


def right_after(retrieval: TopK, reranked: TopK, threshold: float = 25.0, positions=None) -> np.ndarray:
    """Per retrieval query, whether the re-ranked top-1 is right (the retrieval's own top-1
    for a query the re-ranked list has not)."""
    out = candidate_distances(retrieval, positions)[:, 0] <= threshold
    rr = candidate_distances(reranked, positions)[:, 0] <= threshold
    rows = retrieval.rows_of(list(reranked.query_names), strict=False)
    out[rows[rows >= 0]] = rr[rows >= 0]
    return out


def rerank_seconds_per_query(reranked: TopK) -> float | None:
    """A re-ranked file's measured time per query (extraction + matching + scoring)."""
    meta = reranked.meta
    if "seconds_per_query_matching" not in meta:
        return None
    return sum(float(meta.get(k) or 0.0) for k in ("seconds_per_query_extraction", "seconds_per_query_matching",
                                                    "seconds_per_query_scoring"))


def risk_coverage_table(sig: dict, right_after: np.ndarray, seconds_per_query: float | None = None):
    """Long table (signal, fraction re-ranked, R@1, estimated seconds per query: the fraction
    times the full re-ranking's measured time per query) for every signal of ``sig``."""
    import pandas as pd

    rows = []
    for name in (k for k in sig if k not in ("query", "top1_right")):
        frac, r1 = risk_coverage(sig["top1_right"], right_after, sig[name])
        rows.append(pd.DataFrame({"signal": name, "fraction_reranked": frac, "R@1": r1,
                                  "est_seconds_per_query": frac * seconds_per_query if seconds_per_query else np.nan}))
    return pd.concat(rows, ignore_index=True)


def gated_point(name: str, reranked: TopK, threshold: float = 25.0, positions=None) -> dict:
    """A gated method as run: the share of queries it re-ranked, its R@1 over every query and
    its measured time per query (the gate's included), as a row of the risk-coverage table."""
    from .evaluate import evaluate_topk

    meta = reranked.meta
    seconds = rerank_seconds_per_query(reranked)
    return {"signal": f"measured: {name}", "fraction_reranked": float(meta.get("fraction_reranked", 1.0)),
            "R@1": evaluate_topk(reranked, threshold, (1,), positions)["R@1"],
            "est_seconds_per_query": (seconds or 0.0) + float(meta.get("seconds_per_query_gate") or 0.0)}


def plot_risk_coverage(table, out, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    measured = table.signal.astype(str).str.startswith("measured: ")
    for name, g in table[~measured].groupby("signal", sort=False):
        ax.plot(100 * g.fraction_reranked, g["R@1"], label=name)
    for _, r in table[measured].iterrows():  # gated runs: measured, not estimated
        ax.plot(100 * r.fraction_reranked, r["R@1"], marker="o", ls="none", mec="black",
                label=f"{r.signal[len('measured: '):]} ({r.est_seconds_per_query:.3g} s/query)")
    first = table[~measured]
    first = first[first.signal == first.signal.iloc[0]]
    ax.axhline(first["R@1"].iloc[0], color="grey", lw=0.8, ls=":", label="retrieval alone")
    ax.axhline(first["R@1"].iloc[-1], color="black", lw=0.8, ls="--", label="every query re-ranked")
    ax.set(xlabel="queries re-ranked (%), least confident first", ylabel="R@1 (%)", title=title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)


#: the signals a gate can use before stage 2 (the retrieval's own; no matching)
RETRIEVAL_SIGNALS = ("l2", "ratio", "sue")
#: the re-ranking method's own score of the top-1 pair (RANSAC inliers, ...): one pair per query
PROBE_SIGNAL = "inliers"
GATE_SIGNALS = RETRIEVAL_SIGNALS + (PROBE_SIGNAL,)


def retrieval_confidence(topk: TopK, signal: str, positions=None) -> np.ndarray:
    """One of the signals known before stage 2 (higher = surer), per query."""
    if signal not in RETRIEVAL_SIGNALS:
        raise ValueError(f"gate signal {signal!r}: one of {RETRIEVAL_SIGNALS} (signals known before stage 2)")
    d = descriptor_distances(topk)
    return {"l2": lambda: -d[:, 0], "ratio": lambda: -d[:, 0] / np.maximum(d[:, 1], 1e-12),
            "sue": lambda: -sue(topk, positions)}[signal]()


def gate_confidence(topk: TopK, signal: str, positions=None, probe: dict | None = None, workdir=None) -> np.ndarray:
    """Per query, the confidence a gate thresholds: a retrieval signal, or ``inliers``."""
    if signal == PROBE_SIGNAL:
        if probe is None:
            raise ValueError("the inliers signal needs the method's probe (features, matcher, scorer, stores)")
        from .gate_probe import probe_top1

        return probe_top1(topk, probe, workdir)[0]
    if probe is not None:
        raise ValueError(f"signal {signal!r} is read from the retrieval list: it takes no probe")
    return retrieval_confidence(topk, signal, positions)


def fit_logistic(confidence, right, iters: int = 100, l2: float = 1e-6) -> tuple[float, float]:
    """``(a, b)`` of P(top-1 right) = sigmoid(a + b * confidence), by Newton's method on the
    standardised signal (a tiny ridge keeps a separable set finite)."""
    c, y = np.asarray(confidence, np.float64), np.asarray(right, np.float64)
    keep = np.isfinite(c)
    c, y = c[keep], y[keep]
    if len(c) < 2 or y.min() == y.max():
        raise ValueError("a gate fit needs queries whose top-1 is right and queries whose top-1 is wrong")
    mu, sd = c.mean(), c.std() or 1.0
    x = np.c_[np.ones_like(c), (c - mu) / sd]
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    b = w[1] / sd
    return float(w[0] - b * mu), float(b)


def gate_fit(topk: TopK, signal: str, p_right: float = 0.5, threshold_m: float = 25.0, positions=None,
             probe: dict | None = None, workdir=None) -> dict:
    """A gate threshold learnt on one dataset: the logistic model of "the top-1 is right"
    given the signal, and the signal value where P(right) = ``p_right`` (queries below it are
    re-ranked). The record is applied to other datasets unchanged. ``inliers`` probes every
    query's top-1 pair on that dataset (``probe``, :func:`gate_confidence`)."""
    conf = gate_confidence(topk, signal, positions, probe, workdir)
    if not np.isfinite(conf).all():  # unscorable pairs (unreadable images): left out of the fit
        keep = np.isfinite(conf)
        topk = TopK([topk.query_names[i] for i in np.flatnonzero(keep)], topk.candidate_names[keep],
                    topk.candidate_index[keep], topk.distances[keep], topk.meta)
        conf = conf[keep]
    right = candidate_distances(topk, positions)[:, 0] <= threshold_m
    a, b = fit_logistic(conf, right)
    if b <= 0:
        raise ValueError(f"gate fit: on this dataset a higher {signal} confidence does not predict a right top-1 "
                         f"(slope {b:.3g}); choose another signal or a fixed threshold")
    threshold = (math.log(p_right / (1 - p_right)) - a) / b
    return {"signal": signal, "a": a, "b": b, "p_right": p_right, "threshold": threshold, "n_queries": len(topk),
            "top1_right_pct": 100.0 * float(right.mean()),
            "fraction_reranked_here": float(np.mean(conf < threshold))}


def gate_topk(topk: TopK, signal: str, threshold: float, positions=None, probe: dict | None = None,
              workdir=None) -> tuple[TopK, dict]:
    """The queries a gate re-ranks: those whose confidence (``signal``, higher = surer) is
    below ``threshold``, as a top-k file of those queries only (same order, same lists), and
    what was decided. ``threshold: inf`` re-ranks every query, ``-inf`` none.
    ``signal: inliers`` scores each query's top-1 with the method's own stage 2 (``probe``:
    :mod:`pipeline.gate_probe`), whose features and matches stage 2 then reuses."""
    import time

    t0 = time.perf_counter()
    if signal == PROBE_SIGNAL and math.isinf(threshold):  # every query or none: nothing to probe
        conf = np.zeros(len(topk))
    else:
        conf = gate_confidence(topk, signal, positions, probe, workdir)
    keep = np.flatnonzero(conf < threshold)
    gated = TopK([topk.query_names[i] for i in keep], topk.candidate_names[keep], topk.candidate_index[keep],
                 topk.distances[keep], {**topk.meta})
    info = {"signal": signal, "threshold": threshold, "n_queries": len(topk), "n_reranked": int(len(keep)),
            "fraction_reranked": len(keep) / max(len(topk), 1), "seconds": time.perf_counter() - t0}
    gated.meta["gate"] = info
    return gated, info


def _index_positions(index_dir):
    """Positions from a dataset's index tables (a dataset whose names carry none), or None."""
    if not index_dir:
        return None
    from .evaluate import index_positions

    return index_positions(index_dir)


INDEX_HELP = "the dataset's index folder: positions from its tables (datasets with a positions CSV)"


PROBE_HELP = ("signal inliers: the method's stage 2 as JSON {features, matcher, scorer: confs; root; feature_base, "
              "pair_base: the dataset's stores; index_dir}; its top-1 pairs are matched into those stores")


def _probe_args(p):
    p.add_argument("--probe", type=json_arg, default=None, help=PROBE_HELP)
    p.add_argument("--workdir", default=None, help="folder for the probe's temporary files (default: the system's)")


def _gate_arguments(p):
    p.add_argument("--topk", required=True, help="the retrieval's top-k file")
    p.add_argument("--signal", required=True, choices=GATE_SIGNALS)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="re-rank queries whose confidence is below this")
    how.add_argument("--fit", help="a gate-fit record (JSON): its threshold, learnt on another dataset")
    p.add_argument("--out", required=True, help="top-k file of the queries to re-rank")
    p.add_argument("--index-dir", default=None, help=INDEX_HELP)
    _probe_args(p)


def _gate(a):
    from .io import read_json
    from .topk import write_topk

    threshold = a.threshold
    if a.fit:
        fit = read_json(a.fit)
        if fit.get("signal") != a.signal:
            raise ValueError(f"{a.fit}: fitted for signal {fit.get('signal')!r}, not {a.signal!r}")
        threshold = float(fit["threshold"])
    gated, info = gate_topk(read_topk(a.topk, made_here=True), a.signal, threshold, _index_positions(a.index_dir),
                            a.probe, a.workdir)
    write_topk(a.out, gated)
    logger.info("gate %s < %g: %d of %d queries to re-rank (%.1f%%) in %.2f s", a.signal, threshold,
                info["n_reranked"], info["n_queries"], 100 * info["fraction_reranked"], info["seconds"])


def _fit_arguments(p):
    p.add_argument("--topk", required=True, help="the retrieval's top-k file on the dataset to learn from")
    p.add_argument("--signal", required=True, choices=GATE_SIGNALS)
    p.add_argument("--p-right", type=float, default=0.5,
                   help="re-rank queries whose predicted probability of a right top-1 is below this")
    p.add_argument("--threshold-m", type=float, default=25.0)
    p.add_argument("--out", required=True, help="the fit (JSON)")
    p.add_argument("--index-dir", default=None, help=INDEX_HELP)
    _probe_args(p)


def _fit(a):
    from .io import write_json

    if not 0 < a.p_right < 1:
        raise ValueError(f"--p-right {a.p_right}: a probability strictly between 0 and 1")
    fit = gate_fit(read_topk(a.topk, made_here=True), a.signal, a.p_right, a.threshold_m,
                   _index_positions(a.index_dir), a.probe, a.workdir)
    write_json(a.out, {**fit, "fitted_on": str(a.topk)})
    logger.info("gate fit on %s: P(right) = sigmoid(%.3g + %.3g x %s); threshold %.4g (re-ranks %.0f%% there)",
                a.topk, fit["a"], fit["b"], a.signal, fit["threshold"], 100 * fit["fraction_reranked_here"])


def _arguments(p):
    p.add_argument("--topk", required=True, help="a retrieval top-k file")
    p.add_argument("--reranked", nargs="*", default=[], metavar="NAME=FILE",
                   help="re-ranked top-k files whose score of the retrieval top-1 is a signal (e.g. inliers)")
    p.add_argument("--threshold", type=float, default=25.0)
    p.add_argument("--out", required=True, help="per-query signals (CSV)")
    p.add_argument("--summary", required=True, help="AUC-PR per signal (CSV)")
    p.add_argument("--plot", default=None, help="precision-recall curves (PNG/PDF)")
    p.add_argument("--title", default="")
    p.add_argument("--index-dir", default=None, help=INDEX_HELP)


def _run(a):
    reranked = {}
    for item in a.reranked:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--reranked {item!r}: expected NAME=FILE")
        reranked[name] = path
    sig = signals(read_topk(a.topk), a.threshold, _index_positions(a.index_dir), reranked)
    for row in write_tables(sig, a.out, a.summary, a.plot, a.title):
        print(f"{row['signal']:<16} AUC-PR {row['auc_pr']:.3f}  ({row['n_queries']} queries)")


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"uncertainty": (_arguments, _run), "gate": (_gate_arguments, _gate), "gate-fit": (_fit_arguments, _fit)}
