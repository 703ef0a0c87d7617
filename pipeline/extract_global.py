"""Global-descriptor extraction into chunked, resumable Zarr stores.

One store holds one shard of one split (a contiguous range of rows of the split's
index table). Extraction

- reads images with a DataLoader (decoding overlaps the model's work), batches
  them, and writes descriptors chunk by chunk into ``<out>.partial`` (a Zarr
  group: ``descriptors [n, D]``, ``valid [n]``);
- marks each finished chunk in ``<out>.progress/``; a killed run resumes from the
  first unfinished chunk and never recomputes a finished one;
- records unreadable images (``valid = False``, reason in the attributes) instead
  of failing the whole shard;
- renames ``<out>.partial`` to ``<out>`` only when every chunk is done, so the
  final name always holds a complete store.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from .args import json_arg
from .conf import conf_hash, file_hash
from .datasets.index import read_table
from .global_features import build_model
from .global_store import STORE_VERSION, open_partial_store, shard_range, write_names
from .gpus import autocast_context, pick_device
from .images import to_float
from .io import atomic_path
from .loader import Batch, image_loader

logger = logging.getLogger(__name__)


def load_model(model_conf: dict, fit_state: str | Path | None, device: torch.device):
    model = build_model(model_conf)
    if model.needs_fit:
        if fit_state is None:
            raise ValueError(f"global model {model_conf['name']!r} must be fitted: pass its fit state file")
        model.load_fit(torch.load(fit_state, map_location="cpu", weights_only=True))
    return model.eval().to(device)


@torch.inference_mode()
def describe_batch(model, batch: Batch, device, autocast: str | None = None):
    """Start describing one loader batch's readable images (under ``autocast``, see
    :data:`pipeline.gpus.AUTOCAST`).

    Returns a callable giving the descriptors ``[len(batch.idx), D]`` as numpy. On a
    GPU the result is copied back asynchronously, so the next batch can be loaded
    and launched before this one is collected.
    """
    if batch.images is None:
        return lambda: None
    with autocast_context(autocast, device):
        if isinstance(batch.images, torch.Tensor):
            desc = model(to_float(batch.images.to(device, non_blocking=True)))
        else:  # images of different sizes: one at a time
            desc = torch.cat([model(to_float(t[None].to(device))) for t in batch.images])
    desc = desc.float()
    if device.type != "cuda":
        out = desc.float().numpy()
        return lambda: out
    host = torch.empty(desc.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(desc, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def collect():
        done.synchronize()
        return host.numpy()

    return collect


def describe_stream(model, loader, device, autocast: str | None = None):
    """Yield ``(batch, descriptors)`` in order, one batch in flight ahead."""
    pending = None
    for batch in loader:
        result = describe_batch(model, batch, device, autocast)
        if pending is not None:
            yield pending[0], pending[1]()
        pending = (batch, result)
    if pending is not None:
        yield pending[0], pending[1]()


def extract_global(
    model_conf: dict,
    root: str | Path,
    names: list[str],
    out: str | Path,
    fit_state: str | Path | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    chunk_size: int = 1024,
    device: str = "auto",
    dtype: str = "float32",
    meta: dict | None = None,
    autocast: str | None = None,
) -> dict:
    """Describe ``names`` (relative to ``root``) into the Zarr store ``out``.

    ``autocast``: ``bfloat16`` / ``float16`` run the model under ``torch.autocast``
    (faster on GPUs with tensor cores; recalls checked against float32 in
    ``tests/test_extract_global_autocast.py`` and ``benchmarks/global_extraction.py``).
    """
    out = Path(out)
    autocast = None if autocast == "float32" else autocast
    batch_size = max(1, min(batch_size, chunk_size))
    if out.exists():
        logger.info("%s exists: nothing to do", out)
        return dict(zarr.open_group(str(out), mode="r").attrs)
    partial = out.with_name(out.name + ".partial")
    progress = out.with_name(out.name + ".progress")
    dev = pick_device(device)
    autocast_context(autocast, dev)  # an unknown or unsupported option fails before any work
    model = load_model(model_conf, fit_state, dev)
    n, dim = len(names), model.dim
    n_chunks = max(1, -(-n // chunk_size))
    signature = {
        "version": STORE_VERSION, "model": {k: v for k, v in model_conf.items() if k != "trust"}, "n": n, "dim": dim, "chunk_size": chunk_size,
        "dtype": dtype, "names_hash": conf_hash(names),
        "fit_state_hash": file_hash(fit_state) if fit_state else None,
    }
    if autocast:  # float32 stores keep their signature (and resume) as before
        signature["autocast"] = autocast
    group = open_partial_store(partial, progress, signature, n, dim, dtype, chunk_size)
    if "names" not in group:  # a partial store started before names were kept as an array
        write_names(group, names, max(chunk_size, 65536))
    desc_arr, valid_arr = group["descriptors"], group["valid"]
    done = {int(p.name.split("_")[1]) for p in progress.glob("chunk_*")}
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        logger.info("%s: resuming, %d of %d chunks already done", out, len(done), n_chunks)
    errors: dict[str, str] = json.loads((progress / "errors.json").read_text()) if (progress / "errors.json").exists() else {}
    todo_idx = [i for c in todo for i in range(c * chunk_size, min(n, (c + 1) * chunk_size))]
    loader = image_loader(
        # the model's own test resolution unless the conf sets one (model.conf: defaults filled in)
        root, [names[i] for i in todo_idx], model.conf.get("resize"), batch_size, num_workers,
        pin_memory=dev.type == "cuda",
    )
    # the buffer holds the current chunk plus the start of the next (a batch can straddle them)
    buf_desc = np.zeros((chunk_size + batch_size, dim), np.float32)
    buf_valid = np.zeros(chunk_size + batch_size, bool)
    chunk_pos = 0  # index in `todo` of the chunk being filled
    base = 0  # position in `todo_idx` of that chunk's first image
    filled = 0
    t0 = time.time()
    bar = tqdm(total=len(todo_idx), desc=f"describe {out.name}", mininterval=2, unit="img")
    for batch, desc in describe_stream(model, loader, dev, autocast):
        for j, err in batch.errors:
            errors[names[todo_idx[j]]] = err
            logger.warning("skipped (marked invalid): %s", err)
        for k, j in enumerate(batch.idx):
            buf_desc[j - base], buf_valid[j - base] = desc[k], True
        filled += batch.size
        bar.update(batch.size)
        # flush every chunk that is now complete
        while chunk_pos < len(todo):
            c = todo[chunk_pos]
            size = min(n, (c + 1) * chunk_size) - c * chunk_size
            if filled < size:
                break
            desc_arr[c * chunk_size : c * chunk_size + size] = buf_desc[:size].astype(dtype)
            valid_arr[c * chunk_size : c * chunk_size + size] = buf_valid[:size]
            (progress / "errors.json").write_text(json.dumps(errors))
            (progress / f"chunk_{c:06d}").touch()  # the chunk is on disk: mark it done
            # carry over the part of the buffer that belongs to the next chunk
            rest = filled - size
            buf_desc[:rest] = buf_desc[size:filled]
            buf_valid[:rest] = buf_valid[size:filled]
            buf_valid[rest:] = False
            buf_desc[rest:] = 0
            filled = rest
            base += size
            chunk_pos += 1
    bar.close()
    elapsed = time.time() - t0
    attrs = {
        **signature, **(meta or {}), "errors": errors,
        "n_valid": int(np.asarray(valid_arr[:]).sum()), "seconds": elapsed,
        "extracted_this_run": len(todo_idx), "resumed_chunks": len(done),
        # the size the model described the images at (its authors' default unless the conf set one)
        "input_size": getattr(model, "image_size", None) or model.conf.get("resize"),
    }
    group.attrs.update(attrs)
    with atomic_path(out) as tmp:
        partial.rename(tmp)
    shutil.rmtree(progress, ignore_errors=True)
    if errors:
        logger.warning("%s: %d unreadable images marked invalid", out, len(errors))
    logger.info("%s: %d images in %.1f s (%.1f img/s)", out, len(todo_idx), elapsed, len(todo_idx) / max(elapsed, 1e-9))
    return attrs


def fit_global(
    model_conf: dict, root, table, out, device: str = "auto", num_workers: int = 1
) -> None:
    """Fit a model that needs it (e.g. the VLAD codebook) on database images."""
    df = read_table(table)
    model = build_model(model_conf)
    if not model.needs_fit:
        raise ValueError(f"global model {model_conf['name']!r} needs no fit stage")
    n_fit = min(model.conf["fit_images"], len(df))
    # evenly spaced over the (sorted) database: deterministic and covers the whole area
    rows = np.unique(np.linspace(0, len(df) - 1, n_fit).round().astype(int))
    names = df.name.values[rows].tolist()
    logger.info("fitting %s on %d of %d database images", model_conf["name"], len(names), len(df))
    loader = image_loader(root, names, model.conf.get("resize"), 1, num_workers)

    def images():
        for batch in loader:
            for _, err in batch.errors:
                logger.warning("fit: skipped %s", err)
            for t in batch.images if batch.images is not None else []:
                yield to_float(t)

    with torch.inference_mode():
        state = model.fit(images())
    with atomic_path(out) as tmp:
        torch.save(state, tmp)


def run_extract(method_conf: dict, root, names, out, fit_state=None, meta=None):
    ex = method_conf.get("extraction", {})
    return extract_global(
        method_conf["model"], root, names, out, fit_state=fit_state,
        batch_size=ex.get("batch_size", 16), num_workers=ex.get("num_workers", 1),
        chunk_size=ex.get("chunk_size", 1024), device=ex.get("device", "auto"),
        dtype=ex.get("dtype", "float32"), meta=meta, autocast=ex.get("autocast"),
    )


def _fit_arguments(p):
    p.add_argument("--conf", type=json_arg, required=True, help="global method conf (JSON)")
    p.add_argument("--root", required=True)
    p.add_argument("--table", required=True, help="database index table")
    p.add_argument("--out", required=True)


def _fit(a):
    ex = a.conf.get("extraction", {})
    fit_global(a.conf["model"], a.root, a.table, a.out, ex.get("device", "auto"), ex.get("num_workers", 1))


def _extract_arguments(p):
    p.add_argument("--conf", type=json_arg, required=True, help="global method conf (JSON)")
    p.add_argument("--root", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="")
    p.add_argument("--dataset", default="")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--fit-state", default=None)


def _extract(a):
    names = read_table(a.table).name.tolist()
    meta = {"split": a.split, "dataset": a.dataset, "shard": a.shard, "shard_size": a.shard_size}
    if a.shard_size:
        start, stop = shard_range(len(names), a.shard_size, a.shard)
        names = names[start:stop]
        meta["rows"] = [start, stop]
    run_extract(a.conf, a.root, names, a.out, a.fit_state, meta)


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"fit-global": (_fit_arguments, _fit), "extract-global": (_extract_arguments, _extract)}
