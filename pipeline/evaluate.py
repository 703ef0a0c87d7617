"""Recall@N of top-k lists: a query is correct at N when one of its first N
candidates lies within ``threshold`` metres of it (:mod:`pipeline.geodesy`: UTM within
a zone, as the VG benchmarks measure, and the geodesic across zones and hemispheres).

Positions are read from the VG benchmark names of the queries and candidates, so
any top-k file, ours or imported, is evaluated the same way without the images.
For datasets whose names carry no position, the index tables (positions from a
CSV) are given instead (``positions``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from . import geodesy
from .args import add_result_arguments
from .datasets.names import BadNameError, Position, parse_name
from .io import atomic_path
from .topk import TopK, read_topk

logger = logging.getLogger(__name__)

DEFAULT_NS = (1, 5, 10, 20, 100)


def index_positions(index_dir) -> dict[str, Position]:
    """Positions by image name from a dataset's index tables (all in its common zone)."""
    from .datasets.index import read_table
    from .io import read_json

    index_dir = Path(index_dir)
    zone = read_json(index_dir / "summary.json")["zone"]
    out = {}
    for split in ("database", "queries"):
        df = read_table(index_dir / f"{split}.csv")
        for name, e, n, lat, lon in zip(df.name, df.east, df.north, df.lat, df.lon):
            out[name] = Position(float(e), float(n), int(zone[:-1]), zone[-1], float(lat), float(lon))
    return out


def _position(name, lookup):
    if lookup is not None and name in lookup:
        return lookup[name]
    try:
        return parse_name(name)
    except BadNameError as e:
        if lookup is None:
            raise
        raise BadNameError(f"{e} (and it is not in the dataset's index tables)") from None


def _positions(names, lookup=None) -> geodesy.Positions:
    pos = [_position(n, lookup) for n in names]
    return geodesy.from_utm([p.east for p in pos], [p.north for p in pos], [p.zone_id for p in pos],
                            [p.lat for p in pos], [p.lon for p in pos])


def candidate_distances(topk: TopK, positions: dict | None = None) -> np.ndarray:
    """``[Q, k]`` metres between each query and each of its candidates (:func:`geodesy.distance`)."""
    q = _positions(topk.query_names, positions)
    c = _positions(topk.candidate_names.ravel(), positions)
    rows = np.repeat(np.arange(len(topk)), topk.k)
    return geodesy.distance(q.take(rows), c).reshape(len(topk), topk.k)


def recall_at_n(correct: np.ndarray, ns=DEFAULT_NS) -> dict[int, float]:
    """Recall@N in percent from a ``[Q, k]`` boolean matrix of correct candidates.

    N larger than k gives NaN (the list is too short to say).
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or len(correct) == 0:
        raise ValueError(f"need a non-empty [Q, k] matrix, got shape {correct.shape}")
    first = np.where(correct.any(1), correct.argmax(1), np.iinfo(np.int64).max)
    return {n: (100.0 * float(np.mean(first < n)) if n <= correct.shape[1] else math.nan) for n in ns}


def evaluate_topk(topk: TopK | str | Path, threshold: float = 25.0, ns=DEFAULT_NS, positions=None,
                  index_summary: dict | None = None) -> dict:
    """Recalls of one top-k list (a :class:`TopK` or a path to one).

    ``R@N`` is over the evaluated queries (those with a top-k list). With the dataset's
    index ``summary.json`` (``index_summary``), the row also says how many query files
    were found, indexed (the others are in ``skipped.csv``), extracted and evaluated, and
    ``R@N_all_found`` counts every query left out on the way as a miss.
    """
    if not isinstance(topk, TopK):
        topk = read_topk(topk)
    correct = candidate_distances(topk, positions) <= threshold
    rec = recall_at_n(correct, ns)
    skipped = len(topk.meta.get("skipped_queries", []))
    row = {
        **{f"R@{n}": rec[n] for n in ns},
        "n_queries": len(topk),
        "n_skipped_queries": skipped,
        "threshold_m": threshold,
        "k": topk.k,
    }
    if index_summary is not None:
        indexed = int(index_summary["counts"]["queries"])
        found = indexed + int(index_summary.get("skipped", {}).get("queries", 0))
        extracted = indexed - skipped
        row.update({"n_queries_found": found, "n_queries_indexed": indexed, "n_queries_extracted": extracted,
                    "n_queries_evaluated": len(topk), "n_queries_left_out": found - len(topk)})
        for n in ns:  # every query left out (at index or extraction) is a miss
            row[f"R@{n}_all_found"] = rec[n] * len(topk) / found if found else math.nan
    return row


def format_table(rows: list[dict], ns=DEFAULT_NS) -> str:
    head = ["method"] + [f"R@{n}" for n in ns] + ["queries"]
    lines = [head]
    for r in rows:
        lines.append([str(r.get("method", ""))] + [f"{r[f'R@{n}']:.1f}" for n in ns] + [str(r["n_queries"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def write_results(path, rows: list[dict], float_format: str | None = ".2f") -> None:
    """Write result rows (dicts; nested values as JSON) as a CSV, atomically; floats with
    ``float_format`` (None: as Python prints them, every digit)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else
                                (format(v, float_format) if isinstance(v, float) and float_format else v))
                             for k, v in r.items()})


def results_row(topk: TopK, dataset: str, method: str, conf: dict, threshold: float, ns, positions=None,
                index_summary: dict | None = None) -> dict:
    """The results-CSV row of a retrieval top-k file: Recall@N, query counts and provenance
    (the index type, the model's size settings, seed and weights, the method's conf, an import's
    source)."""
    row = {"dataset": dataset, "method": method,
           **evaluate_topk(topk, threshold, ns, positions, index_summary)}
    row["index"] = topk.meta.get("index", "")
    model = conf.get("model", {})
    # the size the model described the images at (recorded by extraction: its authors' default
    # when the conf sets none, e.g. MegaLoc's [322, 322]), else the conf's
    row["resize"] = json.dumps(topk.meta.get("input_size", model.get("resize"))) if model else ""
    row["seed"] = model.get("seed", "") if model else ""
    if model:  # the checkpoint it ran on: "RANDOM ..." for random checkpoints, else file + sha256
        from .random_weights import weights_label

        row["weights"] = weights_label(model)
    row["conf"] = conf
    row["imported_from"] = topk.meta.get("imported_from", "")
    return row


def top1_changes(retrieval: TopK, reranked: TopK, threshold: float = 25.0, positions=None) -> dict:
    """Whether a re-ranking did harm, over the queries of the re-ranked list: ``broken@1``
    (right at rank 1 before re-ranking, wrong after), ``fixed@1`` (wrong before, right after)
    and ``R@1_change`` (points of R@1 against retrieval alone on the same queries)."""
    before = candidate_distances(retrieval, positions)[:, 0] <= threshold
    after = candidate_distances(reranked, positions)[:, 0] <= threshold
    try:
        before = before[retrieval.rows_of(list(reranked.query_names))]
    except ValueError as err:
        raise ValueError(f"re-ranked queries not in the retrieval list: {err}") from None
    n = max(len(after), 1)
    return {"broken@1": int((before & ~after).sum()), "fixed@1": int((~before & after).sum()),
            "R@1_change": 100.0 * (int(after.sum()) - int(before.sum())) / n}


def _storage(bytes_per_image) -> dict:
    """The cached local features' disk size per image, and extrapolated to a million-image
    database (empty for image-input matchers, which keep no features)."""
    if bytes_per_image is None:
        return {"features_bytes_per_image": "", "features_GB_per_1M_images": ""}
    return {"features_bytes_per_image": round(float(bytes_per_image)),
            "features_GB_per_1M_images": float(bytes_per_image) * 1e6 / 1e9}


def _gate_columns(meta: dict) -> dict:
    """A gated method: the share of queries it re-ranked and the gate's time per query."""
    gate = meta.get("gate")
    if not gate:
        return {"fraction_reranked": 1.0, "gate": ""}
    return {"fraction_reranked": meta.get("fraction_reranked", gate.get("fraction_reranked")),
            "gate_s_per_query": meta.get("seconds_per_query_gate", 0.0),
            "gate": f"{gate['signal']} < {gate['threshold']:g}"}


def rerank_rows(retrieval: TopK, reranked: TopK, dataset: str, method: str, conf: dict, threshold: float, ns,
                index_summary: dict | None = None) -> list[dict]:
    """The results-CSV rows of a re-ranking method: its retrieval (``rerank_k`` 0), then the
    method with its no-harm counts (:func:`top1_changes`), its time per query (extraction +
    matching + scoring), weights label and the size its model described the images at."""
    from .random_weights import weights_label
    from .rerank import input_size

    meta = reranked.meta
    common = {"dataset": dataset, "threshold_m": threshold}
    match_s, score_s = meta["seconds_per_query_matching"], meta["seconds_per_query_scoring"]
    extract_s = meta.get("seconds_per_query_extraction") or 0.0
    gate_s = meta.get("seconds_per_query_gate") or 0.0
    return [
        {"method": meta.get("retrieval", "retrieval"), **common,
         **evaluate_topk(retrieval, threshold, ns, index_summary=index_summary),
         "rerank_k": 0, "rerank_s_per_query": 0.0},
        {"method": method, **common, **evaluate_topk(reranked, threshold, ns, index_summary=index_summary),
         **top1_changes(retrieval, reranked, threshold),
         "rerank_k": meta["rerank_k"],
         "rerank_s_per_query": extract_s + match_s + score_s + gate_s, "extract_s_per_query": extract_s,
         "match_s_per_query": match_s, "score_s_per_query": score_s,
         **_storage(meta.get("feature_bytes_per_image")),
         **_gate_columns(meta),
         "weights": weights_label(conf),
         "input_size": input_size(conf.get("features"), conf["matcher"]) if "matcher" in conf else "",
         "conf": conf},
    ]


def _summary(a) -> dict | None:
    from .io import read_json

    return read_json(a.index_summary) if a.index_summary else None


def _results_arguments(p):
    p.add_argument("--topk", required=True)
    add_result_arguments(p)
    p.add_argument("--index-dir", default=None, help="the dataset's index tables, for names without positions")


def _results(a):
    positions = index_positions(a.index_dir) if a.index_dir else None
    row = results_row(read_topk(a.topk, made_here=True), a.dataset, a.method, a.conf, a.threshold, a.ns, positions, _summary(a))
    write_results(a.out, [row])
    print(format_table([row], a.ns))


def _rerank_results_arguments(p):
    p.add_argument("--retrieval", required=True, help="the retrieval top-k file")
    p.add_argument("--reranked", required=True, help="the re-ranked top-k file")
    add_result_arguments(p)


def _rerank_results(a):
    rows = rerank_rows(read_topk(a.retrieval, made_here=True), read_topk(a.reranked, made_here=True), a.dataset, a.method, a.conf, a.threshold,
                       a.ns, _summary(a))
    write_results(a.out, rows)
    print(format_table(rows, a.ns))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline evaluate", description="Recall@N of top-k files (ours or the thesis's stage-1 HDF5).")
    p.add_argument("topk", nargs="+", help="top-k HDF5 files")
    p.add_argument("--threshold", type=float, default=25.0, help="metres (default 25)")
    p.add_argument("--ns", type=int, nargs="+", default=list(DEFAULT_NS))
    p.add_argument("--out", help="also write the table as CSV here")
    p.add_argument("--index-dir", help="the dataset's index tables, for names without positions")
    a = p.parse_args(argv)
    positions = index_positions(a.index_dir) if a.index_dir else None
    rows, failed = [], []
    for path in a.topk:  # each file on its own: a bad one is reported, the others still evaluated
        try:
            r = evaluate_topk(path, a.threshold, a.ns, positions)
        except (OSError, ValueError, KeyError) as e:  # missing, unreadable, wrong datasets, bad names
            logger.error("%s", e)
            failed.append(str(e))
            continue
        rows.append({"method": Path(path).stem, **r})
    if rows:
        print(format_table(rows, a.ns))
        if a.out:
            write_results(a.out, rows)
    if failed:  # raised, so the reasons also reach stdout (pipeline.cli) when the log is lost
        raise ValueError(f"{len(failed)} of {len(a.topk)} top-k files could not be evaluated:\n  " + "\n  ".join(failed))
    return 0


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`); ``evaluate`` parses its own arguments
COMMANDS = {"evaluate": main, "results": (_results_arguments, _results),
            "rerank-results": (_rerank_results_arguments, _rerank_results)}


if __name__ == "__main__":
    main()
