"""Files the pipeline fetches: released weights and published data, as a registry.

``pipeline/assets.yaml`` lists every file: its name, the model it is for (and the conf
options it fits, e.g. LightGlue ``features: aliked``), the official URLs (release first,
then mirrors), the file name, the licence (shown before the first download of a
non-commercial file), the layout, and the size and sha256 where known.

Where a file is looked for, in order (:func:`search_dirs`):

1. the cache, ``$VG_WEIGHTS_DIR``, else ``~/.cache/vg-pipeline/weights``;
2. the folders in ``$VG_WEIGHTS_PATH`` (``:``-separated: copies a user already has);
3. ``../shared/weights`` and ``../shared/fixtures`` beside the clone (a pre-filled cache).

A file found or fetched is checked: its size and its sha256 where the registry knows them.
For a file whose sha256 the registry does not know, the first one seen is recorded in
``<cache>/lock.json`` and a later file with another sha256 is refused (a re-uploaded or
swapped release file). Fetching is :func:`pipeline.download.download`.

In a model conf, ``weights: auto`` (or ``checkpoint: auto``) means the registry's file for
that model and conf, and ``weights: <asset name>`` a named one (:func:`resolve_conf`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .download import Attempt, ChecksumError, download, mirrored, probe, sha256_file
from .io import hash_file, write_json

logger = logging.getLogger(__name__)

CACHE_ENV, PATH_ENV = "VG_WEIGHTS_DIR", "VG_WEIGHTS_PATH"
REGISTRY_FILE = Path(str(resources.files("pipeline") / "assets.yaml"))
#: the conf keys that name weight files
WEIGHT_KEYS = ("weights", "checkpoint")
AUTO = "auto"
#: ``../shared`` beside the clone (this workplace's pre-filled cache; absent on a user's machine)
SHARED = Path(__file__).resolve().parents[2] / "shared"


@dataclass(frozen=True)
class Asset:
    name: str
    file: str
    urls: tuple[str, ...]
    kind: str = "weights"  # or "data"
    model: str | None = None  # the registry name of the model it is for
    conf: dict = field(default_factory=dict)  # conf options it fits (e.g. {"features": "aliked"})
    key: str = "weights"  # the conf key naming the file (CosPlace: checkpoint)
    licence: str = ""
    non_commercial: bool = False
    layout: str = ""
    size: int | None = None
    sha256: str | None = None
    manual: str | None = None  # how to get it by hand, where that is more than the URL
    source: str = ""  # where the URLs were read
    git_sha1: str | None = None  # git blob id (a file committed to a repository): checked without a sha256
    auto: bool = True  # what ``weights: auto`` may pick (else only by name)
    unpack: str | None = None  # an archive: the model reads the folder inside it that holds this entry
    title: str = ""  # data: what it is, in words (e.g. "SF-XL test occlusion queries")
    format: str | None = None  # data: how it is checked ("topk": a top-k HDF5 in the thesis's format)
    published: dict | None = None  # data: what its authors published from it (recalls: pipeline/published.py)


def load_registry(path=None) -> dict[str, Asset]:
    """The registry (``$VG_ASSET_REGISTRY`` if set: another file in the same format)."""
    path = Path(path or os.environ.get("VG_ASSET_REGISTRY") or REGISTRY_FILE)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    out = {}
    for name, entry in raw.items():
        try:
            entry = dict(entry)
            entry["urls"] = tuple(entry.get("urls") or ())
            out[name] = Asset(name=name, **entry)
        except TypeError as e:
            raise ValueError(f"{path}: asset {name!r}: {e}") from None
    return out


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vg-pipeline" / "weights")


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    return [cache_dir(), *extra, SHARED / "weights", SHARED / "fixtures"]


def find_asset(name: str, registry: dict[str, Asset] | None = None) -> Asset:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown asset {name!r}; known: {sorted(registry)}")
    return registry[name]


def asset_for(model: str, conf: dict, registry: dict[str, Asset] | None = None) -> Asset:
    """The registry's weights for a model conf (``weights: auto``): the entry for ``model``
    whose ``conf`` options all equal the conf's (the most specific one)."""
    registry = load_registry() if registry is None else registry
    fits = [a for a in registry.values() if a.kind == "weights" and a.model == model and a.auto
            and all(conf.get(k) == v for k, v in a.conf.items())]
    if not fits:
        raise ValueError(f"weights: auto: no registered weights for {model} with {conf}; "
                         f"registered for {model}: {[a.name for a in registry.values() if a.model == model]}")
    fits.sort(key=lambda a: -len(a.conf))
    if len(fits) > 1 and len(fits[0].conf) == len(fits[1].conf):
        raise ValueError(f"weights: auto: several registered weights fit {model} with {conf}: "
                         f"{[a.name for a in fits]}; name one")
    return fits[0]


# ------------------------------------------------------------------ lock file and checks

def lock_file() -> Path:
    return cache_dir() / "lock.json"


def _read_lock() -> dict:
    f = lock_file()
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except json.JSONDecodeError:
        raise ValueError(f"{f}: not valid JSON; delete it to record the checksums again") from None


def expected_sha256(asset: Asset) -> str | None:
    """The registry's sha256, else the one recorded on first use (None: never seen)."""
    return asset.sha256 or _read_lock().get(asset.name, {}).get("sha256")


def record(asset: Asset, path: Path, digest: str) -> None:
    """Remember the sha256 of an asset the registry has none for (first use)."""
    if asset.sha256:
        return
    lock = _read_lock()
    if asset.name not in lock:
        lock[asset.name] = {"sha256": digest, "file": asset.file, "first_seen": str(path)}
        write_json(lock_file(), lock)
        logger.info("%s: sha256 %s recorded in %s", asset.name, digest, lock_file())


_verified: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, for this process


def check_file(asset: Asset, path: Path) -> str:
    """The sha256 of ``path``; a ChecksumError if it is not the asset's file (size, sha256)."""
    st = path.stat()
    if asset.size is not None and st.st_size != asset.size:
        raise ChecksumError(f"{path}: {st.st_size} bytes, but {asset.name} ({asset.file}) has {asset.size}")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _verified.get(key) or sha256_file(path)
    want = expected_sha256(asset)
    if want and digest != want:
        where = "the registry" if asset.sha256 else f"recorded in {lock_file()} on first use"
        raise ChecksumError(f"{path}: sha256 {digest} is not {asset.name}'s ({want}, {where}); "
                            "the file is damaged or another file")
    if not asset.sha256 and asset.git_sha1 and key not in _verified and git_blob_sha1(path) != asset.git_sha1:
        raise ChecksumError(f"{path}: its git blob id is not {asset.name}'s ({asset.git_sha1}, from its authors' "
                            "repository); the file is damaged or another file")
    _verified[key] = digest
    return digest


def git_blob_sha1(path) -> str:
    """The id git gives the file's content (``git hash-object``)."""
    return hash_file(path, "sha1", f"blob {Path(path).stat().st_size}\0".encode())


def unpacked(asset: Asset, archive: Path) -> Path:
    """For an archive asset: the folder the model reads (the one holding an entry named
    ``asset.unpack``, e.g. a SavedModel's ``variables``), extracted once beside the archive
    (atomically: a partial extraction is never used)."""
    import shutil
    import tarfile
    import zipfile

    root = archive.parent / f"{asset.name}.unpacked"
    if not root.is_dir():
        tmp = archive.parent / f".{asset.name}.unpacking"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(archive) as t:
                    t.extractall(tmp, filter="data")  # no absolute paths, links out or devices
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ChecksumError(f"{archive}: cannot be unpacked ({e})") from None
        os.replace(tmp, root)
    found = sorted(root.rglob(asset.unpack))
    if not found:
        raise ChecksumError(f"{archive}: no {asset.unpack!r} inside (not {asset.name}'s archive?)")
    return found[0].parent


def locate(asset: Asset, remember: bool = True) -> Path | None:
    """A verified local copy of ``asset`` in :func:`search_dirs`, or None. A copy that fails
    the check is skipped with a warning (another folder may hold a good one). ``remember``:
    record a first-seen sha256 in the lock file."""
    for folder in search_dirs():
        path = folder / asset.file
        if path.is_file():
            try:
                digest = check_file(asset, path)
                if remember:
                    record(asset, path, digest)
                return unpacked(asset, path) if asset.unpack else path
            except ChecksumError as e:
                logger.warning("skipping %s", e)
    return None


def licence_notice(asset: Asset) -> str:
    return (f"{asset.name} ({asset.file}) is released under {asset.licence or 'its authors licence'}"
            + (": NON-COMMERCIAL use only" if asset.non_commercial else "") + f" ({asset.source or asset.urls[0]})")


def fetch(asset: Asset, progress: bool = True, dest: Path | None = None, accept=None) -> Path:
    """A verified local copy of ``asset``: found (:func:`locate`), else downloaded into the cache.

    ``accept(path)``: a further check of a downloaded file (its model's loader); when it
    raises, the file is deleted and its checksum not recorded.
    """
    if dest is None:
        found = locate(asset)
        if found is not None:
            return found
    dest = Path(dest) if dest is not None else cache_dir() / asset.file
    if not asset.urls:
        raise FileNotFoundError(f"{asset.name}: no URL is known; put {asset.file} at {dest} "
                                f"({asset.manual or 'see README, Weights'})")
    if asset.non_commercial:
        logger.warning("%s", licence_notice(asset))
    else:
        logger.info("%s", licence_notice(asset))
    result = download(list(asset.urls), dest, sha256=expected_sha256(asset), size=asset.size, progress=progress,
                      manual=asset.manual)
    if asset.git_sha1 and not expected_sha256(asset) and git_blob_sha1(dest) != asset.git_sha1:
        dest.unlink()
        raise ChecksumError(f"{dest.name} from {result.url}: its git blob id is not {asset.git_sha1} "
                            f"({asset.name}'s in its authors' repository); deleted")
    target = unpacked(asset, dest) if asset.unpack else dest
    if accept is not None:
        try:
            accept(target)
        except Exception:
            dest.unlink()
            raise
    record(asset, dest, result.sha256)
    st = dest.stat()  # hashed while downloading: check_file need not read it again
    _verified[(str(dest.resolve()), st.st_size, st.st_mtime_ns)] = result.sha256
    return target


# ------------------------------------------------------------------ confs

def weight_paths(conf) -> list[str]:
    """Every weights/checkpoint path a (nested) conf names."""
    out = []
    if isinstance(conf, dict):
        for key, value in conf.items():
            if key in WEIGHT_KEYS and isinstance(value, str):
                out.append(value)
            else:
                out += weight_paths(value)
    elif isinstance(conf, list):
        for value in conf:
            out += weight_paths(value)
    return out



def asset_of_value(value, conf: dict, registry: dict[str, Asset] | None = None) -> Asset | None:
    """The asset a conf's weight value names (``auto``: the one for the conf's model and
    options; an asset name), or None for a path."""
    registry = load_registry() if registry is None else registry
    if value == AUTO:
        return asset_for(conf.get("name"), conf, registry)
    if isinstance(value, str) and value in registry:
        return registry[value]
    return None


def _walk(conf, fill, registry, on_asset):
    """Rebuild a (nested) conf, passing each asset-named weight value to ``on_asset``."""
    if isinstance(conf, list):
        return [_walk(v, fill, registry, on_asset) for v in conf]
    if not isinstance(conf, dict):
        return conf
    named = [k for k in WEIGHT_KEYS if isinstance(conf.get(k), str) and (conf[k] == AUTO or conf[k] in registry)]
    full = fill(conf) if named and fill and "name" in conf else conf
    out = {}
    for key, value in conf.items():
        if key in named:
            value = on_asset(asset_of_value(value, full, registry))
        elif isinstance(value, (dict, list)):
            value = _walk(value, fill, registry, on_asset)
        out[key] = value
    return out


def conf_assets(conf, fill=None, registry: dict[str, Asset] | None = None) -> list[Asset]:
    """Every asset a (nested) model conf names through ``auto`` or an asset name. ``fill``:
    conf -> the conf with its model's defaults (so ``auto`` matches on them too)."""
    registry = load_registry() if registry is None else registry
    found: list[Asset] = []
    _walk(conf, fill, registry, lambda a: found.append(a) or a.name)
    return found


def resolve_conf(conf, paths: dict[str, str] | None = None, fetch_missing: bool = False, fill=None,
                 registry: dict[str, Asset] | None = None):
    """``conf`` with every ``auto`` / asset-name weight value replaced by a file path.

    ``paths``: asset name -> path to use (the workflow's choice); otherwise a verified local
    copy, or (``fetch_missing``) a download, or the cache path where it will be.
    """
    registry = load_registry() if registry is None else registry

    def path_of(a: Asset) -> str:
        if paths and a.name in paths:
            return paths[a.name]
        found = locate(a)
        if found is not None:
            return str(found)
        return str(fetch(a) if fetch_missing else cache_dir() / a.file)

    return _walk(conf, fill, registry, path_of)


def names_assets(conf) -> bool:
    """Whether a conf's own weight keys say ``auto`` or an asset name (cheap: no registry read
    unless a weight value is a bare name)."""
    values = [conf.get(k) for k in WEIGHT_KEYS if isinstance(conf, dict) and isinstance(conf.get(k), str)]
    return any(v == AUTO or ("/" not in v and "." not in v and v in load_registry()) for v in values)


def describe_file(path) -> str:
    """``<file name> sha256:<first 12>`` of a weights file (or folder: its files' hashes)."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
        return f"{path.name}/ sha256:{h.hexdigest()[:12]}"
    return f"{path.name} sha256:{sha256_file(path)[:12]}"




# ------------------------------------------------------------------ what a run needs

_probed: dict[tuple, tuple[str | None, tuple[Attempt, ...]]] = {}  # (name, URLs) -> probe, for this process


def availability(assets, timeout: float = 10.0) -> dict[str, tuple[str | None, tuple[Attempt, ...]]]:
    """For each asset with no verified local copy: ``(url, attempts)``, the URL that answers
    (mirror first, see :func:`pipeline.download.mirrored`) or None, and every failure.
    Probed in parallel, once per process. Assets here are left out."""
    from concurrent.futures import ThreadPoolExecutor

    def key(a):
        return a.name, tuple(mirrored(list(a.urls)))

    todo = {key(a): a for a in assets if key(a) not in _probed and locate(a, remember=False) is None}
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            found = dict(zip(todo, pool.map(lambda a: probe(list(a.urls), timeout=timeout), todo.values())))
        for k, (url, attempts) in found.items():
            _probed[k] = (url, tuple(attempts))
    return {a.name: _probed[key(a)] for a in assets if key(a) in _probed}


def unavailable(assets, timeout: float = 10.0) -> list[tuple[Asset, tuple[Attempt, ...]]]:
    """The assets that are neither here nor downloadable now, each with its failed URLs."""
    probed = availability(assets, timeout)
    seen, out = set(), []
    for a in assets:
        if a.name in probed and probed[a.name][0] is None and a.name not in seen:
            seen.add(a.name)
            out.append((a, probed[a.name][1]))
    return out


def size_text(asset: Asset) -> str:
    return f"{asset.size / 1e6:.1f} MB" if asset.size else "size unknown"


def missing_message(missing: list[tuple[Asset, tuple[Attempt, ...]]]) -> str:
    """One message for files that are neither here nor downloadable: each file, the URLs
    tried (and why they failed) and where to put it by hand."""
    lines = [f"{len(missing)} file(s) needed are not here and cannot be downloaded now (no network, or a dead link):"]
    for a, attempts in missing:
        lines.append(f"  {a.file}  ({a.name}: {a.title or a.model or a.kind}, {size_text(a)}, {a.licence or 'licence unknown'})")
        for at in attempts or [Attempt(u, "not tried") for u in mirrored(list(a.urls))]:
            lines.append(f"      {at.url}: {at.error}")
        if not a.urls:
            lines.append("      no URL is known")
        lines.append(f"    put it at {cache_dir() / a.file}" + (f" ({a.manual})" if a.manual else "")
                     + (f", sha256 {a.sha256}" if a.sha256 else ""))
    looked = [d for i, d in enumerate(search_dirs()) if i == 0 or d.is_dir()]  # the cache, and folders that exist
    lines.append(f"Looked in: {', '.join(str(d) for d in looked)} "
                 f"(the cache is ${CACHE_ENV}; ${PATH_ENV} adds folders of copies you have).")
    return "\n".join(lines)
