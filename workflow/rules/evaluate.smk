# Evaluation: Recall@N of each method's top-k list -> results/{dataset}/{method}.csv


rule results:
    input:
        lambda w: rebuild_if_inputs_missing(f"{RESULTS}/{w.dataset}/{w.gmethod}.csv", [f"{WORK}/{w.dataset}/topk/{w.gmethod}.h5"]),
    output:
        f"{RESULTS}/{{dataset}}/{{gmethod}}.csv",
    wildcard_constraints:
        gmethod=alternation(GMETHODS),
    params:
        threshold=config["evaluation"]["threshold_m"],
        ns=" ".join(map(str, config["evaluation"]["recall_at"])),
        conf=lambda w: method_json(w.gmethod),
    log:
        f"{WORK}/logs/results_{{dataset}}_{{gmethod}}.log",
    conda:
        CONDA_ENV
    shell:
        "{PY} results --topk {input[0]:q} --out {output:q} --dataset {wildcards.dataset}"
        " --method {wildcards.gmethod} --conf {params.conf:q} --threshold {params.threshold}"
        " --ns {params.ns} 2> {log:q}"
