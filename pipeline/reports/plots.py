"""Trade-off plots of the thesis, each written as PNG + SVG with its numbers as CSV beside it.

- :func:`recall_vs_time` (Figure 4.7): R@1 of every method against its re-ranking time
  per query (extraction of the query and its K candidates + matching + scoring, as the
  pipeline measured them), the retrieval baseline as a line.
- :func:`recall_vs_k` (Figure 4.8): R@1 when only the first K retrieved candidates are
  re-ranked, K = 1 .. the method's K, with the retrieval's R@K (the upper bound: the
  best any re-ranking of K candidates can do) and its R@1.

Re-ranking fewer candidates is replayed from the stored scores: the first K retrieved
candidates are ordered by the scores computed for the method's full K (stable, so ties
keep the retrieval order). Scores that do not depend on the other candidates (inlier
counts, pair scores) give exactly what a run with that K gives; scorers that normalise
over the candidates (multi-scale RANSAC, Rapid Spatial Scoring) would normalise over
fewer, so their curve approximates such runs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..evaluate import candidate_distances  # noqa: E402
from ..io import atomic_path  # noqa: E402
from ..topk import read_extra, read_topk  # noqa: E402


def _save(fig, base: Path) -> list[str]:
    out = []
    for ext in ("png", "svg"):
        path = base.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
        out.append(str(path))
    plt.close(fig)
    return out


def _write_csv(frame: pd.DataFrame, path: Path) -> str:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")
    return str(path)


def recall_vs_time(results: pd.DataFrame, dataset: str, out_base) -> dict[str, list[str] | str]:
    """``results``: rows of :func:`pipeline.reports.summary.read_results`."""
    out_base = Path(out_base)
    g = results[results.dataset == dataset]
    rr = g[g.kind == "rerank"]
    data = pd.DataFrame({
        "method": rr["method"], "retrieval": rr["retrieval"],
        "seconds_per_query": rr.get("rerank_s_per_query", np.nan),
        "extract_s_per_query": rr.get("extract_s_per_query", np.nan),
        "match_s_per_query": rr.get("match_s_per_query", np.nan),
        "score_s_per_query": rr.get("score_s_per_query", np.nan),
        "R@1": rr["R@1"], "random_weights": rr["weights"].astype(str).str.startswith("RANDOM"),
    }).sort_values("seconds_per_query").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, r in data.iterrows():
        marker = "x" if r.random_weights else "o"
        ax.scatter(r.seconds_per_query, r["R@1"], marker=marker, s=40)
        ax.annotate(r.method + (" (random)" if r.random_weights else ""), (r.seconds_per_query, r["R@1"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for _, b in g[g.kind == "retrieval"].iterrows():
        ax.axhline(b["R@1"], ls="--", lw=1, color="grey")
        ax.annotate(f"{b.method} (retrieval)", (0, b["R@1"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(4, 2), fontsize=8, color="grey")
    if len(data) and (data.seconds_per_query > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("re-ranking time per query (s): extraction + matching + scoring")
    ax.set_ylabel("R@1 (%)")
    ax.set_title(f"{dataset}: recall vs time")
    ax.grid(alpha=0.3)
    return {"figures": _save(fig, out_base), "csv": _write_csv(data, out_base.with_suffix(".csv"))}


def recall_at_1_by_k(retrieval_topk, reranked_topk, threshold: float = 25.0, positions=None) -> pd.DataFrame:
    """R@1 after re-ranking the first K candidates, K = 1 .. the method's K, and the
    retrieval's R@1 and R@K (upper bound)."""
    base, rr = read_topk(retrieval_topk, made_here=True), read_topk(reranked_topk, made_here=True)
    kmax = int(rr.meta.get("rerank_k", 0))
    if not kmax:
        raise ValueError(f"{reranked_topk}: not a re-ranked top-k file (no rerank_k in its meta)")
    stored = read_extra(reranked_topk, "rerank_scores")
    if list(base.query_names) != list(rr.query_names):
        raise ValueError(f"{retrieval_topk} and {reranked_topk} list other queries")
    correct = candidate_distances(base, positions)[:, :kmax] <= threshold
    scores = np.full((len(base), kmax), -np.inf)
    for qi in range(len(base)):
        rank = {n: r for r, n in enumerate(base.candidate_names[qi, :kmax])}
        for j, n in enumerate(rr.candidate_names[qi, :kmax]):
            scores[qi, rank[n]] = stored[qi, j]
    rows = []
    for k in range(1, kmax + 1):
        top = np.argmax(scores[:, :k], axis=1)  # first maximum: ties keep the retrieval order
        rows.append({"K": k, "reranked_R@1": 100.0 * correct[np.arange(len(base)), top].mean(),
                     "retrieval_R@1": 100.0 * correct[:, 0].mean(),
                     "upper_bound_R@K": 100.0 * correct[:, :k].any(1).mean()})
    return pd.DataFrame(rows)


def recall_vs_k(curves: dict[str, pd.DataFrame], dataset: str, out_base) -> dict[str, list[str] | str]:
    """One curve per method (``curves``: method -> :func:`recall_at_1_by_k`), plus the bounds."""
    out_base = Path(out_base)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    frames = []
    for method, c in sorted(curves.items()):
        ax.plot(c.K, c["reranked_R@1"], marker=".", label=method)
        frames.append(c.assign(method=method))
    if frames:
        longest = max(curves.values(), key=len)
        ax.plot(longest.K, longest["upper_bound_R@K"], ls="--", color="black", label="upper bound (retrieval R@K)")
        ax.axhline(longest["retrieval_R@1"].iloc[0], ls=":", color="grey", label="retrieval R@1")
    ax.set_xlabel("K: candidates re-ranked")
    ax.set_ylabel("R@1 (%)")
    ax.set_title(f"{dataset}: R@1 vs number of re-ranked candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["K", "reranked_R@1", "retrieval_R@1", "upper_bound_R@K", "method"])
    return {"figures": _save(fig, out_base), "csv": _write_csv(data, out_base.with_suffix(".csv"))}
