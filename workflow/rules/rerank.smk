# Stage 2: local features (once per dataset and extractor) -> matches (once per
# retrieval + features + matcher) -> scores and re-ranked lists (per method) -> results.


rule check_weights:
    """Load a model's weights once (keys, shapes, pickle safety), first of all jobs
    (priority): a wrong or missing file fails the run in seconds, naming the entry and
    the file, not after hours of retrieval."""
    input:
        weights=lambda w: random_weights(checked_conf(w.kind, w.name)),
        fetched=lambda w: fetched_weights(checked_conf(w.kind, w.name)),
    output:
        weights_check_file("{kind}", "{name}"),
    wildcard_constraints:
        kind="local|matcher|global",
    params:
        py=PY,
        conf=lambda w: json.dumps(checked_conf(w.kind, w.name), sort_keys=True),
        what=lambda w: f"{SECTION[w.kind]}.{w.name}" + (".model" if w.kind == "global" else ""),
    priority: 100
    log:
        log_file("check_weights_{kind}_{name}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} check-weights --kind {wildcards.kind} --conf {params.conf:q} --what {params.what:q} --out {output:q}"
        " 2> {log:q}"


rule extract_local:
    """Local features of the queries and the union of their top-K candidates (each image once)."""
    input:
        topk=lambda w: [p for p, _ in features_users(w.dataset, w.features)],
        index=index_summary_file("{dataset}"),
        weights=lambda w: random_weights(LOCAL[w.features]),
        fetched=lambda w: fetched_weights(LOCAL[w.features]),
        checked=lambda w: [ancient(p) for p in weights_check("local", w.features)],  # order only, not mtime
    output:
        features_file("{dataset}", "{features}"),
    wildcard_constraints:
        features=alternation(LOCAL),
    params:
        py=PY,
        conf=lambda w: json.dumps(LOCAL[w.features], sort_keys=True),
        topk=lambda w: " ".join(shlex.quote(f"{p}:{k}") for p, k in features_users(w.dataset, w.features)),
        base=lambda w: features_base(w.dataset),
        resolver=resolver_args,
    log:
        log_file("local_{dataset}_{features}"),
    threads: 2
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=480,
    conda:
        CONDA_ENV
    shell:
        "{params.py} --threads {threads} extract-local --conf {params.conf:q} {params.resolver} --topk {params.topk}"
        " --base {params.base:q} --out {output:q} 2> {log:q}"


rule match:
    """Matches of every query with its top-K candidates, for one extractor and matcher."""
    input:
        unpack(match_inputs),
    output:
        matches_file("{dataset}", "{retrieval}", "{features}", "{matcher}"),
    wildcard_constraints:
        retrieval=alternation(list(GMETHODS) + list(GATES)),
        features=alternation(list(LOCAL) + [IMAGES]),
        matcher=alternation(MATCHERS),
    params:
        py=PY,
        conf=lambda w: json.dumps(MATCHERS[w.matcher], sort_keys=True),
        k=lambda w: match_k(w.retrieval, w.features, w.matcher),
        resolver=resolver_args,
        features=lambda w, input: features_arg(input),
        # pair-keyed matches shared by every retrieval and K of this dataset (pipeline/match_store.py)
        store=lambda w: pair_stores(w.dataset),
    log:
        log_file("match_{dataset}_{retrieval}_{features}+{matcher}"),
    threads: 2
    resources:
        gpu=GPUS,
        mem_mb=8000,
        runtime=480,
    conda:
        CONDA_ENV
    shell:
        "{params.py} --threads {threads} match {params.features} --conf {params.conf:q} --topk {input.topk:q}"
        " --k {params.k} --out {output:q} --store-base {params.store:q} {params.resolver} 2> {log:q}"


rule gate_fit:
    """A gate threshold learnt on one dataset: the logistic model of a right top-1 given the
    signal, on this method's retrieval there (applied to every dataset the method runs on)."""
    input:
        topk=lambda w: topk_file(w.dataset, RERANK[w.method]["retrieval"]),
        probe=lambda w: list(probe_inputs(w.dataset, w.method).values()),
    output:
        gate_fit_file("{dataset}", "{method}"),
    wildcard_constraints:
        method=alternation(FITTED_GATES),
    params:
        py=PY,
        signal=lambda w: RERANK[w.method]["gate"]["signal"],
        p_right=lambda w: RERANK[w.method]["gate"]["fit"]["p_right"],
        threshold=config["evaluation"]["threshold_m"],
        index=lambda w: positions_index_arg(w.dataset),
        probe=lambda w: probe_arg(w.dataset, w.method),
    log:
        log_file("gate_fit_{dataset}_{method}"),
    resources:
        gpu=lambda w: GPUS if probes(w.method) else 0,
    conda:
        CONDA_ENV
    shell:
        "{params.py} gate-fit --topk {input.topk:q} --signal {params.signal} --p-right {params.p_right}"
        " --threshold-m {params.threshold} {params.index} {params.probe} --out {output:q} 2> {log:q}"


rule gate:
    """The queries a gated method re-ranks (its confidence signal below its threshold: fixed,
    or learnt by gate_fit), as a top-k file of those queries: stage 2 never sees the others."""
    input:
        unpack(gate_inputs),
    output:
        topk_file("{dataset}", "{gmethod}"),
    wildcard_constraints:
        gmethod=alternation(GATES),
    params:
        py=PY,
        signal=lambda w: RERANK[GATES[w.gmethod]]["gate"]["signal"],
        how=gate_arg,
        index=lambda w: positions_index_arg(w.dataset),
        probe=lambda w: probe_arg(w.dataset, GATES[w.gmethod]),
    log:
        log_file("gate_{dataset}_{gmethod}"),
    resources:
        gpu=lambda w: GPUS if probes(GATES[w.gmethod]) else 0,  # the inliers probe extracts and matches
    conda:
        CONDA_ENV
    shell:
        "{params.py} gate --topk {input.topk:q} --signal {params.signal} {params.how} {params.index} {params.probe}"
        " --out {output:q}"
        " 2> {log:q}"


rule score:
    """Scores of each method's matches, and the re-ranked top-k lists."""
    input:
        unpack(score_inputs),
    output:
        rerank_file("{dataset}", "{method}"),
    wildcard_constraints:
        method=alternation(RERANK),
    params:
        py=PY,
        conf=lambda w: json.dumps(config["scorers"][RERANK[w.method]["scorer"]], sort_keys=True),
        k=lambda w: RERANK[w.method]["k"],
        meta=lambda w: json.dumps({"method": w.method, "retrieval": RERANK[w.method]["retrieval"], "dataset": w.dataset}),
        resolver=resolver_args,
        features=lambda w, input: features_arg(input),
        merge=lambda w, input: merge_arg(input),
    log:
        log_file("score_{dataset}_{method}"),
    threads: 2
    conda:
        CONDA_ENV
    shell:
        "{params.py} score {params.features} --matches {input.matches:q} --conf {params.conf:q}"
        " --topk {input.topk:q} --k {params.k} --out {output:q} --meta {params.meta:q} {params.resolver}"
        " --workers {threads} {params.merge} 2> {log:q}"


rule rerank_results:
    """results/{dataset}/{method}.csv: the re-ranked recalls beside the retrieval baseline."""
    input:
        unpack(rerank_results_inputs),
    output:
        results_file("{dataset}", "{method}"),
    wildcard_constraints:
        method=alternation(RERANK),
    params:
        py=PY,
        threshold=config["evaluation"]["threshold_m"],
        ns=" ".join(map(str, config["evaluation"]["recall_at"])),
        conf=lambda w: json.dumps({
            "method": RERANK[w.method],
            "features": LOCAL.get(RERANK[w.method]["features"]),
            "matcher": MATCHERS[RERANK[w.method]["matcher"]],
            "scorer": config["scorers"][RERANK[w.method]["scorer"]],
        }, sort_keys=True),
        summary=lambda w, input: f"--index-summary {shlex.quote(input.summary[0])}" if input.summary else "",
    log:
        log_file("rerank_results_{dataset}_{method}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} rerank-results --retrieval {input.retrieval:q} --reranked {input.reranked:q} --out {output:q}"
        " --dataset {wildcards.dataset} --method {wildcards.method} --conf {params.conf:q}"
        " --threshold {params.threshold} --ns {params.ns} {params.summary} 2> {log:q}"


rule random_weights:
    """A seeded random checkpoint in a model's official format, labelled as random (no weights
    ship here); named as the official file is (.pth, .ckpt: Lightning, .safetensors: MegaLoc)."""
    output:
        random_weights_file("{model}", "{seed}") + ".{ext}",
    wildcard_constraints:
        seed=r"\d+",
        ext="pth|ckpt|safetensors",
    params:
        py=PY,
    log:
        log_file("random_weights_{model}_seed{seed}.{ext}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} random-weights --out {output:q} 2> {log:q}"


rule random_weights_folder:
    """The same for models whose official format is a folder (DELG's TF SavedModel variables)."""
    output:
        directory(random_weights_file("{model}", "{seed}")),
    wildcard_constraints:
        seed=r"\d+",
    params:
        py=PY,
    log:
        log_file("random_weights_{model}_seed{seed}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} random-weights --out {output:q} 2> {log:q}"
