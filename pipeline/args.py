"""Argument types shared by the stages' command lines (``COMMANDS`` in each stage module)."""

from __future__ import annotations

import argparse
import json


def json_arg(s: str):
    """A JSON value given on the command line (confs, metadata)."""
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s[:200]}") from None


def topk_k_arg(s: str) -> tuple[str, int]:
    """``PATH:K``: a top-k file and how many of its candidates are used."""
    path, _, k = s.rpartition(":")
    if not path or not k.isdigit():
        raise argparse.ArgumentTypeError(f"expected PATH:K, got {s!r}")
    return path, int(k)


def add_result_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the commands that write a results CSV."""
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--conf", type=json_arg, default={})
    p.add_argument("--threshold", type=float, default=25.0)
    p.add_argument("--ns", type=int, nargs="+", default=[1, 5, 10, 20, 100])
    p.add_argument("--index-summary", default=None, help="the dataset's index summary.json (query counts)")
