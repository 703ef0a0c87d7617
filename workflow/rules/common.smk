# Shared helpers: method lookups, the command prefix, the rebuild stamps. No logic beyond lookups;
# every path comes from paths.smk.
import json
import shlex
import sys
import time

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
CONDA_ENV = "../../" + config["conda_env"]
GPUS = config["gpus_per_job"]  # the `gpu` resource of the GPU-capable rules


# trivial jobs run where snakemake runs, never as cluster jobs
localrules:
    stamp,
    fetch_weights,
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
                     table_size(w.dataset, "queries") or 100_000)


def available(dataset, method):
    """Whether a retrieval result can be produced for this dataset and method."""
    if method in IMPORTED:
        return dataset in GMETHODS[method]["import"]
    return bool(DATASETS[dataset].get("root"))


def global_weights_here(method):
    """Whether a global method's registered weights (checkpoint: auto) have a local copy."""
    from pipeline.assets import conf_assets
    from pipeline.weights import full_model_conf

    return weights_here(conf_assets(GMETHODS[method].get("model", {}), fill=full_model_conf))


def all_results():
    """Retrieval results of the default target (methods whose weights are here)."""
    return [results_file(d, m) for d in DATASETS for m in GMETHODS if available(d, m) and global_weights_here(m)]


rule stamp:
    """The marker of rebuild_if_inputs_missing."""
    output:
        stamp_file("{path}"),
    shell:
        "touch {output:q}"
