"""The device a job runs on: :func:`pick_device`, the GPU it claims among several, autocast.

Which GPU a job uses when several jobs share a multi-GPU machine:

On a cluster each job gets its own GPU (SLURM sets ``CUDA_VISIBLE_DEVICES``), so a
job sees one GPU and uses it. On one machine with several GPUs, Snakemake runs
several GPU jobs at once (``--resources gpu=N``) but does not say which GPU each
should take: without care they would all pile onto GPU 0. :func:`claim_gpu` gives
each process a GPU nobody else holds, through an exclusive lock on
``<lock dir>/gpu<i>.lock`` (``fcntl.flock``: released by the kernel when the
process ends, also when it is killed). With every GPU taken (more GPU jobs than
GPUs) it warns and shares one; ``--resources gpu=N`` with N the number of GPUs
keeps that from happening.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: the lock folder (one per machine): VG_GPU_LOCK_DIR or /tmp/vg-gpu-locks
LOCK_DIR_ENV = "VG_GPU_LOCK_DIR"
_held: dict[int, int] = {}  # gpu index -> open lock file descriptor (kept for the process's lifetime)


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV, "/tmp/vg-gpu-locks"))


def claim_gpu(n_gpus: int, folder: str | Path | None = None) -> int:
    """A GPU index in ``0..n_gpus-1`` that no other process holds, held until this process ends."""
    if n_gpus <= 1:
        return 0
    if _held:
        return next(iter(_held))
    folder = Path(folder) if folder is not None else lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    start = os.getpid() % n_gpus  # spread the first tries
    for j in range(n_gpus):
        i = (start + j) % n_gpus
        fd = os.open(folder / f"gpu{i}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[i] = fd
        logger.info("using GPU %d of %d (lock %s)", i, n_gpus, folder / f"gpu{i}.lock")
        return i
    logger.warning("all %d GPUs are held by other jobs (more GPU jobs than GPUs: set --resources gpu=%d): "
                   "sharing GPU %d", n_gpus, n_gpus, start)
    return start


def release_gpus() -> None:
    """Give back the GPU this process holds (for tests; the end of the process does it anyway)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def pick_device(device: str) -> torch.device:
    """``auto``: a GPU when there is one (with several, one no other job holds: :mod:`pipeline.gpus`),
    else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", claim_gpu(torch.cuda.device_count()))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


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
