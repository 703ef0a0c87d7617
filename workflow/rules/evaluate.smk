# Evaluation: Recall@N of each method's top-k list -> results/{dataset}/{method}.csv


def index_tables(w):
    """Datasets with a positions CSV are evaluated with their index tables (names carry no position)."""
    return [f"{WORK}/{w.dataset}/index/summary.json"] if DATASETS[w.dataset].get("positions") else []


rule results:
    input:
        topk=lambda w: rebuild_if_inputs_missing(f"{RESULTS}/{w.dataset}/{w.gmethod}.csv", [f"{WORK}/{w.dataset}/topk/{w.gmethod}.h5"]),
        index=index_tables,
    output:
        f"{RESULTS}/{{dataset}}/{{gmethod}}.csv",
    wildcard_constraints:
        gmethod=alternation(GMETHODS),
    params:
        threshold=config["evaluation"]["threshold_m"],
        ns=" ".join(map(str, config["evaluation"]["recall_at"])),
        conf=lambda w: method_json(w.gmethod),
        index=lambda w, input: f"--index-dir {shlex.quote(os.path.dirname(input.index[0]))}" if input.index else "",
    log:
        f"{WORK}/logs/results_{{dataset}}_{{gmethod}}.log",
    conda:
        CONDA_ENV
    shell:
        "{PY} results --topk {input.topk[0]:q} --out {output:q} --dataset {wildcards.dataset}"
        " --method {wildcards.gmethod} --conf {params.conf:q} --threshold {params.threshold}"
        " --ns {params.ns} {params.index} 2> {log:q}"
