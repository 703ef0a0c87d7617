# Reports: the thesis's table, trade-off plots and qualitative figures as a static HTML site.
#   snakemake --cores 2 reports        -> results/report/index.html


rule dataset_summary:
    """results/{dataset}/summary.csv (+ .md, .html): every method's recalls on one dataset."""
    input:
        lambda w: dataset_results(w.dataset),
    output:
        summary_files("{dataset}"),
    params:
        py=PY,
        out=lambda w: os.path.dirname(summary_files(w.dataset)[0]),
    log:
        log_file("summary_{dataset}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} summary --out {params.out:q} {input:q} 2> {log:q}"


rule reports:
    """results/report/: summary tables, recall vs time, recall vs K, qualitative figures (HTML)."""
    input:
        report_inputs,
    output:
        f"{report_folder()}/index.html",
    params:
        py=PY,
        spec=lambda w: json.dumps(report_spec(), sort_keys=True),
        out=lambda w, output: os.path.dirname(output[0]),
    log:
        log_file("reports"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} report --spec {params.spec:q} --out {params.out:q} 2> {log:q}"
