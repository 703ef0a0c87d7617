"""Command line: ``python -m pipeline <command> ...``, one command per stage (the rules call these).

Each command belongs to the stage module that does the work: the module's ``COMMANDS``
maps the command to ``(add_arguments, run)`` (or to a ``main(argv)`` that parses its
own arguments). This file is only the table below, the options every command shares,
and the error handling; a command imports only its own module.

    python -m pipeline --help            # the commands
    python -m pipeline <command> --help  # one command's options
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command -> (stage module, one-line help)
COMMANDS = {
    "synthetic": ("datasets.synthetic", "generate the built-in synthetic dataset"),
    "index": ("datasets.index", "index a dataset (names, positions, readable images)"),
    "fit-global": ("extract_global", "fit a global model's codebook/PCA on the database"),
    "extract-global": ("extract_global", "global descriptors of one shard of a split"),
    "gather-global": ("gather", "gather database shard stores into one chunked store"),
    "build-index": ("retrieval", "FAISS index over the database descriptor store(s)"),
    "search": ("retrieval", "top-k candidates of the queries"),
    "import-topk": ("topk", "check and store an external top-k HDF5 (thesis format)"),
    "evaluate": ("evaluate", "print Recall@N of top-k files"),
    "results": ("evaluate", "write results/{dataset}/{method}.csv from a top-k file"),
    "check-weights": ("weights", "load a model's weights once (keys, shapes, safety) before any job"),
    "weights": ("weights", "registered weights and data: list, fetch (download + verify), verify a file"),
    "assets": ("weights", "the same as weights (registered weights and published data)"),
    "published-recalls": ("published", "our Recall@N of published top-k files beside their authors' numbers"),
    "extract-local": ("extract_local", "local features of the queries and their top-K candidates"),
    "match": ("rerank", "match every query with its top-K candidates"),
    "score": ("rerank", "score matches and write the re-ranked top-k file"),
    "rerank-results": ("evaluate", "results CSV of a re-ranking method beside its retrieval"),
    "uncertainty": ("uncertainty", "per-query confidence signals of a retrieval and their AUC-PR (is the top-1 right?)"),
    "gate": ("uncertainty", "the queries a confidence gate sends to re-ranking, as a top-k file"),
    "gate-fit": ("uncertainty", "a gate threshold learnt on one dataset (logistic model of a right top-1)"),
    "random-weights": ("random_weights", "a seeded random checkpoint in a model's official format (labelled)"),
    "summary": ("reports.summary", "the thesis's table over results CSVs (summary.csv/.md/.html)"),
    "report": ("reports.html", "HTML report: tables, recall vs time / K, qualitative figures"),
    "nightset-collect": ("nightset.collect", "night set 1/5: geotagged Flickr photos of an area"),
    "nightset-filter": ("nightset.classify", "night set 2/5: outdoor + night classifiers (filter, train, fit)"),
    "nightset-dedupe": ("nightset.dedupe", "night set 3/5: drop near-identical shots"),
    "nightset-relabel": ("nightset.relabel", "night set 4/5: review photo positions in a local web page"),
    "nightset-verify": ("nightset.verify", "night set 5/5: queries with a database image within the threshold"),
}


def build_parser() -> argparse.ArgumentParser:
    """The options every command shares, then the command and its own arguments."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<18}{text}" for name, (_, text) in COMMANDS.items()))
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip (and list) images with more pixels than this (default 100,000,000; config max_pixels)")
    p.add_argument("command", choices=COMMANDS, metavar="command", help="one of the commands below")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the command's arguments (<command> --help)")
    return p


def command(name: str):
    """``(add_arguments, run)`` or ``main(argv)`` of a command, from its stage module."""
    module = importlib.import_module(f"pipeline.{COMMANDS[name][0]}")
    return module.COMMANDS[name]


def run_command(name: str, argv: list[str]) -> int | None:
    entry = command(name)
    if callable(entry):  # parses its own arguments
        return entry(argv)
    add_arguments, run = entry
    sub = argparse.ArgumentParser(prog=f"python -m pipeline {name}", description=COMMANDS[name][1])
    add_arguments(sub)
    return run(sub.parse_args(argv))


def main(argv=None) -> int:
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .redact import install

    install()  # secrets (api_key=..., tokens) are redacted from every log line, third-party ones too
    try:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        if a.max_pixels is not None:
            from .images import set_max_pixels

            set_max_pixels(a.max_pixels)
        code = run_command(a.command, a.rest)
    except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError) as e:
        logging.getLogger("pipeline").error("%s", e)
        _error_to_stdout(a.command, e)
        return 1
    if code:  # a command's own main reports its errors and returns non-zero
        _error_to_stdout(a.command, f"failed (exit status {code}; see the log above)")
        return 1
    return 0


def _error_to_stdout(command: str, err) -> None:
    """The reason a command failed, on stdout as well when stderr is not a terminal.

    Rules send stderr to the job's log on the work disk; when that disk is full, the log
    stays empty. Stdout goes to Snakemake's output (or the cluster's job output), so the
    reason still reaches the user."""
    try:
        if not sys.stderr.isatty():
            from .redact import redact

            print(redact(f"python -m pipeline {command}: error: {err}"), flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
