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
        # methods whose registered weights (weights: auto) have no local copy yet are built
        # when asked for by name (they download first); methods run with random checkpoints
        # (weights under work_dir/random_weights) too: their recalls mean nothing
        all_results(),
        [results_file(d, m) for d in DATASETS for m in RERANK if in_default_target(d, m)],
