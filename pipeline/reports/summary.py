"""The thesis's Table 4.1 from the results CSVs: one row per method, R@1/5/10 per dataset.

Input: the ``results/{dataset}/{method}.csv`` files the pipeline writes. A retrieval
result has one row; a re-ranking result has two (its retrieval baseline, then the
re-ranked row). The summary has

- one row per retrieval method (the baseline, ``extractor`` and ``matching`` "-", as
  the thesis's first row) and one per re-ranking method (extractor, matcher, scorer),
- per dataset the R@N columns and, in the header of the Markdown/HTML tables, the
  retrieval's R@100 (the upper bound of any re-ranking of the top 100),
- the time per query and the ``weights`` label (``RANDOM ...`` for random checkpoints).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd

from ..io import atomic_path

TABLE_NS = (1, 5, 10)


#: the no-harm columns of a re-ranking row (pipeline.evaluate.top1_changes)
NO_HARM = ("broken@1", "fixed@1", "R@1_change")


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def read_results(paths) -> pd.DataFrame:
    """All rows of the results CSVs, with ``kind`` (retrieval / rerank), ``file`` and the
    re-ranking parts (extractor, matcher, scorer) taken from the row's conf."""
    rows = []
    for path in sorted(map(Path, paths)):
        try:
            df = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ValueError(f"{path}: cannot read results CSV ({e})") from None
        if df.empty or "method" not in df:
            raise ValueError(f"{path}: not a results CSV (no rows or no 'method' column)")
        dataset = str(df["dataset"].iloc[0]) if "dataset" in df else path.parent.name
        for i, r in df.iterrows():
            r = r.to_dict()
            rerank = "rerank_k" in r and _num(r.get("rerank_k")) > 0
            if len(df) > 1 and not rerank:
                continue  # the baseline row of a re-ranking CSV: the retrieval's own CSV has it
            conf = {}
            if isinstance(r.get("conf"), str) and r["conf"].startswith("{"):
                conf = json.loads(r["conf"])
            out = {"dataset": dataset, "method": str(r["method"]), "file": str(path),
                   "kind": "rerank" if rerank else "retrieval"}
            if rerank:
                m = conf.get("method", {})
                feats, matcher = conf.get("features") or {}, conf.get("matcher") or {}
                out.update(retrieval=m.get("retrieval", ""), extractor=feats.get("name", "- (images)"),
                           matcher=matcher.get("name", ""), scorer=(conf.get("scorer") or {}).get("name", ""),
                           rerank_k=int(_num(r["rerank_k"])))
            else:
                out.update(retrieval=str(r["method"]), extractor="-", matcher="-", scorer="-", rerank_k=0)
            for key, value in r.items():
                if key.startswith("R@") or key.endswith("_s_per_query") or key in NO_HARM:
                    out[key] = _num(value)
            out["weights"] = str(r.get("weights", "")) if not pd.isna(r.get("weights", "")) else ""
            rows.append(out)
    if not rows:
        raise ValueError("no results to summarise")
    return pd.DataFrame(rows)


def upper_bounds(df: pd.DataFrame) -> dict[str, float]:
    """Per dataset, the best retrieval R@100 (NaN where the lists are shorter)."""
    ret = df[df.kind == "retrieval"]
    if "R@100" not in ret:
        return {}
    return {d: float(g["R@100"].max()) for d, g in ret.groupby("dataset")}


def summary_table(df: pd.DataFrame, ns=TABLE_NS) -> pd.DataFrame:
    """Wide table: one row per (method), columns ``{dataset} R@N`` (retrieval rows first)."""
    keys = ["method", "kind", "retrieval", "extractor", "matcher", "scorer"]
    wide = None
    for dataset, g in df.groupby("dataset", sort=True):
        cols = {f"R@{n}": f"{dataset} R@{n}" for n in ns if f"R@{n}" in g}
        cols.update({"R@1_change": f"{dataset} R@1 change", "broken@1": f"{dataset} broken@1",
                     "fixed@1": f"{dataset} fixed@1", "rerank_s_per_query": f"{dataset} s/query"})
        part = g[keys + [c for c in cols if c in g]].rename(columns=cols)
        wide = part if wide is None else wide.merge(part, on=keys, how="outer")
    weights = df.groupby("method")["weights"].first()
    wide["weights"] = wide["method"].map(weights)
    wide["_order"] = (wide["kind"] == "rerank").astype(int)
    return wide.sort_values(["_order", "method"]).drop(columns="_order").reset_index(drop=True)


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.1f}" if isinstance(v, float) else str(v))


def to_markdown(table: pd.DataFrame, bounds: dict[str, float], ns=TABLE_NS) -> str:
    datasets = sorted({c.split(" R@")[0] for c in table.columns if " R@" in c})
    recalls = [f"{d} R@{n}" for d in datasets for n in ns if f"{d} R@{n}" in table]
    harm = [d for d in datasets if f"{d} broken@1" in table]
    head = ["method", "extractor", "matching"] + recalls + [f"{d} R@1 change (broken/fixed)" for d in harm]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        matching = "-" if r["kind"] == "retrieval" else f"{r['matcher']} + {r['scorer']}"
        cells = [str(r["method"]), str(r["extractor"]), matching] + [_fmt(r[c]) for c in recalls]
        cells += [_no_harm(r, d) for d in harm]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {d}: retrieval R@100 = {_fmt(bounds[d])} (upper bound of re-ranking the top 100)"
             for d in datasets if d in bounds]
    if harm:
        notes.append("- R@1 change: points against retrieval alone; broken: queries right at rank 1 before "
                     "re-ranking and wrong after, fixed: the reverse")
    randoms = [str(r["method"]) for _, r in table.iterrows() if str(r.get("weights", "")).startswith("RANDOM")]
    if randoms:
        notes.append(f"- RANDOM untrained weights (recalls not meaningful): {', '.join(randoms)}")
    return "\n".join(lines + [""] + notes) + "\n"


def _no_harm(r, dataset) -> str:
    """``+2.0 (1/3)``: the R@1 change and broken/fixed queries of a re-ranking row ("" for retrieval)."""
    change, broken, fixed = (r.get(f"{dataset} {k}") for k in ("R@1 change", "broken@1", "fixed@1"))
    if r["kind"] != "rerank" or change is None or pd.isna(change):
        return ""
    return f"{change:+.1f} ({int(broken)}/{int(fixed)})"


def to_html(table: pd.DataFrame, bounds: dict[str, float], ns=TABLE_NS) -> str:
    datasets = sorted({c.split(" R@")[0] for c in table.columns if " R@" in c})
    harm = {d for d in datasets if f"{d} broken@1" in table}
    e = html.escape
    top = "<tr><th rowspan=2>method</th><th rowspan=2>extractor</th><th rowspan=2>matching</th>" + "".join(
        f"<th colspan={len(ns) + (d in harm)}>{e(d)}<br><small>R@100 = {e(_fmt(bounds.get(d, math.nan)))}</small></th>"
        for d in datasets) + "</tr>"
    sub = "<tr>" + "".join("".join(f"<th>R@{n}</th>" for n in ns)
                           + ('<th title="R@1 points against retrieval alone; queries broken (right at rank 1 before '
                              're-ranking, wrong after) / fixed">R@1 change<br><small>broken/fixed</small></th>'
                              if d in harm else "") for d in datasets) + "</tr>"
    body = []
    for _, r in table.iterrows():
        matching = "-" if r["kind"] == "retrieval" else f"{r['matcher']} + {r['scorer']}"
        cls = ' class="random"' if str(r.get("weights", "")).startswith("RANDOM") else ""
        cells = "".join("".join(f"<td>{e(_fmt(r.get(f'{d} R@{n}')))}</td>" for n in ns)
                        + (f"<td>{e(_no_harm(r, d))}</td>" if d in harm else "") for d in datasets)
        body.append(f"<tr{cls}><td>{e(str(r['method']))}</td><td>{e(str(r['extractor']))}</td>"
                    f"<td>{e(matching)}</td>{cells}</tr>")
    return f"<table>\n{top}\n{sub}\n" + "\n".join(body) + "\n</table>\n"


def write_summary(paths, out_dir, ns=TABLE_NS) -> dict[str, str]:
    """``summary.csv`` (long: every row of every results file), ``summary_table.csv`` (wide),
    ``summary.md`` and ``summary.html`` (the thesis's table) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = read_results(paths)
    bounds = upper_bounds(df)
    table = summary_table(df, ns)
    files = {"long": out_dir / "summary.csv", "table": out_dir / "summary_table.csv",
             "markdown": out_dir / "summary.md", "html": out_dir / "summary.html"}
    for key, frame in (("long", df), ("table", table)):
        with atomic_path(files[key]) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.2f")
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text(to_markdown(table, bounds, ns))
    with atomic_path(files["html"]) as tmp:
        tmp.write_text(to_html(table, bounds, ns))
    return {k: str(v) for k, v in files.items()}


def _arguments(p):
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("results", nargs="+", help="results CSVs")


def _run(a):
    print(json.dumps(write_summary(a.results, a.out), indent=2))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"summary": (_arguments, _run)}
