"""Command lines of the synthetic dataset.

``main``: ``python3 -m pipeline.datasets.synthetic --root ... [--seed ...]`` (conf keys
as options); ``COMMANDS``: ``python -m pipeline synthetic --root ... --conf JSON``
(the Snakemake rule's command, see :mod:`pipeline.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ...args import json_arg
from .dataset import generate


def main(argv=None) -> int:
    # the package docstring's first line describes the command
    from . import __doc__ as package_doc

    p = argparse.ArgumentParser(prog="python3 -m pipeline.datasets.synthetic", description=package_doc.split("\n")[0])
    p.add_argument("--root", required=True, help="output folder (created atomically)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-queries", type=int)
    p.add_argument("--n-streets", type=int)
    p.add_argument("--street-length", type=float, help="metres")
    p.add_argument("--db-spacing", type=float, help="metres between database positions")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"))
    p.add_argument("--conf", help="JSON object with further conf keys (see DEFAULT_CONF)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conf = json.loads(args.conf) if args.conf else {}
    for key in ("seed", "n_queries", "n_streets", "street_length", "db_spacing", "image_size"):
        val = getattr(args, key)
        if val is not None:
            conf[key] = list(val) if isinstance(val, (list, tuple)) else val
    try:
        summary = generate(args.root, conf)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {k: summary[k] for k in ("root", "created", "counts", "max_query_to_db_m", "seconds") if k in summary}
    out["conf"] = summary["conf"]
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _synthetic_arguments(p):
    p.add_argument("--root", required=True)
    p.add_argument("--conf", type=json_arg, default={})


def _synthetic(a):
    print(json.dumps(generate(a.root, a.conf), indent=2, default=str))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"synthetic": (_synthetic_arguments, _synthetic)}
