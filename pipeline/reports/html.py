"""A static HTML report, one page per dataset, viewable offline (relative links only).

:func:`build_report` takes a spec (what Snakemake knows: results files, top-k files,
feature stores, matches and scorer confs per re-ranking method) and writes under
``out_dir``:

- ``index.html``: the thesis's Table 4.1 over every dataset and method, links to the pages;
- ``summary.{csv,md,html}``, ``summary_table.csv`` (:mod:`pipeline.reports.summary`);
- ``{dataset}/index.html`` with the recall-vs-time and recall-vs-K plots (PNG, SVG and the
  CSV of their numbers), per retrieval the AUC-PR of its uncertainty signals with their
  precision-recall plot (:mod:`pipeline.uncertainty`), and per re-ranking method the qualitative figures
  (:mod:`pipeline.reports.qualitative`: keypoints, matches before / after RANSAC,
  prediction strips).

Spec (JSON)::

    {"threshold_m": 25, "n_queries": 4,
     "datasets": {"demo": {"root": "data/demo", "index_dir": "work/demo/index",
                           "results": ["results/demo/vlad_sift.csv", ...],
                           "methods": {"sift_ransac": {"retrieval_topk": ..., "reranked_topk": ...,
                                                       "features": ... or null, "matches": ...,
                                                       "scorer": {...}}}}}}
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

from ..args import json_arg
from ..io import atomic_path, write_json
from . import plots, summary

logger = logging.getLogger(__name__)

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.random td { color: #999; font-style: italic; }
figure { display: inline-block; margin: 1em; vertical-align: top; }
figcaption { font-size: 0.9em; color: #444; max-width: 640px; }
img { max-width: 640px; border: 1px solid #ddd; }
"""


#: marks every image once the page has loaded (data-loaded="1" when it decoded), so a
#: headless browser's DOM dump tells whether the page rendered its figures
CHECK = """<script>
window.addEventListener("load", function () {
  document.querySelectorAll("img").forEach(function (im) {
    im.setAttribute("data-loaded", im.complete && im.naturalWidth > 0 ? "1" : "0");
  });
  document.body.setAttribute("data-rendered", "1");
});
</script>"""


def _page(title: str, body: str) -> str:
    e = html.escape
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{STYLE}</style>{CHECK}</head>\n<body>\n<h1>{e(title)}</h1>\n{body}\n</body></html>\n")


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _figure(page_dir: Path, png: str, caption: str, extra_links: dict[str, str] | None = None) -> str:
    rel = os.path.relpath(png, page_dir)
    links = " ".join(f'<a href="{html.escape(os.path.relpath(p, page_dir))}">{html.escape(k)}</a>'
                     for k, p in (extra_links or {}).items())
    return (f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)} {links}</figcaption></figure>")


def dataset_page(name: str, ds: dict, out_dir: Path, threshold_m: float, n_queries: int) -> dict:
    """Write ``out_dir/{name}/index.html`` and its figures; return what was written."""
    page_dir = out_dir / name
    page_dir.mkdir(parents=True, exist_ok=True)
    results = summary.read_results(ds["results"])
    blocks = ['<p><a href="../index.html">all datasets</a></p>',
              "<h2>Recalls</h2>",
              summary.to_html(summary.summary_table(results), summary.upper_bounds(results))]
    written = {}
    t = plots.recall_vs_time(results, name, page_dir / "recall_vs_time")
    written["recall_vs_time"] = t
    blocks += ["<h2>Recall vs time</h2>", _figure(
        page_dir, t["figures"][0], "R@1 against re-ranking time per query (extraction of the query and its K "
        "candidates + matching + scoring); dashed: retrieval", {"SVG": t["figures"][1], "data (CSV)": t["csv"]})]
    methods = ds.get("methods", {})
    curves = {}
    for m, c in sorted(methods.items()):
        curves[m] = plots.recall_at_1_by_k(c["retrieval_topk"], c["reranked_topk"], threshold_m, _positions(ds))
    if curves:
        k = plots.recall_vs_k(curves, name, page_dir / "recall_vs_k")
        written["recall_vs_k"] = k
        blocks += ["<h2>Recall vs number of re-ranked candidates</h2>", _figure(
            page_dir, k["figures"][0], "R@1 when re-ranking the first K candidates; dashed: retrieval R@K "
            "(upper bound)", {"SVG": k["figures"][1], "data (CSV)": k["csv"]})]
    by_retrieval: dict[str, dict[str, str]] = {}
    measured: dict[str, dict[str, str]] = {}  # ungated method -> its gated copies' re-ranked lists
    for m, c in sorted(methods.items()):
        if c.get("gate_of") is None:
            by_retrieval.setdefault(c["retrieval_topk"], {})[m] = c["reranked_topk"]
        elif c["gate_of"]:
            measured.setdefault(c["gate_of"], {})[m] = c["reranked_topk"]
    if by_retrieval:
        blocks.append("<h2>Is the top-1 right? Uncertainty signals</h2>")
    for topk_path, reranked in sorted(by_retrieval.items()):
        u = uncertainty_block(topk_path, reranked, page_dir / "uncertainty", threshold_m, _positions(ds), measured)
        written[f"uncertainty/{Path(topk_path).stem}"] = u["files"]
        blocks.append(u["html"])
    if methods and ds.get("root"):
        from ..rerank import NameResolver
        from .qualitative import qualitative_report

        resolve = NameResolver(ds["root"], ds.get("index_dir"))
        blocks.append("<h2>Qualitative examples</h2>")
        for m, c in sorted(methods.items()):
            q = qualitative_report(
                ds["root"], c["retrieval_topk"], c["reranked_topk"], page_dir / m, threshold_m=threshold_m,
                n_queries=n_queries, features=c.get("features"), matches=c.get("matches"),
                scorer_conf=c.get("scorer"), resolve=resolve, index_dir=ds.get("index_dir"))
            written[f"qualitative/{m}"] = q
            blocks.append(f"<h3>{html.escape(m)}</h3>")
            for item in q.get("figures", []):
                png = page_dir / m / item["png"]
                links = {"data (CSV)": str(page_dir / m / item["csv"])} if item.get("csv") else {}
                blocks.append(_figure(page_dir, str(png), item.get("caption", ""), links))
    _write(page_dir / "index.html", _page(f"{name}: re-ranking report", "\n".join(blocks)))
    return written


def uncertainty_block(topk_path: str, reranked: dict[str, str], out_dir: Path, threshold_m: float,
                      positions=None, measured: dict[str, dict[str, str]] | None = None) -> dict:
    """AUC-PR of each confidence signal of one retrieval (:mod:`pipeline.uncertainty`; the
    re-ranking methods on it give their score of the top-1 as a signal), as a table and a
    precision-recall plot; per method, its risk-coverage curves, with ``measured``: the gated
    copies of that method (name -> re-ranked list) as measured points."""
    from ..topk import read_topk
    import pandas as pd

    from ..uncertainty import (gated_point, plot_risk_coverage, rerank_seconds_per_query, right_after,
                               risk_coverage_table, signals, write_tables)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(topk_path).stem
    retrieval = read_topk(topk_path, made_here=True)
    sig = signals(retrieval, threshold_m, positions, reranked)
    files = {"signals": str(out_dir / f"{stem}_signals.csv"), "auc_pr": str(out_dir / f"{stem}_auc_pr.csv"),
             "plot": str(out_dir / f"{stem}_pr.png")}
    rows = write_tables(sig, files["signals"], files["auc_pr"], files["plot"], f"{stem}: is the top-1 right?")
    e = html.escape
    table = ("<table><tr><th>signal</th><th>AUC-PR</th><th>queries</th></tr>" + "".join(
        f"<tr><td>{e(r['signal'])}</td><td>{r['auc_pr']:.3f}</td><td>{r['n_queries']}</td></tr>" for r in rows)
        + "</table>")
    page_dir = out_dir.parent
    caption = (f"{stem}: precision-recall of 'the top-1 is right' ({100 * float(sig['top1_right'].mean()):.1f}% of "
               "queries) against each signal: top-1 L2 distance, d1/d2 ratio, SUE (spatial spread of the top-10), "
               "and each re-ranking method's score of the retrieval top-1")
    block = (f"<h3>{e(stem)}</h3>{table}"
             + _figure(page_dir, files["plot"], caption, {"signals (CSV)": files["signals"],
                                                          "AUC-PR (CSV)": files["auc_pr"]}))
    for method, path in sorted(reranked.items()):  # risk-coverage: re-rank only the least confident queries
        rr = read_topk(path, made_here=True)
        curves = risk_coverage_table(sig, right_after(retrieval, rr, threshold_m, positions),
                                     rerank_seconds_per_query(rr))
        points = [gated_point(name, read_topk(p, made_here=True), threshold_m, positions)
                  for name, p in sorted((measured or {}).get(method, {}).items())]
        if points:
            curves = pd.concat([curves, pd.DataFrame(points)], ignore_index=True)
        csv_path, png = out_dir / f"{stem}_{method}_risk_coverage.csv", out_dir / f"{stem}_{method}_risk_coverage.png"
        with atomic_path(csv_path) as tmp:
            curves.to_csv(tmp, index=False, float_format="%.6g")
        plot_risk_coverage(curves, png, f"{method} on {stem}")
        files[f"risk_coverage/{method}"] = {"csv": str(csv_path), "plot": str(png)}
        block += _figure(page_dir, str(png), f"{method}: R@1 when only the least confident queries (by each signal) "
                         "are re-ranked; the CSV adds the time per query this would take (the fraction times the "
                         "measured full re-ranking time)" + ("; markers: the gated copies of this method as run "
                         "(measured R@1, share and time per query, the gate's included)" if points else ""),
                         {"data (CSV)": str(csv_path)})
    return {"files": files, "html": block}


def _positions(ds: dict):
    if not ds.get("index_dir"):
        return None
    from ..evaluate import index_positions

    try:
        return index_positions(ds["index_dir"])
    except (OSError, ValueError, KeyError):
        return None


def published_block(path, out_dir: Path) -> str:
    """The thesis's published stage-1 files (real query photos): our Recall@N beside the
    published one, and how well each retrieval signal predicts a right top-1 (AUC-PR)."""
    if not path or not Path(path).is_file():
        return ""
    import pandas as pd

    df = pd.read_csv(path, dtype=str).fillna("")
    recall = [c for c in df.columns if c.startswith("R@") and not c.endswith("_published")]
    auc = [c for c in df.columns if c.startswith("AUC-PR_")]
    head = (["query set", "status"] + [f"{c} (published)" for c in recall] + [c.replace("_", " ") for c in auc]
            + (["chance (top-1 right)"] if "top1_right_pct" in df.columns else []))
    e = html.escape

    def num(v, digits):
        try:
            return f"{float(v):.{digits}f}"
        except ValueError:
            return e(v)

    rows = []
    for _, r in df.iterrows():
        cells = [e(r["query_set"]), e(r["status"])]
        cells += [f"{num(r[c], 2)} ({e(r.get(c + '_published', ''))})" if r[c] else "" for c in recall]
        cells += [num(r[c], 3) if r[c] else "" for c in auc]
        if "top1_right_pct" in df.columns:
            cells.append(num(float(r["top1_right_pct"]) / 100, 3) if r["top1_right_pct"] else "")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rel = os.path.relpath(path, out_dir)
    return ("<h2>The thesis's stage-1 files (real photos)</h2><p>CosPlace R50 top-100 lists as published with the "
            "thesis: our Recall@N (published in brackets), and the AUC-PR with which each retrieval signal (top-1 L2 "
            "distance, d1/d2 ratio, SUE) predicts a right top-1, against chance.</p><table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
            + f'<p><a href="{e(rel)}">CSV</a></p>')


def build_report(spec: dict, out_dir) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = float(spec.get("threshold_m", 25.0))
    n_queries = int(spec.get("n_queries", 4))
    datasets = spec.get("datasets", {})
    all_results = [p for ds in datasets.values() for p in ds["results"]]
    written = {"summary": summary.write_summary(all_results, out_dir)}
    df = summary.read_results(all_results)
    links = []
    for name, ds in sorted(datasets.items()):
        logger.info("report: %s", name)
        written[name] = dataset_page(name, ds, out_dir, threshold, n_queries)
        links.append(f'<li><a href="{html.escape(name)}/index.html">{html.escape(name)}</a></li>')
    body = ("<h2>Recall@N per dataset (the thesis's Table 4.1)</h2>"
            + summary.to_html(summary.summary_table(df), summary.upper_bounds(df))
            + '<p><a href="summary.md">Markdown</a> · <a href="summary_table.csv">CSV</a> · '
              '<a href="summary.csv">all rows (CSV)</a></p>'
            + "<h2>Datasets</h2><ul>" + "".join(links) + "</ul>"
            + published_block(spec.get("published"), out_dir))
    _write(out_dir / "index.html", _page("VG re-ranking report", body))
    write_json(out_dir / "manifest.json", written)
    return written


def _arguments(p):
    p.add_argument("--spec", type=json_arg, required=True, help="what to report (JSON; see this module's doc)")
    p.add_argument("--out", required=True, help="output folder (index.html, one page per dataset)")


def _run(a):
    build_report(a.spec, a.out)
    print(f"{a.out}/index.html")


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"report": (_arguments, _run)}
