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
include: "workflow/rules/assets.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/global.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/rerank.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/nightset.smk"


rule all:
    default_target: True
    input:
        # default_target in config.yaml: the methods (their weights and data fetched first: the
        # run stops before any job when a file is neither here nor downloadable, naming each)
        # and results/thesis/stage1.csv; anything else is built when asked for by name
        lambda w: default_target(),
