"""Conf dicts: defaults merged with a user's options, and the hash that names a store.

Every model, matcher, scorer and stage with options goes through :func:`merge_conf`
(unknown keys are an error naming where they were found; numeric options are
range-checked by :func:`pipeline.conf_checks.check_values`), and every store whose
content depends on a conf is named or signed with :func:`conf_hash`.
"""

from __future__ import annotations

import copy
import hashlib
import json

from .conf_checks import check_values
from .io import hash_file


def merge_conf(default: dict, conf: dict | None, where: str, check: bool = True) -> dict:
    """Return ``default`` updated with ``conf``; unknown keys are an error naming ``where``.

    Nested dicts merge key by key. ``check``: range-check the known numeric options
    (:mod:`pipeline.conf_checks`).
    """
    out = copy.deepcopy(default)
    for key, value in (conf or {}).items():
        if key not in out:
            raise ValueError(f"{where}: unknown option {key!r}; valid options are {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_conf(out[key], value, f"{where}.{key}", check)
        else:
            out[key] = copy.deepcopy(value)
    if check:
        check_values(out, where)
    return out


def conf_hash(conf) -> str:
    """12 hex digits identifying ``conf`` (any JSON-able value; keys sorted)."""
    return hashlib.sha1(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_hash(path) -> str:
    """12 hex digits identifying a file's bytes."""
    return hash_file(path, "sha1")[:12]
