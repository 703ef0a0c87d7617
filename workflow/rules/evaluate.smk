# Evaluation: Recall@N of each method's top-k list -> results/{dataset}/{method}.csv


rule results:
    input:
        topk=lambda w: rebuild_if_inputs_missing(results_file(w.dataset, w.gmethod), [topk_file(w.dataset, w.gmethod)]),
        index=index_tables,
        summary=lambda w: index_summary(w.dataset),
    output:
        results_file("{dataset}", "{gmethod}"),
    wildcard_constraints:
        gmethod=alternation(GMETHODS),
    params:
        py=PY,
        threshold=config["evaluation"]["threshold_m"],
        ns=" ".join(map(str, config["evaluation"]["recall_at"])),
        conf=lambda w: method_json(w.gmethod),
        index=lambda w, input: f"--index-dir {shlex.quote(os.path.dirname(input.index[0]))}" if input.index else "",
        summary=lambda w, input: f"--index-summary {shlex.quote(input.summary[0])}" if input.summary else "",
    log:
        log_file("results_{dataset}_{gmethod}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} results --topk {input.topk[0]:q} --out {output:q} --dataset {wildcards.dataset}"
        " --method {wildcards.gmethod} --conf {params.conf:q} --threshold {params.threshold}"
        " --ns {params.ns} {params.index} {params.summary} 2> {log:q}"


rule uncertainty:
    """Is the top-1 right? Per query of a retrieval: the top-1 L2 distance, the d1/d2 ratio, SUE
    and each re-ranking method's score of the top-1 (e.g. RANSAC inliers), with each signal's
    AUC-PR and precision-recall curves (pipeline/uncertainty.py)."""
    input:
        topk=lambda w: topk_file(w.dataset, w.gmethod),
        index=index_tables,
        reranked=lambda w: [rerank_file(w.dataset, m) for m in signal_methods(w.dataset, w.gmethod)],
    output:
        signals=uncertainty_files("{dataset}", "{gmethod}")[0],
        auc_pr=uncertainty_files("{dataset}", "{gmethod}")[1],
        plot=uncertainty_files("{dataset}", "{gmethod}")[2],
    wildcard_constraints:
        gmethod=alternation(GMETHODS),
    params:
        py=PY,
        threshold=config["evaluation"]["threshold_m"],
        reranked=lambda w: " ".join(shlex.quote(f"{m}={rerank_file(w.dataset, m)}")
                                    for m in signal_methods(w.dataset, w.gmethod)),
        index=lambda w: positions_index_arg(w.dataset),
    log:
        log_file("uncertainty_{dataset}_{gmethod}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} uncertainty --topk {input.topk:q} --reranked {params.reranked} --threshold {params.threshold}"
        " {params.index} --out {output.signals:q} --summary {output.auc_pr:q} --plot {output.plot:q}"
        " --title {wildcards.dataset}/{wildcards.gmethod} > {log:q} 2>&1"


rule published_stage1:
    """The thesis's published stage-1 files (pipeline/assets.yaml, published:) that are here or
    downloadable, evaluated beside their published Recall@N; a difference fails the job. Files
    neither here nor downloadable get a row saying how to fetch them."""
    input:
        lambda w: published_stage1_inputs(),
    output:
        published_stage1_file(),
    params:
        py=PY,
    log:
        log_file("published_stage1"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} published-recalls --out {output:q} 2> {log:q}"
