# Stage 1: global descriptors (sharded, resumable) -> FAISS index -> top-k lists.


rule fit_global:
    """Fit a global model's codebook/PCA (VLAD) on a sample of database images."""
    input:
        table=index_table("{dataset}", "database"),
        checked=lambda w: [ancient(p) for p in weights_check("global", w.gmethod)],  # order only
    output:
        fit_file("{dataset}", "{gmethod}"),
    wildcard_constraints:
        gmethod=alternation(FITTED),
    params:
        py=PY,
        root=dataset_root,
        conf=lambda w: method_json(w.gmethod),
    log:
        log_file("fit_{dataset}_{gmethod}"),
    threads: 2
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=120,
    conda:
        CONDA_ENV
    shell:
        "{params.py} --threads {threads} fit-global --conf {params.conf:q} --root {params.root:q}"
        " --table {input.table:q} --out {output:q} 2> {log:q}"


rule extract_database_shard:
    """Global descriptors of one shard (retrieval.shard_size images) of the database."""
    input:
        table=index_table("{dataset}", "database"),
        fit=fit_state,
        checked=lambda w: [ancient(p) for p in weights_check("global", w.gmethod)],  # order only
    output:
        shard_output(directory(shard_store("{dataset}", "{gmethod}", "{shard}"))),
    wildcard_constraints:
        gmethod=alternation(EXTRACTED),
    params:
        py=PY,
        root=dataset_root,
        conf=lambda w: method_json(w.gmethod),
        shard_size=config["retrieval"]["shard_size"],
        fit=fit_arg,
    log:
        log_file("extract_{dataset}_{gmethod}_database_{shard}"),
    threads: 2
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=240,
    conda:
        CONDA_ENV
    shell:
        "{params.py} --threads {threads} extract-global --conf {params.conf:q} --root {params.root:q}"
        " --table {input.table:q} --out {output:q} --split database --dataset {wildcards.dataset}"
        " --shard {wildcards.shard} --shard-size {params.shard_size} {params.fit} 2> {log:q}"


rule extract_queries:
    """Global descriptors of all queries (one store)."""
    input:
        table=index_table("{dataset}", "queries"),
        fit=fit_state,
        checked=lambda w: [ancient(p) for p in weights_check("global", w.gmethod)],  # order only
    output:
        directory(queries_store("{dataset}", "{gmethod}")),
    wildcard_constraints:
        gmethod=alternation(EXTRACTED),
    params:
        py=PY,
        root=dataset_root,
        conf=lambda w: method_json(w.gmethod),
        fit=fit_arg,
    log:
        log_file("extract_{dataset}_{gmethod}_queries"),
    threads: 2
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=120,
    conda:
        CONDA_ENV
    shell:
        "{params.py} --threads {threads} extract-global --conf {params.conf:q} --root {params.root:q}"
        " --table {input.table:q} --out {output:q} --split queries --dataset {wildcards.dataset}"
        " {params.fit} 2> {log:q}"


rule gather_database:
    """The database shards gathered into one chunked store (bounded memory, resumable)."""
    input:
        database_shards,
    output:
        directory(database_store("{dataset}", "{gmethod}")),
    wildcard_constraints:
        gmethod=alternation(EXTRACTED),
    params:
        py=PY,
        chunk_rows=config["retrieval"]["gather_chunk_rows"],
        shards=lambda w, input: " ".join(shlex.quote(p) for p in input if p.endswith(".zarr")),
    log:
        log_file("gather_{dataset}_{gmethod}"),
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "{params.py} gather-global --out {output:q} --chunk-rows {params.chunk_rows} {params.shards} 2> {log:q}"


rule build_index:
    """FAISS index over the database store (type chosen by size, or retrieval.index)."""
    input:
        unpack(index_inputs),
    output:
        index=faiss_index("{dataset}", "{gmethod}"),
        names=faiss_index("{dataset}", "{gmethod}") + ".json",
    wildcard_constraints:
        gmethod=alternation(EXTRACTED),
    params:
        py=PY,
        index=config["retrieval"]["index"],
        options=" ".join(
            f"--{k.replace('_', '-')} {config['retrieval'][k]}"
            for k in ("nlist", "m", "nbits", "train_size", "chunk_size", "gpu", "pca") if config["retrieval"].get(k) is not None
        ),
    log:
        log_file("faiss_{dataset}_{gmethod}"),
    resources:
        mem_mb=lambda w: index_mem_mb(w, "build"),
        runtime=120,
    conda:
        CONDA_ENV
    shell:
        "{params.py} build-index --out {output.index:q} --index {params.index:q} {params.options} {input.database:q} 2> {log:q}"


rule search:
    """Top-k database candidates of every query (compressed indexes: re-scored exactly)."""
    input:
        unpack(search_inputs),
    output:
        topk_file("{dataset}", "{gmethod}"),
    wildcard_constraints:
        gmethod=alternation(EXTRACTED),
    params:
        py=PY,
        k=config["retrieval"]["k"],
        nprobe=config["retrieval"]["nprobe"],
        gpu=config["retrieval"]["gpu"],
        rescore=config["retrieval"]["rescore"],
        meta=lambda w: json.dumps({"method": w.gmethod, "dataset": w.dataset, "conf": GMETHODS[w.gmethod]}),
    log:
        log_file("search_{dataset}_{gmethod}"),
    resources:
        mem_mb=lambda w: index_mem_mb(w, "search"),
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "{params.py} search --index {input.index:q} --queries {input.queries:q} --database {input.database:q} --out {output:q}"
        " --k {params.k} --nprobe {params.nprobe} --gpu {params.gpu} --rescore {params.rescore}"
        " --meta {params.meta:q} 2> {log:q}"


rule import_topk:
    """An existing top-k file (the thesis's stage-1 HDF5: a path, or a registered data file
    fetched first), checked and stored as a method."""
    input:
        import_input,
    output:
        topk_file("{dataset}", "{gmethod}"),
    wildcard_constraints:
        gmethod=alternation(IMPORTED),
    params:
        py=PY,
        k=config["retrieval"]["k"],
        src=import_arg,
    log:
        log_file("import_{dataset}_{gmethod}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} import-topk {params.src} --dst {output:q} --k {params.k} 2> {log:q}"
