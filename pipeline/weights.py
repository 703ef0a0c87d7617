"""Weights as a stage: registered files fetched and verified, configured ones checked.

- :func:`fetch_weights` gives a verified local copy of a registered file
  (:mod:`pipeline.assets`: found in the cache or ``../shared``, else downloaded), and
  accepts it only if the project's own loader loads it into its model (keys, shapes,
  pickle safety) -- a file of another model fails naming the file;
- :func:`check_weights` builds the model of a configured conf on the CPU and writes a
  stamp, so a file that does not load fails first, naming the config entry and the
  file, instead of in the middle of extraction.

``python -m pipeline weights list | fetch NAME... | verify PATH --asset NAME`` does the
same by hand.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .args import json_arg
from .assets import Asset, check_file, describe_file, fetch, find_asset, load_registry, locate, record, weight_paths
from .io import write_json

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


def model_registry(name: str):
    """The registry (global, local, matcher) that has a model called ``name``."""
    from .global_features import REGISTRY as GLOBAL
    from .local_features import REGISTRY as LOCAL
    from .matchers import REGISTRY as MATCHERS

    for registry in (LOCAL, MATCHERS, GLOBAL):
        if name in registry.models:
            return registry
    raise ValueError(f"no model called {name!r} in any registry")


def full_model_conf(conf: dict) -> dict:
    """A model conf with its class's defaults (what ``weights: auto`` matches on)."""
    if conf.get("name") is None:
        return conf
    if "store" in conf:
        from .local_store import split_conf

        conf = split_conf(conf)[0]
    return model_registry(conf["name"]).full_conf(conf)


def load_check(asset: Asset, path) -> float:
    """Build ``asset``'s model from ``path`` on the CPU (the loader checks keys and shapes), or
    read a data file as its format says (a top-k file: its names carry positions); seconds
    taken. A ValueError names the file when it does not load."""
    if asset.kind == "data":
        t0 = time.perf_counter()
        if asset.format == "topk":
            from .topk import read_external_topk

            try:
                read_external_topk(path)
            except Exception as e:
                raise ValueError(f"{path}: not {asset.name}'s top-k file: {e}") from None
        return time.perf_counter() - t0
    if asset.model is None:
        return 0.0
    conf = {"name": asset.model, **asset.conf, asset.key: str(path)}
    t0 = time.perf_counter()
    try:
        model_registry(asset.model).build(conf)
    except Exception as e:
        raise ValueError(f"{path}: not {asset.name}'s weights: the {asset.model} loader says: {e}") from None
    return time.perf_counter() - t0


def fetch_weights(name: str, progress: bool = True) -> dict:
    """A verified local copy of the registered file ``name`` (found or downloaded; checked by
    checksum and by its model's loader)."""
    asset = find_asset(name)
    loaded: dict[str, float] = {}  # a download is load-checked before it is accepted: not twice

    def accept(p):
        loaded["seconds"] = load_check(asset, p)

    path = fetch(asset, progress=progress, accept=accept)
    # an unpacked archive: the archive was checked; the folder is identified by its files
    digest = check_file(asset, path) if path.is_file() else describe_file(path).split("sha256:")[1]
    seconds = loaded["seconds"] if loaded else load_check(asset, path)
    return {"asset": name, "path": str(path), "sha256": digest, "load_seconds": seconds}


def verify_file(path, name: str) -> dict:
    """Whether ``path`` is the registered file ``name``: its size and sha256 (the registry's,
    or the one recorded on first use), and its model's loader."""
    asset = find_asset(name)
    digest = check_file(asset, Path(path))
    load_check(asset, path)
    record(asset, Path(path), digest)
    return {"asset": name, "path": str(path), "sha256": digest}


def _list(a):
    rows = []
    for asset in load_registry().values():
        if a.kind and asset.kind != a.kind:
            continue
        here = locate(asset, remember=False) if a.check else None
        rows.append((asset.name, asset.model or (f"data: {asset.format}" if asset.format else "-"), asset.file, f"{asset.size / 1e6:.1f} MB" if asset.size else "?",
                     ("NON-COMMERCIAL: " if asset.non_commercial else "") + asset.licence[:40],
                     str(here) if here else ("missing" if a.check else "-")))
    widths = [max(len(r[i]) for r in rows + [("name", "model", "file", "size", "licence", "local copy")])
              for i in range(6)]
    for r in [("name", "model", "file", "size", "licence", "local copy")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _weights_arguments(p):
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("list", help="the registered files and where a local copy is")
    s.add_argument("--kind", choices=("weights", "data"), default=None)
    s.add_argument("--no-check", dest="check", action="store_false", help="do not look for (and hash) local copies")
    s = sub.add_parser("fetch", help="a verified local copy of registered files (downloaded if needed)")
    s.add_argument("names", nargs="+")
    s.add_argument("--stamp", default=None, help="write what was fetched here (JSON; for the workflow)")
    s.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("verify", help="check a file against the registry (checksum) and its model's loader")
    s.add_argument("path")
    s.add_argument("--asset", required=True, help="the registered name it should be")


def _weights(a):
    if a.action == "list":
        return _list(a)
    if a.action == "fetch":
        done = [fetch_weights(n, progress=not a.no_progress) for n in a.names]
        for d in done:
            print(f"{d['asset']}: {d['path']} (sha256 {d['sha256']})")
        if a.stamp:
            write_json(a.stamp, done)
        return None
    d = verify_file(a.path, a.asset)
    print(f"{d['path']}: {d['asset']}, sha256 {d['sha256']}, loads")
    return None


def _arguments(p):
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--conf", type=json_arg, required=True, help="the model's conf (JSON)")
    p.add_argument("--what", required=True, help="the config entry, for messages (e.g. local_features.d2net)")
    p.add_argument("--out", required=True, help="stamp (JSON) written when the weights load")


def _run(a):
    check_weights(a.kind, a.conf, a.what, a.out)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"check-weights": (_arguments, _run), "weights": (_weights_arguments, _weights),
            "assets": (_weights_arguments, _weights)}
