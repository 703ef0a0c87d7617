# Registered files (pipeline/assets.yaml): released weights and published data, each found
# locally (cache, ../shared) or downloaded once, verified, and recorded under work_dir.


rule fetch_weights:
    """A registered weights file (pipeline/assets.yaml) found locally or downloaded, verified by
    checksum and by its model's loader; first of all jobs (priority), so a dead link or no
    network fails the run before any extraction, naming every URL and the manual step."""
    output:
        weights_fetch_file("{asset}"),
    params:
        py=PY,
        progress=lambda w: "" if sys.stderr.isatty() else "--no-progress",
    priority: 100
    log:
        log_file("fetch_weights_{asset}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} weights fetch {wildcards.asset} --stamp {output:q} {params.progress} 2> {log:q}"


rule fetch_data:
    """A registered data file (a published top-k file) found locally or downloaded, verified by
    checksum and read as its format says; first of all jobs, like fetch_weights."""
    output:
        data_fetch_file("{asset}"),
    params:
        py=PY,
        progress=lambda w: "" if sys.stderr.isatty() else "--no-progress",
    priority: 100
    log:
        log_file("fetch_data_{asset}"),
    conda:
        CONDA_ENV
    shell:
        "{params.py} assets fetch {wildcards.asset} --stamp {output:q} {params.progress} 2> {log:q}"
