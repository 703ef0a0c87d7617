# Datasets: the built-in synthetic dataset, and the index stage (names, positions, checks).


def dataset_ready(wildcards):
    """The synthetic dataset's marker (so it is generated first) and the positions CSV, if any."""
    ds = DATASETS[wildcards.dataset]
    ready = [f"{ds['root']}/synthetic.json"] if ds.get("synthetic") is not None else []
    if ds.get("nightset"):  # a verified night query set: built by workflow/rules/nightset.smk
        ready.append(nightset_file(ds["nightset"], "dataset/counts.json"))
    return ready + ([ds["positions"]] if ds.get("positions") else [])


def positions_arg(wildcards):
    path = DATASETS[wildcards.dataset].get("positions")
    return f"--positions {shlex.quote(path)}" if path else ""


for _name, _ds in DATASETS.items():
    if _ds.get("synthetic") is not None:

        rule:
            name:
                f"synthetic_{_name}"
            output:
                f"{_ds['root']}/synthetic.json",
            params:
                root=_ds["root"],
                conf=json.dumps(_ds["synthetic"], sort_keys=True),
            log:
                log_file(f"synthetic_{_name}"),
            conda:
                CONDA_ENV
            shell:
                "{PY} synthetic --root {params.root:q} --conf {params.conf:q} 2> {log:q}"


checkpoint index_dataset:
    input:
        dataset_ready,
    output:
        database=index_table("{dataset}", "database"),
        queries=index_table("{dataset}", "queries"),
        skipped=index_table("{dataset}", "skipped"),
        summary=index_summary_file("{dataset}"),
    params:
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
        "{PY} index --root {params.root:q} --out {params.out:q} --on-bad-name {params.on_bad_name}"
        " --workers {threads} {params.positions} 2> {log:q}"
