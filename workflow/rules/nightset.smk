# Night query sets (the thesis's SF-XL test night): collect -> filter -> dedupe -> labels -> verify.
#   snakemake --cores 2 work/nightsets/{name}/dataset/counts.json
# A dataset entry `{nightset: name}` evaluates the verified set like any other dataset.
# Relabelling is interactive: `python -m pipeline nightset-relabel ...` (see README); the
# labels rule replays its decision log, so re-running the workflow picks up new decisions.

NIGHTSETS = config.get("nightsets", {})


def nbuild(w):
    return nightset_dir(w.nightset)


def ns_db_root(w):
    return DATASETS[NIGHTSETS[w.nightset]["database"]]["root"]


def collect_args(w):
    ns = NIGHTSETS[w.nightset]
    args = [f"--bbox={','.join(str(x) for x in ns['bbox'])}", "--no-progress"]
    for key, value in sorted(ns.get("collect", {}).items()):
        if value is not None:
            args.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(args)


def relabel_log(w):
    log = nightset_file(w.nightset, "relabel/log.jsonl")
    return [log] if os.path.exists(log) else []


rule nightset_collect:
    """Geotagged photos of the area (Flickr photos.search; FLICKR_API_KEY from the environment)."""
    output:
        nightset_file("{nightset}", "collected/photos.csv"),
    params:
        build=nbuild,
        args=collect_args,
    log:
        log_file("nightset_collect_{nightset}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} nightset-collect --build {params.build:q} {params.args} 2> {log:q}"


def filter_model_files(w):
    """Classifier confs given as files (a fitted JSON conf, a trained checkpoint): inputs, so a change re-runs."""
    values = NIGHTSETS[w.nightset].get("filter", {}).values()
    return [v for v in values if isinstance(v, str) and v.endswith((".json", ".pt", ".pth"))]


rule nightset_filter:
    """Outdoor and night classifiers -> filtered.csv."""
    input:
        photos=nightset_file("{nightset}", "collected/photos.csv"),
        models=filter_model_files,
    output:
        nightset_file("{nightset}", "filtered.csv"),
    params:
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
        "{PY} nightset-filter filter --src {params.src:q} --out {output:q} --workers {threads} {params.args} 2> {log:q}"


rule nightset_dedupe:
    """Near-identical shots of the same place -> dedup.csv (one kept per group)."""
    input:
        photos=nightset_file("{nightset}", "collected/photos.csv"),
        filtered=nightset_file("{nightset}", "filtered.csv"),
    output:
        nightset_file("{nightset}", "dedup.csv"),
    params:
        src=lambda w: f"{nbuild(w)}/collected",
        conf=lambda w: json.dumps(NIGHTSETS[w.nightset].get("dedupe", {}), sort_keys=True),
    log:
        log_file("nightset_dedupe_{nightset}"),
    threads: 2
    conda:
        CONDA_ENV
    shell:
        "{PY} nightset-dedupe --src {params.src:q} --filtered {input.filtered:q} --out {output:q}"
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
        build=nbuild,
        db_root=ns_db_root,
    log:
        log_file("nightset_labels_{nightset}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} nightset-relabel --queries {input.dedup:q} --positions {input.photos:q} --photos {params.build:q}/collected"
        " --db-root {params.db_root:q} --db-table {input.db:q} --build {params.build:q} --replay-only 2> {log:q}"


rule nightset_verify:
    """Queries with a database image within threshold_m, in the VG layout, and the counts of every step."""
    input:
        labels=nightset_file("{nightset}", "relabel/labels.csv"),
        db=lambda w: index_summary_file(NIGHTSETS[w.nightset]["database"]),
    output:
        nightset_file("{nightset}", "dataset/counts.json"),
    params:
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
        "{PY} nightset-verify --labels {input.labels:q} --photos {params.build:q}/collected --db-root {params.db_root:q}"
        " --db-index {params.db_index:q} --build {params.build:q} --out {params.out:q}"
        " --threshold {params.threshold} 2> {log:q}"
