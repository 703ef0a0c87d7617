# Reports: the thesis's table, trade-off plots and qualitative figures as a static HTML site.
#   snakemake --cores 2 reports        -> results/report/index.html


def report_methods(dataset):
    """Re-ranking methods of the default target on this dataset (random checkpoints excluded)."""
    return [m for m in RERANK if in_default_target(dataset, m)]


def report_spec():
    datasets = {}
    for d in DATASETS:
        results = [results_file(d, m) for m in GMETHODS if available(d, m)]
        results += [results_file(d, m) for m in report_methods(d)]
        if not results:
            continue
        methods = {}
        for m in report_methods(d):
            c = RERANK[m]
            methods[m] = {
                "retrieval_topk": topk_file(d, c["retrieval"]),
                "reranked_topk": rerank_file(d, m),
                "features": features_file(d, c["features"]) if c["features"] else None,
                "matches": matches_file(d, c["retrieval"], features_part(c), c["matcher"]),
                "scorer": config["scorers"][c["scorer"]],
            }
        root = DATASETS[d].get("root")
        datasets[d] = {"root": root, "index_dir": index_dir(d) if root else None,
                       "results": results, "methods": methods}
    return {"threshold_m": config["evaluation"]["threshold_m"], "n_queries": 4, "datasets": datasets}


def dataset_results(dataset):
    return report_spec()["datasets"][dataset]["results"]


rule dataset_summary:
    """results/{dataset}/summary.csv (+ .md, .html): every method's recalls on one dataset."""
    input:
        lambda w: dataset_results(w.dataset),
    output:
        summary_files("{dataset}"),
    params:
        out=lambda w: os.path.dirname(summary_files(w.dataset)[0]),
    log:
        log_file("summary_{dataset}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} summary --out {params.out:q} {input:q} 2> {log:q}"


def report_inputs(wildcards):
    spec = report_spec()
    files = [summary_files(d)[0] for d in spec["datasets"]]
    for ds in spec["datasets"].values():
        files += ds["results"]
        for c in ds["methods"].values():
            files += [p for p in (c["retrieval_topk"], c["reranked_topk"], c["features"], c["matches"]) if p]
    return sorted(set(files))


rule reports:
    """results/report/: summary tables, recall vs time, recall vs K, qualitative figures (HTML)."""
    input:
        report_inputs,
    output:
        f"{report_folder()}/index.html",
    params:
        spec=lambda w: json.dumps(report_spec(), sort_keys=True),
        out=report_folder(),
    log:
        log_file("reports"),
    conda:
        CONDA_ENV
    shell:
        "{PY} report --spec {params.spec:q} --out {params.out:q} 2> {log:q}"
