"""Published results, reproduced: registered data files that come with their authors' numbers.

An entry of ``pipeline/assets.yaml`` with ``published`` (the thesis's seven stage-1 top-k
files: CosPlace ResNet-50, top-100) carries the Recall@N its authors printed for it, the
threshold and the query count. :func:`reproduce` evaluates the file with this project's
evaluation and puts the two side by side; the table is ``results/thesis/stage1.csv``
(rule ``published_stage1``) or ``python -m pipeline published-recalls``. Each row also gives
the AUC-PR with which each retrieval confidence signal (l2, ratio, SUE:
:mod:`pipeline.uncertainty`) predicts a right top-1 on that real query set.

A difference is an error. The published recalls were printed by numpy (``[26.31578947
38.15789474 ...]``): a value is reproduced when it is within half a unit of the last
decimal printed in its line (``80.`` beside ``88.57142857`` is ``80.00000000``), and the
query count must match.

Files that are neither here nor downloadable get a row that says so, with the command that
fetches them, instead of a recall.
"""

from __future__ import annotations

import logging
import math

from .assets import Asset, check_file, fetch, find_asset, load_registry, locate
from .download import mirrored
from .evaluate import evaluate_topk, write_results
from .topk import read_external_topk
from .uncertainty import signals, summary_rows

logger = logging.getLogger(__name__)

REPRODUCED, DIFFERENT, NOT_HERE = "reproduced", "DIFFERENT", "not here"


class NotReproduced(ValueError):
    """A published number this project does not get from the same file."""


def published_assets(registry: dict[str, Asset] | None = None) -> list[Asset]:
    """The registered files with published results, in registry order."""
    registry = load_registry() if registry is None else registry
    return [a for a in registry.values() if a.published]


def published_recalls(asset: Asset) -> tuple[list[int], list[float], float]:
    """``(ns, recalls, tolerance)`` of an asset's published line: the N of each R@N, the
    values, and half a unit of the last decimal printed."""
    pub = asset.published or {}
    text = str(pub.get("recalls", "")).strip().strip("[]")
    words = text.split()
    ns = [int(n) for n in pub.get("recall_at", [])]
    if not words or len(words) != len(ns):
        raise ValueError(f"assets.yaml: {asset.name}.published: recalls {pub.get('recalls')!r} "
                         f"do not match recall_at {ns}")
    decimals = max(len(w.split(".")[1]) if "." in w else 0 for w in words)
    return ns, [float(w) for w in words], 0.5 * 10.0 ** -decimals


def reproduce(asset: Asset, path) -> dict:
    """One row: the file evaluated here beside its published recalls (status ``reproduced``
    or ``DIFFERENT``)."""
    ns, theirs, tolerance = published_recalls(asset)
    pub = asset.published
    threshold = float(pub.get("threshold_m", 25))
    topk = read_external_topk(path)
    ours = evaluate_topk(topk, threshold=threshold, ns=ns)
    row = _head(asset)
    row.update({"n_queries": len(topk), "n_queries_published": pub.get("n_queries", ""), "threshold_m": threshold})
    worst = 0.0
    for n, value in zip(ns, theirs):
        row[f"R@{n}"] = f"{ours[f'R@{n}']:.8f}"
        row[f"R@{n}_published"] = value
        worst = max(worst, abs(ours[f"R@{n}"] - value)) if not math.isnan(ours[f"R@{n}"]) else math.inf
    same_count = pub.get("n_queries") in (None, len(topk))
    # real photos, real retrieval: how well each retrieval signal predicts a right top-1
    # (SUE's AUC-PR; chance is the share of right top-1s)
    if topk.k >= 2:
        for r in summary_rows(signals(topk, threshold)):
            row[f"AUC-PR_{r['signal']}"] = f"{r['auc_pr']:.3f}"
        row["top1_right_pct"] = f"{r['top1_right_pct']:.2f}"
    row.update({"max_difference": f"{worst:.2e}", "tolerance": f"{tolerance:.0e}",
                "status": REPRODUCED if worst <= tolerance + 1e-12 and same_count else DIFFERENT,
                "sha256": check_file(asset, path)[:12] if path.is_file() else ""})
    if not same_count:
        row["status"] += f" ({len(topk)} queries, published {pub['n_queries']})"
    return row


def not_here_row(asset: Asset) -> dict:
    row = _head(asset)
    urls = ", ".join(mirrored(list(asset.urls))[:1]) or "no URL"
    row["status"] = f"{NOT_HERE}: python -m pipeline assets fetch {asset.name} ({urls})"
    return row


def _head(asset: Asset) -> dict:
    return {"query_set": asset.title or asset.name, "asset": asset.name, "file": asset.file}


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r.get("status", "").startswith(NOT_HERE):
            lines.append(f"  {r['query_set']:<45} {r['status']}")
            continue
        pairs = " ".join(f"{k}={float(r[k]):.2f} ({r[k + '_published']})"
                         for k in r if k.startswith("R@") and not k.endswith("_published"))
        lines.append(f"  {r['query_set']:<45} {r['status']:<11} {pairs}")
    return "\n".join(lines)


def stage1_table(names: list[str] | None, out=None, fetch_missing: bool = False) -> list[dict]:
    """Every published file of ``names`` (default: all) that is here (or, ``fetch_missing``,
    downloadable) evaluated beside its published recalls; the others get a "not here" row.
    Writes ``out`` (CSV) when given; raises :class:`NotReproduced` after writing when any
    file gives other numbers."""
    assets = [find_asset(n) for n in names] if names else published_assets()
    rows = []
    for asset in assets:
        if not asset.published:
            raise ValueError(f"{asset.name}: the registry has no published results for it")
        path = fetch(asset) if fetch_missing else locate(asset)
        rows.append(not_here_row(asset) if path is None else reproduce(asset, path))
    if out is not None:
        write_results(out, rows, float_format=None)  # the published digits, all of them
    print(format_rows(rows))
    bad = [r for r in rows if r["status"].startswith(DIFFERENT)]
    if bad:
        raise NotReproduced(
            f"{len(bad)} published result(s) not reproduced:\n" + format_rows(bad)
            + "\n(ours first, published in brackets; see " + (str(out) if out else "the table above") + ")")
    logger.info("%d of %d published files here, all reproduced", sum(r["status"] == REPRODUCED for r in rows), len(rows))
    return rows


def _arguments(p):
    p.add_argument("names", nargs="*", help="registered data files with published results (default: all)")
    p.add_argument("--out", default=None, help="the table (CSV)")
    p.add_argument("--fetch", action="store_true", help="download the files that are not here")


def _run(a):
    stage1_table(a.names or None, a.out, a.fetch)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"published-recalls": (_arguments, _run)}
