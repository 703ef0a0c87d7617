# Datasets: the built-in synthetic dataset, and the index stage (names, positions, checks).


for _name, _ds in DATASETS.items():
    if _ds.get("synthetic") is not None:

        rule:
            name:
                f"synthetic_{_name}"
            output:
                f"{_ds['root']}/synthetic.json",
            params:
                py=PY,
                root=lambda w, output: os.path.dirname(output[0]),
                conf=json.dumps(_ds["synthetic"], sort_keys=True),
            log:
                log_file(f"synthetic_{_name}"),
            conda:
                CONDA_ENV
            shell:
                "{params.py} synthetic --root {params.root:q} --conf {params.conf:q} 2> {log:q}"


checkpoint index_dataset:
    input:
        dataset_ready,
    output:
        database=index_table("{dataset}", "database"),
        queries=index_table("{dataset}", "queries"),
        skipped=index_table("{dataset}", "skipped"),
        summary=index_summary_file("{dataset}"),
    params:
        py=PY,
        root=dataset_root,
        on_bad_name=lambda w: DATASETS[w.dataset]["on_bad_name"],
        out=lambda w, output: os.path.dirname(output.database),
        positions=positions_arg,
    log:
        log_file("index_{dataset}"),
    threads: 4
    resources:
        mem_mb=4000,
    conda:
        CONDA_ENV
    shell:
        "{params.py} index --root {params.root:q} --out {params.out:q} --on-bad-name {params.on_bad_name}"
        " --workers {threads} {params.positions} 2> {log:q}"


rule stamp:
    """The marker of rebuild_if_inputs_missing (common.smk)."""
    output:
        stamp_file("{path}"),
    log:
        log_file("stamps/{path}"),
    conda:
        CONDA_ENV
    shell:
        "touch {output:q} 2> {log:q}"
