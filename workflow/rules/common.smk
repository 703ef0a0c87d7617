# Shared helpers: method lookups, the command prefix, the rebuild stamps. No logic beyond lookups;
# every path comes from paths.smk.
import json
import shlex
import sys
import time

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)  # the package, also when it is not pip-installed
from pipeline.config import check_config
from pipeline.global_store import num_shards
from pipeline.global_features import get_model_class as global_model_class
from pipeline.index_plan import memory_mb
from pipeline.datasets.index import read_table

check_config(config)

WORK = config["work_dir"]
RESULTS = config["results_dir"]
DATASETS = config["datasets"]
GMETHODS = config["global_methods"]


include: "paths.smk"


# every rule runs the package's CLI, with the workflow folder on the path
PY = (f"PYTHONPATH={shlex.quote(workflow.basedir)}${{PYTHONPATH:+:$PYTHONPATH}} python -m pipeline"
      f" --max-pixels {int(config['max_pixels'])}")
CONDA_ENV = os.path.join("..", "..", config["conda_env"])
GPUS = config["gpus_per_job"]  # the `gpu` resource of the GPU-capable rules


# trivial jobs run where snakemake runs, never as cluster jobs
localrules:
    stamp,
    fetch_weights,
    fetch_data,
    published_stage1,
    gate,
    gate_fit,
    check_weights,
    results,
    rerank_results,
    dataset_summary,


def alternation(names):
    return "|".join(sorted(names)) or "$^"


EXTRACTED = [m for m, c in GMETHODS.items() if "model" in c]
IMPORTED = [m for m, c in GMETHODS.items() if "import" in c]
def _needs_fit(method):
    return global_model_class(GMETHODS[method]["model"]["name"]).needs_fit


# global methods whose model is fitted on the database first (the class says so: needs_fit)
FITTED = [m for m in EXTRACTED if _needs_fit(m)]


wildcard_constraints:
    dataset=alternation(DATASETS),
    shard=r"\d{4}",


def dataset_root(wildcards):
    root = DATASETS[wildcards.dataset].get("root")
    if not root:
        raise ValueError(f"dataset {wildcards.dataset!r} has no root: only imported top-k lists can be evaluated on it")
    return root


def method_json(method):
    return json.dumps(GMETHODS[method], sort_keys=True)


def rebuild_if_inputs_missing(output, inputs):
    """``inputs`` plus ``<work_dir>/stamps/<output>.stamp``, a marker that gets new
    content when one of ``inputs`` was deleted while ``output`` exists.

    Snakemake does not re-run a job whose output exists just because an
    intermediate input is gone. Deleting, say, one database shard should re-run
    that shard and everything built from it: a stamp with new content makes the
    job out of date, and re-running it needs, and so re-makes, the missing input. The stamp
    is always an input, so the set of inputs Snakemake records never changes. Under
    ``snakemake -n`` nothing is written: the job gets a stamp that does not exist yet, so the
    dry run lists the same jobs the run will do (plus that stamp's own ``stamp`` job).
    """
    inputs = list(inputs)
    stamp = stamp_file(output)
    if os.path.exists(output) and os.path.exists(stamp) and not all(os.path.exists(p) for p in inputs):
        if workflow.dryrun:
            # -n writes nothing: a stamp still to be made (by rule stamp) shows the rebuild instead
            return inputs + [stamp_file(f"{output}.inputs-missing")]
        # new content, not just a new mtime: Snakemake ignores touched files whose checksum is unchanged
        missing = [p for p in inputs if not os.path.exists(p)]
        with open(stamp, "w") as f:
            f.write(f"{time.time()} inputs missing: {missing}\n")
    return inputs + [stamp]


def named_with_stamp(output, named):
    """``named`` inputs (a dict for unpack()) plus the stamp of rebuild_if_inputs_missing."""
    return {**named, "stamp": rebuild_if_inputs_missing(output, named.values())[-1]}


def shard_output(path):
    """Database shard stores are kept, or (retrieval.keep_shards: false) deleted by Snakemake once
    gathered into database.zarr: half the disk, but a re-gather then re-extracts them."""
    return path if config["retrieval"]["keep_shards"] else temp(path)


def database_shards(wildcards):
    """All database shard stores of a dataset/method (known once the index exists)."""
    table = checkpoints.index_dataset.get(dataset=wildcards.dataset).output.database
    n = num_shards(len(read_table(table)), config["retrieval"]["shard_size"])
    shards = [shard_store(wildcards.dataset, wildcards.gmethod, f"{i:04d}") for i in range(n)]
    if not config["retrieval"]["keep_shards"]:  # deleted on purpose: no rebuild when they are gone
        return shards
    return rebuild_if_inputs_missing(database_store(wildcards.dataset, wildcards.gmethod), shards)


def table_size(dataset, split="database"):
    """Images of a dataset's split (once it is indexed), else None."""
    table = index_table(dataset, split)
    if not os.path.exists(table):
        return None
    with open(table) as f:
        return max(0, sum(1 for _ in f) - 1)


def index_mem_mb(w, stage):
    """mem_mb of build_index / search: from the database size, descriptor size and index type."""
    r = config["retrieval"]
    model = GMETHODS[w.gmethod]["model"]
    dim = global_model_class(model["name"]).descriptor_size(model)
    return memory_mb(stage, table_size(w.dataset), dim, r["index"],
                     r["k"], r["nlist"], r["m"], r["nbits"], r["train_size"], r["chunk_size"], r["rescore"],
                     table_size(w.dataset, "queries") or 100_000, r["pca"])


def available(dataset, method):
    """Whether a retrieval result can be produced for this dataset and method."""
    if method in IMPORTED:
        return dataset in GMETHODS[method]["import"]
    return bool(DATASETS[dataset].get("root"))


def global_assets(method, dataset=None):
    """The registered files a global method needs: its model's weights (checkpoint: auto), or the
    data file it imports for ``dataset`` (an asset name under import:)."""
    from pipeline.assets import conf_assets
    from pipeline.weights import full_model_conf

    c = GMETHODS[method]
    if "import" in c:
        a = data_asset(c["import"].get(dataset)) if dataset else None
        return [a] if a else []
    return conf_assets(c.get("model", {}), fill=full_model_conf)


def data_asset(value):
    """The registered data file an import: value names, or None (a path)."""
    from pipeline.assets import load_registry

    a = load_registry().get(value) if isinstance(value, str) else None
    return a if a is not None and a.kind == "data" else None


DEFAULT = config["default_target"]


def listed_default(method, on_random_weights):
    """A method of the default target: named under default_target.methods, or (no list) any
    method not run on random checkpoints."""
    if DEFAULT["methods"] is not None:
        return method in DEFAULT["methods"]
    return not on_random_weights


def in_default_global(dataset, method):
    return available(dataset, method) and listed_default(method, bool(random_weights(GMETHODS[method].get("model", {}))))


def all_results():
    """Retrieval results of the default target."""
    return [results_file(d, m) for d in DATASETS for m in GMETHODS if in_default_global(d, m)]


def default_assets():
    """Every registered file (weights, data) the default target's jobs need, in order."""
    found = {}
    for d in DATASETS:
        for m in GMETHODS:
            if in_default_global(d, m):
                found.update((a.name, a) for a in global_assets(m, d))
        for m in RERANK:
            if in_default_target(d, m):
                found.update((a.name, a) for a in method_assets(m) + global_assets(RERANK[m]["retrieval"], d))
    return list(found.values())


def needs_no_download(dataset, method):
    """Whether a default results table needs no registered file at all."""
    if method in GMETHODS:
        return not global_assets(method, dataset)
    return not method_assets(method) and not global_assets(RERANK[method]["retrieval"], dataset)


def default_target():
    """The default target's files. Every registered file they need must be here or downloadable;
    otherwise the run stops before its first job with one message naming each missing file,
    its URLs and where to put it by hand (and the targets that need no download)."""
    from pipeline.assets import missing_message, unavailable

    files = all_results() + [results_file(d, m) for d in DATASETS for m in RERANK if in_default_target(d, m)]
    if DEFAULT["published"]:
        files.append(published_stage1_file())
    missing = unavailable(default_assets())
    if missing:
        free = [results_file(d, m) for d in DATASETS for m in [*GMETHODS, *RERANK]
                if (in_default_global(d, m) if m in GMETHODS else in_default_target(d, m)) and needs_no_download(d, m)]
        raise WorkflowError(missing_message(missing) + "\nThe default target needs them. Targets that need no download "
                            + ("still run: snakemake --cores 2 " + " ".join(free) if free else "exist in this config: none"))
    return files


def published_stage1_inputs():
    """Fetch records of the published stage-1 files that are here or downloadable now (the
    others get a "not here" row in the table)."""
    from pipeline.assets import availability
    from pipeline.published import published_assets

    assets = published_assets()
    probed = availability(assets)
    return [data_fetch_file(a.name) for a in assets if a.name not in probed or probed[a.name][0] is not None]


def import_input(w):
    value = GMETHODS[w.gmethod]["import"][w.dataset]
    a = data_asset(value)
    return data_fetch_file(a.name) if a else value


def import_arg(w):
    value = GMETHODS[w.gmethod]["import"][w.dataset]
    return f"--asset {shlex.quote(value)}" if data_asset(value) else f"--src {shlex.quote(value)}"


# ---------------------------------------------------------------- datasets (rules in datasets.smk)

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


# ---------------------------------------------------------------- global (rules in global.smk)

def fit_state(wildcards):
    return [fit_file(wildcards.dataset, wildcards.gmethod)] if wildcards.gmethod in FITTED else []


def fit_arg(wildcards, input):
    return f"--fit-state {shlex.quote(input.fit[0])}" if input.fit else ""


def index_inputs(w):
    return named_with_stamp(faiss_index(w.dataset, w.gmethod), {"database": database_store(w.dataset, w.gmethod)})


def search_inputs(w):
    d, g = w.dataset, w.gmethod
    return named_with_stamp(topk_file(d, g), {"index": faiss_index(d, g), "queries": queries_store(d, g),
                                              "database": database_store(d, g)})


# ---------------------------------------------------------------- evaluate (rules in evaluate.smk)

def index_tables(w):
    """Datasets with a positions CSV are evaluated with their index tables (names carry no position)."""
    return [index_summary_file(w.dataset)] if DATASETS[w.dataset].get("positions") else []


def index_summary(dataset):
    """The index summary of a dataset with images (query counts for the results); none for
    datasets that only import top-k files."""
    return [index_summary_file(dataset)] if DATASETS[dataset].get("root") else []


# ---------------------------------------------------------------- rerank (rules in rerank.smk)

RERANK = config["rerank_methods"]


def stage2_retrieval(method):
    """The top-k list stage 2 of a method works on: its retrieval's, or for a gated method
    (gate: in its config) the gate's subset of it, ``<retrieval>~<method>`` (rule gate)."""
    c = RERANK[method]
    return f"{c['retrieval']}~{method}" if c.get("gate") else c["retrieval"]


# gated top-k name -> its method
GATES = {stage2_retrieval(m): m for m, c in RERANK.items() if c.get("gate")}


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


def in_default_target(dataset, method):
    """Re-ranking methods the default target builds: on a dataset with images, listed (or, with
    no list, not on random checkpoints)."""
    return rerank_available(dataset, method) and listed_default(method, bool(method_random_weights(method)))


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
            path = topk_file(dataset, stage2_retrieval(m))
            pairs[path] = max(pairs.get(path, 0), c["k"])
    return sorted(pairs.items())


def match_k(retrieval, features, matcher):
    """The largest K of the methods that share these matches."""
    return max(c["k"] for m, c in RERANK.items()
               if (stage2_retrieval(m), features_part(c), c["matcher"]) == (retrieval, features, matcher))


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


def merge_arg(input):
    return f"--merge-into {shlex.quote(input.full)}" if "full" in input.keys() else ""


def gate_inputs(w):
    """The retrieval list to gate, and the learnt threshold of a fitted gate."""
    m = GATES[w.gmethod]
    fit = RERANK[m]["gate"].get("fit")
    return {"topk": topk_file(w.dataset, RERANK[m]["retrieval"]),
            "fit": [gate_fit_file(fit["dataset"], m)] if fit else [],
            **probe_inputs(w.dataset, m)}


def probes(method):
    """Whether a gated method's signal is its own score of the top-1 pair (``inliers``)."""
    return (RERANK[method].get("gate") or {}).get("signal") == "inliers"


def probe_inputs(dataset, method):
    """What the inliers probe reads besides the retrieval list: the dataset's index (names) and
    the method's weights (random checkpoints made here, registered files fetched)."""
    if not probes(method):
        return {}
    c = RERANK[method]
    confs = [MATCHERS[c["matcher"]]] + ([LOCAL[c["features"]]] if c["features"] else [])
    return {"index": index_summary_file(dataset),
            "probe_weights": [p for conf in confs for p in random_weights(conf) + fetched_weights(conf)]}


def probe_arg(dataset, method):
    """--probe JSON of the inliers gate: the method's stage 2 confs and the dataset's shared
    stores, so its top-1 features and matches are reused by extract_local and match."""
    if not probes(method):
        return ""
    c = RERANK[method]
    probe = {"features": LOCAL[c["features"]] if c["features"] else None,
             "feature_base": features_base(dataset) if c["features"] else None,
             "matcher": MATCHERS[c["matcher"]], "scorer": config["scorers"][c["scorer"]],
             "root": DATASETS[dataset]["root"], "pair_base": pair_stores(dataset), "index_dir": index_dir(dataset)}
    return f"--probe {shlex.quote(json.dumps(probe, sort_keys=True))} --workdir {shlex.quote(WORK)}"


def positions_index_arg(dataset):
    """--index-dir for a dataset whose names carry no positions (a positions CSV), else ""."""
    return f"--index-dir {shlex.quote(index_dir(dataset))}" if DATASETS[dataset].get("positions") else ""


def gate_arg(w, input):
    if input.fit:
        return f"--fit {shlex.quote(input.fit[0])}"
    return f"--threshold={RERANK[GATES[w.gmethod]]['gate']['threshold']}"


# re-ranking methods whose gate threshold is learnt on a dataset (rule gate_fit)
FITTED_GATES = [m for m, c in RERANK.items() if (c.get("gate") or {}).get("fit")]


def features_arg(input):
    return f"--features {shlex.quote(input.features)}" if "features" in input.keys() else ""


def score_inputs(w):
    c = RERANK[w.method]
    named = {
        "matches": matches_file(w.dataset, stage2_retrieval(w.method), features_part(c), c["matcher"]),
        "topk": topk_file(w.dataset, stage2_retrieval(w.method)),
    }
    if c.get("gate"):  # the gate's subset is scored, then merged into the full list
        named["full"] = topk_file(w.dataset, c["retrieval"])
    if c["features"]:  # index matches need the keypoints; every method reports the extraction time
        named["features"] = features_file(w.dataset, c["features"])
    return named_with_stamp(rerank_file(w.dataset, w.method), named)


def rerank_results_inputs(w):
    return {**named_with_stamp(results_file(w.dataset, w.method), {
        "reranked": rerank_file(w.dataset, w.method),
        "retrieval": topk_file(w.dataset, RERANK[w.method]["retrieval"]),
    }), "summary": index_summary(w.dataset)}


# ---------------------------------------------------------------- report (rules in report.smk)

def report_methods(dataset):
    """Re-ranking methods of the default target on this dataset (random checkpoints excluded)."""
    return [m for m in RERANK if in_default_target(dataset, m)]


def signal_methods(dataset, gmethod):
    """Re-ranking methods whose score of the retrieval top-1 is an uncertainty signal of
    ``gmethod`` on ``dataset``: on that retrieval, ungated, runnable there, not on random weights."""
    return [m for m, c in RERANK.items() if c["retrieval"] == gmethod and not c.get("gate")
            and rerank_available(dataset, m) and not method_random_weights(m)]


def gate_twin(method):
    """The ungated method a gated one copies (same retrieval, features, matcher, scorer, K), or ""."""
    key = lambda c: (c["retrieval"], c["features"], c["matcher"], c["scorer"], c["k"])
    c = RERANK[method]
    return next((m for m, o in RERANK.items() if not o.get("gate") and key(o) == key(c)), "")


def report_spec():
    datasets = {}
    for d in DATASETS:
        results = [results_file(d, m) for m in GMETHODS if in_default_global(d, m)]
        results += [results_file(d, m) for m in report_methods(d)]
        if not results:
            continue
        methods = {}
        for m in report_methods(d):
            c = RERANK[m]
            methods[m] = {
                "retrieval_topk": topk_file(d, c["retrieval"]),
                "reranked_topk": rerank_file(d, m),
                # a gated method matched only the queries its gate sent: no match figures
                "features": features_file(d, c["features"]) if c["features"] and not c.get("gate") else None,
                "matches": None if c.get("gate") else matches_file(d, c["retrieval"], features_part(c), c["matcher"]),
                "scorer": config["scorers"][c["scorer"]],
                # a gated method is a measured point on its ungated twin's risk-coverage plot
                "gate_of": gate_twin(m) if c.get("gate") else None,
            }
        root = DATASETS[d].get("root")
        datasets[d] = {"root": root, "index_dir": index_dir(d) if root else None,
                       "results": results, "methods": methods}
    return {"threshold_m": config["evaluation"]["threshold_m"], "n_queries": 4, "datasets": datasets,
            # the thesis's stage-1 files (real photos): recalls beside the published ones, signals' AUC-PR
            "published": published_stage1_file() if DEFAULT.get("published") else None}


def dataset_results(dataset):
    return report_spec()["datasets"][dataset]["results"]


def report_inputs(wildcards):
    spec = report_spec()
    files = [summary_files(d)[0] for d in spec["datasets"]] + ([spec["published"]] if spec["published"] else [])
    for ds in spec["datasets"].values():
        files += ds["results"]
        for c in ds["methods"].values():
            files += [p for p in (c["retrieval_topk"], c["reranked_topk"], c["features"], c["matches"]) if p]
    return sorted(set(files))


# ---------------------------------------------------------------- nightset (rules in nightset.smk)

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


def filter_model_files(w):
    """Classifier confs given as files (a fitted JSON conf, a trained checkpoint): inputs, so a change re-runs."""
    values = NIGHTSETS[w.nightset].get("filter", {}).values()
    return [v for v in values if isinstance(v, str) and v.endswith((".json", ".pt", ".pth"))]
