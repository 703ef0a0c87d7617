"""The weights check stage: each configured model's weights load before any job uses them.

:func:`check_weights` builds the model of a conf on the CPU (its loader checks the
checkpoint's keys and shapes, and refuses pickles that hold more than weights unless the
conf says ``trust: true``) and writes a stamp; a file that does not load fails here,
naming the config entry and the file, instead of in the middle of extraction.
"""

from __future__ import annotations

import logging
import time

from .args import json_arg
from .io import write_json
from .random_weights import weight_paths

logger = logging.getLogger(__name__)
KINDS = ("local", "matcher", "global")


def check_weights(kind: str, conf: dict, what: str, out) -> dict:
    """Load the weights of a ``kind`` model conf (``what``: its config entry, for messages);
    write the stamp ``out`` (JSON) and return it."""
    if kind == "local":
        from .local_features import build_model
        from .local_store import split_conf

        conf_model, _ = split_conf(conf)
    elif kind == "global":
        from .global_features import build_model

        conf_model = conf
    elif kind == "matcher":
        from .matchers import build_matcher as build_model

        conf_model = conf
    else:
        raise ValueError(f"check-weights: kind must be one of {KINDS}, not {kind!r}")
    paths = weight_paths(conf_model)
    t0 = time.perf_counter()
    try:
        build_model(conf_model)
    except Exception as e:
        raise ValueError(f"{what}: its weights ({', '.join(paths) or 'none'}) do not load: {e}") from None
    seconds = time.perf_counter() - t0
    logger.info("%s: weights %s load (%.1f s)", what, paths, seconds)
    stamp = {"what": what, "conf": conf, "weights": paths, "seconds": seconds}
    write_json(out, stamp)
    return stamp


def _arguments(p):
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--conf", type=json_arg, required=True, help="the model's conf (JSON)")
    p.add_argument("--what", required=True, help="the config entry, for messages (e.g. local_features.d2net)")
    p.add_argument("--out", required=True, help="stamp (JSON) written when the weights load")


def _run(a):
    check_weights(a.kind, a.conf, a.what, a.out)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"check-weights": (_arguments, _run)}
