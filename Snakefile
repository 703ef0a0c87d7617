# VG re-ranking pipeline. Usage:
#   snakemake --cores 2                                  # everything config.yaml describes
#   snakemake --cores 8 results/{dataset}/{method}.csv   # one results table
#   snakemake --cores 2 reports                          # results/report/index.html
# Every stage is materialised under work_dir; see README.md.

from snakemake.utils import min_version, validate

min_version("8.0")

configfile: "config.yaml"


validate(config, "pipeline/schemas/config.schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/global.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/rerank.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/nightset.smk"


rule all:
    default_target: True
    input:
        all_results(),
        # methods run with random checkpoints (weights under work_dir/random_weights) are
        # built only when asked for by name: their recalls mean nothing
        [results_file(d, m) for d in DATASETS for m in RERANK if rerank_available(d, m)
         and not method_random_weights(m)],
