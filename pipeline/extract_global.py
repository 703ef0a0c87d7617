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

import hashlib
import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .datasets.index import read_table
from .global_features import build_model
from .images import ImageReadError, load_uint8, to_float
from .io import atomic_path

logger = logging.getLogger(__name__)

STORE_VERSION = 1


def conf_hash(conf) -> str:
    return hashlib.sha1(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:12]


def shard_range(n: int, shard_size: int, shard: int) -> tuple[int, int]:
    n_shards = num_shards(n, shard_size)
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range: {n} images in {n_shards} shards of {shard_size}")
    return shard * shard_size, min(n, (shard + 1) * shard_size)


def num_shards(n: int, shard_size: int) -> int:
    return max(1, -(-n // shard_size))


def pick_device(device: str) -> torch.device:
    """``auto``: a GPU when there is one (with several, one no other job holds: :mod:`pipeline.gpus`),
    else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from .gpus import claim_gpu

        return torch.device("cuda", claim_gpu(torch.cuda.device_count()))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


class ImageList(Dataset):
    """Images (``uint8 [3, H, W]``) of a dataset by relative name; unreadable ones come back as errors."""

    def __init__(self, root: Path, names: list[str], resize=None, resize_max: int | None = None):
        self.root, self.names, self.resize, self.resize_max = Path(root), names, resize, resize_max

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            return i, load_uint8(self.root / self.names[i], self.resize, self.resize_max), None
        except ImageReadError as e:
            return i, None, str(e)


@dataclass
class Batch:
    """A loader batch: the readable images (stacked when they share a size) and the errors."""

    size: int  # images asked for, readable or not
    idx: list[int]
    images: torch.Tensor | list[torch.Tensor] | None
    errors: list[tuple[int, str]]

    def pin_memory(self):  # called by the DataLoader's pinning thread when pin_memory=True
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        return self


def _collate(batch) -> Batch:
    # runs in the loader's worker: stacking there sends one shared-memory block per batch
    ok = [(i, t) for i, t, _ in batch if t is not None]
    tensors = [t for _, t in ok]
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        images = torch.stack(tensors)
    else:
        images = tensors or None
    return Batch(len(batch), [i for i, _ in ok], images, [(i, e) for i, t, e in batch if t is None])


def image_loader(root, names, resize, batch_size, num_workers, pin_memory=False, resize_max=None) -> DataLoader:
    return DataLoader(
        ImageList(root, names, resize, resize_max), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_collate, shuffle=False, pin_memory=pin_memory,
    )


#: ``autocast`` options of the extraction: the dtype the model's matrix products and
#: convolutions run in (``None``: float32 throughout). Descriptors are stored as float32
#: (or the store's ``dtype``) either way.
AUTOCAST = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_context(autocast: str | None, device: torch.device):
    """``torch.autocast`` for the ``autocast`` option on ``device`` (a no-op for float32)."""
    if autocast not in AUTOCAST:
        raise ValueError(f"extraction autocast must be one of {sorted(k for k in AUTOCAST if k)} or null, "
                         f"not {autocast!r}")
    dtype = AUTOCAST[autocast]
    if dtype is None:
        return nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("extraction autocast float16 is for GPUs; on a CPU use bfloat16")
    return torch.autocast(device.type, dtype=dtype)


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
    :data:`AUTOCAST`).

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
        "fit_state_hash": _file_hash(fit_state) if fit_state else None,
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
        root, [names[i] for i in todo_idx], model_conf.get("resize"), batch_size, num_workers,
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
    }
    group.attrs.update(attrs)
    with atomic_path(out) as tmp:
        partial.rename(tmp)
    shutil.rmtree(progress, ignore_errors=True)
    if errors:
        logger.warning("%s: %d unreadable images marked invalid", out, len(errors))
    logger.info("%s: %d images in %.1f s (%.1f img/s)", out, len(todo_idx), elapsed, len(todo_idx) / max(elapsed, 1e-9))
    return attrs


def _file_hash(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def write_names(group, names, chunk_size: int = 65536, start: int = 0, total: int | None = None):
    """The image names (rows ``start...``) into the chunked string array ``names``, created if
    needed with ``total`` rows (attributes would be one huge JSON at millions of images)."""
    total = len(names) if total is None else total
    if "names" not in group:
        group.create_array("names", shape=(total,), chunks=(max(1, min(chunk_size, total)),), dtype=str)
    if len(names):
        group["names"][start : start + len(names)] = np.asarray(names, dtype=object)


def open_partial_store(partial: Path, progress: Path, signature: dict, n: int, dim: int, dtype: str,
                       chunk_rows: int, with_names: bool = False):
    """Open (or start) a partial descriptor store; start over if it was made with other settings.

    ``signature`` is kept in ``progress/signature.json`` and compared on reopening. A
    new store gets ``descriptors [n, dim]`` and ``valid [n]`` (and ``names [n]``)
    chunked alike by ``chunk_rows`` rows, so writing one chunk never rewrites another.
    """
    sig_file = progress / "signature.json"
    want = json.loads(json.dumps(signature, default=str))
    if partial.exists():
        old = json.loads(sig_file.read_text()) if sig_file.exists() else None
        if old == want:
            return zarr.open_group(str(partial), mode="r+")
        logger.warning("%s was started with other settings: starting over", partial)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir(parents=True)
    group = zarr.open_group(str(partial), mode="w")
    rows = max(1, min(chunk_rows, n))
    group.create_array("descriptors", shape=(n, dim), chunks=(rows, dim), dtype=dtype, fill_value=0)
    group.create_array("valid", shape=(n,), chunks=(rows,), dtype=bool, fill_value=False)
    if with_names:
        write_names(group, [], rows, total=n)
    sig_file.write_text(json.dumps(want))
    return group


class GlobalStore:
    """Read access to one finished descriptor store (a shard, the queries, or a gathered database).

    Names are the ``names`` string array (older stores: the ``names`` attribute);
    they are read when first asked for, and :meth:`names_at` reads only some rows.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: descriptor store not found")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
            self.attrs = dict(self.group.attrs)
            self.descriptors = self.group["descriptors"]
            self.valid_arr = self.group["valid"]
            self._names_arr = self.group["names"] if "names" in self.group else None
        except Exception as e:  # noqa: BLE001 - any zarr failure means a damaged store
            raise ValueError(f"{self.path}: damaged descriptor store ({e}); delete it to re-extract") from None
        n_names = self._names_arr.shape[0] if self._names_arr is not None else len(self.attrs.get("names") or [])
        if n_names != self.descriptors.shape[0] or ("names" not in self.attrs and "n_valid" not in self.attrs):
            raise ValueError(f"{self.path}: incomplete descriptor store (no or wrong names); delete it to re-extract")
        self._names = None

    @property
    def names(self) -> list[str]:
        if self._names is None:
            self._names = self.attrs["names"] if self._names_arr is None else self._names_arr[:].astype(object).tolist()
        return self._names

    def names_at(self, rows) -> np.ndarray:
        """Names of some rows (an object array), reading only the chunks that hold them."""
        rows = np.asarray(rows, np.int64)
        if self._names is not None or self._names_arr is None:
            return np.asarray(self.names, dtype=object)[rows]
        uniq, inv = np.unique(rows, return_inverse=True)
        got = np.asarray(self._names_arr.oindex[uniq], dtype=object) if len(uniq) else np.zeros(0, object)
        return got[inv.reshape(rows.shape)]

    @property
    def dim(self) -> int:
        return self.descriptors.shape[1]

    @property
    def chunk_rows(self) -> int:
        return self.descriptors.chunks[0]

    def __len__(self):
        return self.descriptors.shape[0]

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        stop = len(self) if stop is None else stop
        return np.asarray(self.descriptors[start:stop], dtype=np.float32), np.asarray(self.valid_arr[start:stop])

    def read_valid(self) -> np.ndarray:
        return np.asarray(self.valid_arr[:])


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
    loader = image_loader(root, names, model_conf.get("resize"), 1, num_workers)

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
