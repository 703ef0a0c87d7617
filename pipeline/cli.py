"""Command-line interface: one subcommand per pipeline stage (the Snakemake rules call these).

    python -m pipeline <command> --help
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def _json(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s[:200]}") from None


def cmd_synthetic(a):
    from .datasets.synthetic import generate

    print(json.dumps(generate(a.root, a.conf), indent=2, default=str))


def cmd_index(a):
    from .datasets.index import index_dataset

    index_dataset(a.root, a.out, a.on_bad_name, a.workers, a.positions)


def cmd_fit_global(a):
    from .extract_global import fit_global

    ex = a.conf.get("extraction", {})
    fit_global(a.conf["model"], a.root, a.table, a.out, ex.get("device", "auto"), ex.get("num_workers", 1))


def cmd_extract_global(a):
    from .datasets.index import read_table
    from .extract_global import run_extract
    from .global_store import shard_range

    names = read_table(a.table).name.tolist()
    meta = {"split": a.split, "dataset": a.dataset, "shard": a.shard, "shard_size": a.shard_size}
    if a.shard_size:
        start, stop = shard_range(len(names), a.shard_size, a.shard)
        names = names[start:stop]
        meta["rows"] = [start, stop]
    run_extract(a.conf, a.root, names, a.out, a.fit_state, meta)


def cmd_build_index(a):
    from .retrieval import build_index

    build_index(a.stores, a.out, a.index, train_size=a.train_size, nlist=a.nlist, m=a.m, nbits=a.nbits,
                chunk_size=a.chunk_size, use_gpu="auto" if a.gpu == "auto" else False)


def cmd_search(a):
    from .retrieval import search

    search(a.index, a.queries, a.out, a.k, nprobe=a.nprobe, meta=a.meta, use_gpu="auto" if a.gpu == "auto" else False,
           database=a.database, rescore=a.rescore)


def cmd_gather_global(a):
    from .gather import gather_stores

    gather_stores(a.shards, a.out, chunk_rows=a.chunk_rows)


def cmd_import_topk(a):
    from .topk import import_topk

    import_topk(a.src, a.dst, a.k)


def cmd_evaluate(a):
    from .evaluate import main as evaluate_main

    evaluate_main(a.rest)


def cmd_results(a):
    from .evaluate import evaluate_topk, format_table, index_positions, write_results
    from .topk import read_topk

    topk = read_topk(a.topk)
    positions = index_positions(a.index_dir) if a.index_dir else None
    summary = _index_summary(a)
    row = {"dataset": a.dataset, "method": a.method, **evaluate_topk(topk, a.threshold, a.ns, positions, summary)}
    # provenance: what produced these numbers
    row["index"] = topk.meta.get("index", "")
    model = a.conf.get("model", {})
    row["resize"] = json.dumps(model.get("resize")) if model else ""
    row["seed"] = model.get("seed", "") if model else ""
    row["conf"] = a.conf
    row["imported_from"] = topk.meta.get("imported_from", "")
    write_results(a.out, [row])
    print(format_table([row], a.ns))


def _index_summary(a) -> dict | None:
    """The dataset's index summary.json (``--index-summary``), for the query counts."""
    from .io import read_json

    return read_json(a.index_summary) if getattr(a, "index_summary", None) else None


def _topk_k(s: str) -> tuple[str, int]:
    path, _, k = s.rpartition(":")
    if not path or not k.isdigit():
        raise argparse.ArgumentTypeError(f"expected PATH:K, got {s!r}")
    return path, int(k)


def _resolver(a):
    from .rerank import NameResolver

    return NameResolver(a.root, a.index_dir) if a.root else (lambda n: n)


def cmd_check_weights(a):
    """Build the model of a conf on the CPU (its loader checks the checkpoint's keys and
    shapes, and refuses unsafe pickles) and write a stamp; fails naming the entry and file."""
    import time

    from .io import write_json
    from .random_weights import weight_paths

    if a.kind == "local":
        from .local_store import split_conf
        from .local_features import build_model

        conf, _ = split_conf(a.conf)
    elif a.kind == "global":
        from .global_features import build_model

        conf = a.conf
    else:
        from .matchers import build_matcher as build_model

        conf = a.conf
    paths = weight_paths(conf)
    t0 = time.perf_counter()
    try:
        build_model(conf)
    except Exception as e:
        raise ValueError(f"{a.what}: its weights ({', '.join(paths) or 'none'}) do not load: {e}") from None
    logging.getLogger("pipeline").info("%s: weights %s load (%.1f s)", a.what, paths, time.perf_counter() - t0)
    write_json(a.out, {"what": a.what, "conf": a.conf, "weights": paths, "seconds": time.perf_counter() - t0})


def cmd_extract_local(a):
    from .io import write_json
    from .extract_local import extract_local
    from .rerank import needed_images

    resolve = _resolver(a)
    names = needed_images(a.topk, resolve)
    resolve.check(names)
    info = extract_local(a.conf, a.root, names, a.base, a.device, a.num_workers)
    write_json(a.out, info)


def cmd_match(a):
    from .rerank import match_topk

    match_topk(a.features, a.conf, a.topk, a.k, a.out, _resolver(a), a.device, root=a.root, store_base=a.store_base)


def cmd_score(a):
    from .rerank import score_topk

    score_topk(a.features, a.matches, a.conf, a.topk, a.k, a.out, _resolver(a), a.meta, workers=a.workers)


def cmd_rerank_results(a):
    from .evaluate import evaluate_topk, format_table, write_results
    from .random_weights import weights_label
    from .topk import read_topk

    from .rerank import input_size

    base, rr = read_topk(a.retrieval), read_topk(a.reranked)
    meta = rr.meta
    common = {"dataset": a.dataset, "threshold_m": a.threshold}
    match_s, score_s = meta["seconds_per_query_matching"], meta["seconds_per_query_scoring"]
    extract_s = meta.get("seconds_per_query_extraction") or 0.0
    summary = _index_summary(a)
    rows = [
        {"method": meta.get("retrieval", "retrieval"), **common, **evaluate_topk(base, a.threshold, a.ns,
                                                                                 index_summary=summary),
         "rerank_k": 0, "rerank_s_per_query": 0.0},
        {"method": a.method, **common, **evaluate_topk(rr, a.threshold, a.ns, index_summary=summary),
         "rerank_k": meta["rerank_k"],
         "rerank_s_per_query": extract_s + match_s + score_s, "extract_s_per_query": extract_s,
         "match_s_per_query": match_s, "score_s_per_query": score_s,
         "weights": weights_label(a.conf),
         # the size the model described the images at (its conf's, defaults filled in)
         "input_size": input_size(a.conf.get("features"), a.conf["matcher"]) if "matcher" in a.conf else "",
         "conf": a.conf},
    ]
    write_results(a.out, rows)
    print(format_table(rows, a.ns))


def cmd_random_weights(a):
    from .random_weights import parse_name, write_random

    model, seed = parse_name(a.out) if a.model is None else (a.model, a.seed)
    print(write_random(model, a.out, seed))


def cmd_summary(a):
    from .reports.summary import write_summary

    print(json.dumps(write_summary(a.results, a.out), indent=2))


def cmd_report(a):
    from .reports.html import build_report

    build_report(a.spec, a.out)
    print(f"{a.out}/index.html")


def cmd_nightset_collect(a):
    from .nightset.collect import run_args

    print(json.dumps({k: v for k, v in run_args(a).items() if k != "failed"}, indent=2, default=str))


def cmd_nightset_filter(a):
    from .nightset.classify import main as classify_main

    if classify_main(a.rest):
        raise RuntimeError("nightset-filter failed (see the log above)")


def cmd_nightset_dedupe(a):
    from .nightset.dedupe import main as dedupe_main

    if dedupe_main(a.rest):
        raise RuntimeError("nightset-dedupe failed (see the log above)")


def cmd_nightset_verify(a):
    from .nightset.verify import stage_counts, verify

    counts = verify(a.labels, a.photos, a.db_root, a.db_index, a.out, a.threshold, stage_counts(a.build))
    print(json.dumps(counts, indent=2))


def _add_result_args(s: argparse.ArgumentParser) -> None:
    """The options of the subcommands that write a results CSV."""
    s.add_argument("--out", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--conf", type=_json, default={})
    s.add_argument("--threshold", type=float, default=25.0)
    s.add_argument("--ns", type=int, nargs="+", default=[1, 5, 10, 20, 100])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip (and list) images with more pixels than this (default 100,000,000; config max_pixels)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthetic", help="generate the built-in synthetic dataset")
    s.add_argument("--root", required=True)
    s.add_argument("--conf", type=_json, default={})
    s.set_defaults(func=cmd_synthetic)

    s = sub.add_parser("index", help="index a dataset (names, positions, readable images)")
    s.add_argument("--root", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--on-bad-name", choices=["error", "skip"], default="error")
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--positions", default=None, help="CSV of name + lat/lon (or east/north/zone)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("fit-global", help="fit a global model's codebook/PCA on the database")
    s.add_argument("--conf", type=_json, required=True, help="global method conf (JSON)")
    s.add_argument("--root", required=True)
    s.add_argument("--table", required=True, help="database index table")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_fit_global)

    s = sub.add_parser("extract-global", help="global descriptors of one shard of a split")
    s.add_argument("--conf", type=_json, required=True, help="global method conf (JSON)")
    s.add_argument("--root", required=True)
    s.add_argument("--table", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split", default="")
    s.add_argument("--dataset", default="")
    s.add_argument("--shard", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=None)
    s.add_argument("--fit-state", default=None)
    s.set_defaults(func=cmd_extract_global)

    s = sub.add_parser("build-index", help="FAISS index over the database descriptor store(s)")
    s.add_argument("--out", required=True)
    s.add_argument("--index", default="auto")
    s.add_argument("stores", nargs="+")
    s.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    s.add_argument("--m", type=int, default=None, help="PQ sub-quantizers (default dim / 8)")
    s.add_argument("--nbits", type=int, default=8)
    s.add_argument("--train-size", type=int, default=200_000)
    s.add_argument("--chunk-size", type=int, default=100_000, help="descriptors read and added at a time")
    s.add_argument("--gpu", choices=["auto", "never"], default="auto")
    s.set_defaults(func=cmd_build_index)

    s = sub.add_parser("search", help="top-k candidates of the queries")
    s.add_argument("--index", required=True)
    s.add_argument("--queries", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--k", type=int, default=100)
    s.add_argument("--nprobe", type=int, default=32)
    s.add_argument("--gpu", choices=["auto", "never"], default="auto")
    s.add_argument("--meta", type=_json, default={})
    s.add_argument("--database", nargs="+", default=None, help="the database store(s) the index was built from")
    s.add_argument("--rescore", type=int, default=0,
                   help="compressed index: re-rank RESCORE x k candidates with the exact descriptors (0: off)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("gather-global", help="gather database shard stores into one chunked store")
    s.add_argument("--out", required=True)
    s.add_argument("--chunk-rows", type=int, default=8192)
    s.add_argument("shards", nargs="+")
    s.set_defaults(func=cmd_gather_global)

    s = sub.add_parser("import-topk", help="check and store an external top-k HDF5 (thesis format)")
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--k", type=int, default=None)
    s.set_defaults(func=cmd_import_topk)

    s = sub.add_parser("check-weights", help="load a model's weights once (keys, shapes, safety) before any job")
    s.add_argument("--kind", choices=("local", "matcher", "global"), required=True)
    s.add_argument("--conf", type=_json, required=True, help="the model's conf (JSON)")
    s.add_argument("--what", required=True, help="the config entry, for messages (e.g. local_features.d2net)")
    s.add_argument("--out", required=True, help="stamp (JSON) written when the weights load")
    s.set_defaults(func=cmd_check_weights)

    s = sub.add_parser("extract-local", help="local features of the queries and their top-K candidates")
    s.add_argument("--conf", type=_json, required=True, help="extractor conf (JSON)")
    s.add_argument("--root", required=True)
    s.add_argument("--index-dir", default=None, help="index tables (to find imported top-k names)")
    s.add_argument("--topk", type=_topk_k, nargs="+", required=True, help="PATH:K top-k files and their K")
    s.add_argument("--base", required=True, help="folder for the feature stores")
    s.add_argument("--out", required=True, help="the store's index (JSON)")
    s.add_argument("--device", default="auto")
    s.add_argument("--num-workers", type=int, default=1)
    s.set_defaults(func=cmd_extract_local)

    s = sub.add_parser("match", help="match every query with its top-K candidates")
    s.add_argument("--features", default=None, help="feature store index (JSON); none for image-input matchers")
    s.add_argument("--conf", type=_json, required=True, help="matcher conf (JSON)")
    s.add_argument("--topk", required=True)
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--root", default=None)
    s.add_argument("--index-dir", default=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--store-base", default=None,
                   help="folder of the pair-keyed match stores (default: 'pairs' beside --out)")
    s.set_defaults(func=cmd_match)

    s = sub.add_parser("score", help="score matches and write the re-ranked top-k file")
    s.add_argument("--features", default=None, help="feature store index (JSON), for index matches")
    s.add_argument("--matches", required=True)
    s.add_argument("--conf", type=_json, required=True, help="scorer conf (JSON)")
    s.add_argument("--topk", required=True)
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--meta", type=_json, default={})
    s.add_argument("--root", default=None)
    s.add_argument("--index-dir", default=None)
    s.add_argument("--workers", type=int, default=1, help="processes scoring queries in parallel")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("rerank-results", help="results CSV of a re-ranking method beside its retrieval")
    s.add_argument("--retrieval", required=True, help="the retrieval top-k file")
    s.add_argument("--reranked", required=True, help="the re-ranked top-k file")
    _add_result_args(s)
    s.add_argument("--index-summary", default=None, help="the dataset's index summary.json (query counts)")
    s.set_defaults(func=cmd_rerank_results)

    s = sub.add_parser("random-weights", help="a seeded random checkpoint in a model's official format (labelled)")
    s.add_argument("--out", required=True, help="<model>_seed<N>.pth, or any name with --model/--seed")
    s.add_argument("--model", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_random_weights)

    s = sub.add_parser("summary", help="the thesis's table over results CSVs (summary.csv/.md/.html)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("results", nargs="+", help="results CSVs")
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("report", help="HTML report: tables, recall vs time / K, qualitative figures")
    s.add_argument("--spec", type=_json, required=True, help="what to report (JSON; see pipeline/reports/html.py)")
    s.add_argument("--out", required=True, help="output folder (index.html, one page per dataset)")
    s.set_defaults(func=cmd_report)

    from .nightset.collect import add_arguments as collect_arguments

    s = sub.add_parser("nightset-collect", help="night set 1/5: geotagged Flickr photos of an area")
    collect_arguments(s)
    s.set_defaults(func=cmd_nightset_collect)

    s = sub.add_parser("nightset-filter", add_help=False,
                       help="night set 2/5: outdoor + night classifiers (filter), training (train, fit)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_nightset_filter)

    s = sub.add_parser("nightset-dedupe", add_help=False, help="night set 3/5: drop near-identical shots")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_nightset_dedupe)

    from .nightset import relabel

    s = sub.add_parser("nightset-relabel", help="night set 4/5: review photo positions in a local web page")
    relabel.add_arguments(s)
    s.set_defaults(func=lambda a: relabel.run(a))

    s = sub.add_parser("nightset-verify", help="night set 5/5: queries with a database image within the threshold")
    s.add_argument("--labels", required=True, help="relabel/labels.csv (or dedup.csv: photo_id, file, lat, lon)")
    s.add_argument("--photos", required=True, help="folder the labels' 'file' column is relative to")
    s.add_argument("--db-root", required=True, help="the database's dataset root (holds database/)")
    s.add_argument("--db-index", required=True, help="its index tables (work/<dataset>/index)")
    s.add_argument("--build", required=True, help="the build folder (for the counts of earlier stages)")
    s.add_argument("--out", required=True, help="output dataset root (queries/, database link, counts.json)")
    s.add_argument("--threshold", type=float, default=25.0)
    s.set_defaults(func=cmd_nightset_verify)

    s = sub.add_parser("evaluate", help="print Recall@N of top-k files", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("results", help="write results/{dataset}/{method}.csv from a top-k file")
    s.add_argument("--topk", required=True)
    _add_result_args(s)
    s.add_argument("--index-dir", default=None, help="the dataset's index tables, for names without positions")
    s.add_argument("--index-summary", default=None, help="the dataset's index summary.json (query counts)")
    s.set_defaults(func=cmd_results)
    return p


PASSTHROUGH = ("nightset-filter", "nightset-dedupe", "evaluate")


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # pass-through subcommands: everything after the command goes to their own parser
    cut = next((i for i, x in enumerate(argv) if x in PASSTHROUGH), None)
    if cut is None:
        a = parser.parse_args(argv)
    else:
        a = parser.parse_args(argv[: cut + 1])
        a.rest = argv[cut + 1 :]
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    from .redact import install

    install()  # secrets (api_key=..., tokens) are redacted from every log line, third-party ones too
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.max_pixels is not None:
            from .images import set_max_pixels

            set_max_pixels(a.max_pixels)
        a.func(a)
    except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError) as e:
        logging.getLogger("pipeline").error("%s", e)
        _error_to_stdout(a.command, e)
        return 1
    return 0


def _error_to_stdout(command: str, err: Exception) -> None:
    """The reason a command failed, on stdout as well when stderr is not a terminal.

    Rules send stderr to the job's log on the work disk; when that disk is full, the log
    stays empty. Stdout goes to Snakemake's output (or the cluster's job output), so the
    reason still reaches the user."""
    import sys

    try:
        if not sys.stderr.isatty():
            from .redact import redact

            print(redact(f"python -m pipeline {command}: error: {err}"), flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
