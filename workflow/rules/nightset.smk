# Night query sets (the thesis's SF-XL test night): collect -> filter -> dedupe -> labels -> verify.
#   snakemake --cores 2 work/nightsets/{name}/dataset/counts.json
# A dataset entry `{nightset: name}` evaluates the verified set like any other dataset.
# Relabelling is interactive: `python -m pipeline nightset-relabel ...` (see README); the
# labels rule replays its decision log, so re-running the workflow picks up new decisions.


rule nightset_collect:
    """Geotagged photos of the area (Flickr photos.search; FLICKR_API_KEY from the environment)."""
    output:
        nightset_file("{nightset}", "collected/photos.csv"),
    params:
        py=PY,
        build=nbuild,
        args=collect_args,
    log:
        log_file("nightset_collect_{nightset}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} nightset-collect --build {params.build:q} {params.args} 2> {log:q}"


rule nightset_filter:
    """Outdoor and night classifiers -> filtered.csv."""
    input:
        photos=nightset_file("{nightset}", "collected/photos.csv"),
        models=filter_model_files,
    output:
        nightset_file("{nightset}", "filtered.csv"),
    params:
        py=PY,
        src=lambda w: f"{nbuild(w)}/collected",
        args=lambda w: " ".join(
            f"--{k.replace('_', '-')} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}"
            for k, v in sorted(NIGHTSETS[w.nightset].get("filter", {}).items())
        ),
    log:
        log_file("nightset_filter_{nightset}"),
    threads: 2
    conda:
        CONDA_ENV
    shell:
        "{params.py} nightset-filter filter --src {params.src:q} --out {output:q} --workers {threads} {params.args} 2> {log:q}"


rule nightset_dedupe:
    """Near-identical shots of the same place -> dedup.csv (one kept per group)."""
    input:
        photos=nightset_file("{nightset}", "collected/photos.csv"),
        filtered=nightset_file("{nightset}", "filtered.csv"),
    output:
        nightset_file("{nightset}", "dedup.csv"),
    params:
        py=PY,
        src=lambda w: f"{nbuild(w)}/collected",
        conf=lambda w: json.dumps(NIGHTSETS[w.nightset].get("dedupe", {}), sort_keys=True),
    log:
        log_file("nightset_dedupe_{nightset}"),
    threads: 2
    conda:
        CONDA_ENV
    shell:
        "{params.py} nightset-dedupe --src {params.src:q} --filtered {input.filtered:q} --out {output:q}"
        " --conf {params.conf:q} --workers {threads} 2> {log:q}"


rule nightset_labels:
    """labels.csv replayed from the relabel tool's decision log (every photo unreviewed without one)."""
    input:
        dedup=nightset_file("{nightset}", "dedup.csv"),
        photos=nightset_file("{nightset}", "collected/photos.csv"),
        db=lambda w: index_table(NIGHTSETS[w.nightset]["database"], "database"),
        log=relabel_log,
    output:
        nightset_file("{nightset}", "relabel/labels.csv"),
    params:
        py=PY,
        build=nbuild,
        db_root=ns_db_root,
    log:
        log_file("nightset_labels_{nightset}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} nightset-relabel --queries {input.dedup:q} --positions {input.photos:q} --photos {params.build:q}/collected"
        " --db-root {params.db_root:q} --db-table {input.db:q} --build {params.build:q} --replay-only 2> {log:q}"


rule nightset_verify:
    """Queries with a database image within threshold_m, in the VG layout, and the counts of every step."""
    input:
        labels=nightset_file("{nightset}", "relabel/labels.csv"),
        db=lambda w: index_summary_file(NIGHTSETS[w.nightset]["database"]),
    output:
        nightset_file("{nightset}", "dataset/counts.json"),
    params:
        py=PY,
        build=nbuild,
        db_root=ns_db_root,
        db_index=lambda w: index_dir(NIGHTSETS[w.nightset]["database"]),
        out=lambda w: nightset_dataset(w.nightset),
        threshold=lambda w: NIGHTSETS[w.nightset]["threshold_m"],
    log:
        log_file("nightset_verify_{nightset}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} nightset-verify --labels {input.labels:q} --photos {params.build:q}/collected --db-root {params.db_root:q}"
        " --db-index {params.db_index:q} --build {params.build:q} --out {params.out:q}"
        " --threshold {params.threshold} 2> {log:q}"
