# Stage 2: local features (once per dataset and extractor) -> matches (once per
# retrieval + features + matcher) -> scores and re-ranked lists (per method) -> results.

RERANK = config["rerank_methods"]
LOCAL = config["local_features"]
MATCHERS = config["matchers"]
IMAGES = "images"  # the "features" part of the matches file name of image-input matchers


def fetched_weights(conf):
    """Records of fetch_weights for the registered files a conf names (weights: auto or a name)."""
    from pipeline.assets import conf_assets
    from pipeline.weights import full_model_conf

    return [weights_fetch_file(a.name) for a in conf_assets(conf, fill=full_model_conf)]


def method_assets(method):
    """The registered files a re-ranking method's extractor and matcher name."""
    from pipeline.assets import conf_assets
    from pipeline.weights import full_model_conf

    c = RERANK[method]
    confs = [MATCHERS[c["matcher"]]] + ([LOCAL[c["features"]]] if c["features"] else [])
    return [a for conf in confs for a in conf_assets(conf, fill=full_model_conf)]


def weights_here(assets_):
    """Whether every one of these registered files has a verified local copy (nothing to fetch)."""
    from pipeline.assets import locate

    return all(locate(a, remember=False) is not None for a in assets_)


def in_default_target(dataset, method):
    """Re-ranking methods the default target builds: on a dataset with images, not on random
    checkpoints, with their registered weights here (no download), on a default retrieval."""
    c = RERANK[method]
    return (rerank_available(dataset, method) and not method_random_weights(method)
            and weights_here(method_assets(method)) and global_weights_here(c["retrieval"]))


def random_weights(conf):
    """Weight files of a conf that are random checkpoints this workflow makes (rule random_weights)."""
    from pipeline.assets import weight_paths

    return [p for p in weight_paths(conf) if p.startswith(random_weights_dir() + "/")]


def method_random_weights(method):
    c = RERANK[method]
    confs = [MATCHERS[c["matcher"]]] + ([LOCAL[c["features"]]] if c["features"] else [])
    return [p for conf in confs for p in random_weights(conf)]


def features_part(c):
    return c["features"] or IMAGES


def rerank_available(dataset, method):
    return bool(DATASETS[dataset].get("root")) and available(dataset, RERANK[method]["retrieval"])


def features_users(dataset, features):
    """(top-k file, K) of every re-ranking method that needs these features on this dataset."""
    pairs = {}
    for m, c in RERANK.items():
        if c["features"] == features and rerank_available(dataset, m):
            path = topk_file(dataset, c["retrieval"])
            pairs[path] = max(pairs.get(path, 0), c["k"])
    return sorted(pairs.items())


def match_k(retrieval, features, matcher):
    """The largest K of the methods that share these matches."""
    return max(c["k"] for c in RERANK.values()
               if (c["retrieval"], features_part(c), c["matcher"]) == (retrieval, features, matcher))


def resolver_args(wildcards):
    return (f"--root {shlex.quote(DATASETS[wildcards.dataset]['root'])}"
            f" --index-dir {shlex.quote(index_dir(wildcards.dataset))}")


def checked_conf(kind, name):
    """The model conf of a local-features, matcher or global-method entry."""
    if kind == "global":
        return GMETHODS[name].get("model", {})
    return (LOCAL if kind == "local" else MATCHERS)[name]


def weights_check(kind, name):
    """The stamp of check_weights for an entry with weight files (none without)."""
    from pipeline.assets import weight_paths

    return [weights_check_file(kind, name)] if weight_paths(checked_conf(kind, name)) else []


SECTION = {"local": "local_features", "matcher": "matchers", "global": "global_methods"}


rule fetch_weights:
    """A registered weights file (pipeline/assets.yaml) found locally or downloaded, verified by
    checksum and by its model's loader; first of all jobs (priority), so a dead link or no
    network fails the run before any extraction, naming every URL and the manual step."""
    output:
        weights_fetch_file("{asset}"),
    params:
        progress=lambda w: "" if sys.stderr.isatty() else "--no-progress",
    priority: 100
    log:
        log_file("fetch_weights_{asset}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} weights fetch {wildcards.asset} --stamp {output:q} {params.progress} 2> {log:q}"


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
        conf=lambda w: json.dumps(checked_conf(w.kind, w.name), sort_keys=True),
        what=lambda w: f"{SECTION[w.kind]}.{w.name}" + (".model" if w.kind == "global" else ""),
    priority: 100
    log:
        log_file("check_weights_{kind}_{name}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} check-weights --kind {wildcards.kind} --conf {params.conf:q} --what {params.what:q} --out {output:q}"
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
        "{PY} --threads {threads} extract-local --conf {params.conf:q} {params.resolver} --topk {params.topk}"
        " --base {params.base:q} --out {output:q} 2> {log:q}"


def match_inputs(w):
    named = {"topk": topk_file(w.dataset, w.retrieval)}
    if w.features != IMAGES:
        named["features"] = features_file(w.dataset, w.features)
    return {
        **named_with_stamp(matches_file(w.dataset, w.retrieval, w.features, w.matcher), named),
        "weights": random_weights(MATCHERS[w.matcher]),
        "fetched": fetched_weights(MATCHERS[w.matcher]),
        "checked": [ancient(p) for p in weights_check("matcher", w.matcher)],  # order only, not mtime
    }


def features_arg(input):
    return f"--features {shlex.quote(input.features)}" if "features" in input.keys() else ""


rule match:
    """Matches of every query with its top-K candidates, for one extractor and matcher."""
    input:
        unpack(match_inputs),
    output:
        matches_file("{dataset}", "{retrieval}", "{features}", "{matcher}"),
    wildcard_constraints:
        retrieval=alternation(GMETHODS),
        features=alternation(list(LOCAL) + [IMAGES]),
        matcher=alternation(MATCHERS),
    params:
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
        "{PY} --threads {threads} match {params.features} --conf {params.conf:q} --topk {input.topk:q}"
        " --k {params.k} --out {output:q} --store-base {params.store:q} {params.resolver} 2> {log:q}"


def score_inputs(w):
    c = RERANK[w.method]
    named = {
        "matches": matches_file(w.dataset, c["retrieval"], features_part(c), c["matcher"]),
        "topk": topk_file(w.dataset, c["retrieval"]),
    }
    if c["features"]:  # index matches need the keypoints; every method reports the extraction time
        named["features"] = features_file(w.dataset, c["features"])
    return named_with_stamp(rerank_file(w.dataset, w.method), named)


rule score:
    """Scores of each method's matches, and the re-ranked top-k lists."""
    input:
        unpack(score_inputs),
    output:
        rerank_file("{dataset}", "{method}"),
    wildcard_constraints:
        method=alternation(RERANK),
    params:
        conf=lambda w: json.dumps(config["scorers"][RERANK[w.method]["scorer"]], sort_keys=True),
        k=lambda w: RERANK[w.method]["k"],
        meta=lambda w: json.dumps({"method": w.method, "retrieval": RERANK[w.method]["retrieval"], "dataset": w.dataset}),
        resolver=resolver_args,
        features=lambda w, input: features_arg(input),
    log:
        log_file("score_{dataset}_{method}"),
    threads: 2
    conda:
        CONDA_ENV
    shell:
        "{PY} score {params.features} --matches {input.matches:q} --conf {params.conf:q}"
        " --topk {input.topk:q} --k {params.k} --out {output:q} --meta {params.meta:q} {params.resolver}"
        " --workers {threads} 2> {log:q}"


def rerank_results_inputs(w):
    return {**named_with_stamp(results_file(w.dataset, w.method), {
        "reranked": rerank_file(w.dataset, w.method),
        "retrieval": topk_file(w.dataset, RERANK[w.method]["retrieval"]),
    }), "summary": index_summary(w.dataset)}


rule rerank_results:
    """results/{dataset}/{method}.csv: the re-ranked recalls beside the retrieval baseline."""
    input:
        unpack(rerank_results_inputs),
    output:
        results_file("{dataset}", "{method}"),
    wildcard_constraints:
        method=alternation(RERANK),
    params:
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
        "{PY} rerank-results --retrieval {input.retrieval:q} --reranked {input.reranked:q} --out {output:q}"
        " --dataset {wildcards.dataset} --method {wildcards.method} --conf {params.conf:q}"
        " --threshold {params.threshold} --ns {params.ns} {params.summary} 2> {log:q}"


rule random_weights:
    """A seeded random checkpoint in a model's official format, labelled as random (no weights ship here)."""
    output:
        random_weights_file("{model}", "{seed}") + ".pth",
    wildcard_constraints:
        seed=r"\d+",
    log:
        log_file("random_weights_{model}_seed{seed}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} random-weights --out {output:q} 2> {log:q}"


rule random_weights_folder:
    """The same for models whose official format is a folder (DELG's TF SavedModel variables)."""
    output:
        directory(random_weights_file("{model}", "{seed}")),
    wildcard_constraints:
        seed=r"\d+",
    log:
        log_file("random_weights_{model}_seed{seed}"),
    conda:
        CONDA_ENV
    shell:
        "{PY} random-weights --out {output:q} 2> {log:q}"
