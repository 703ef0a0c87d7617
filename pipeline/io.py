"""Atomic writes and small file helpers shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


#: errors of the disk rather than of the data: reported with the output's path
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success.

    Works for files and for directories (Zarr stores). On an exception the
    temporary is removed and ``path`` is left as it was, so a killed or failed job
    never leaves a half-written output behind under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in DISK_ERRNOS and str(path) not in str(e):
                # "[Errno 28] No space left on device" names no file: say which output failed
                raise OSError(e.errno, f"{e.strerror or e} (while writing {path})", str(tmp)) from e
            raise
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot replace a non-empty directory: move the old one aside.
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def hash_file(path, algorithm: str = "sha256", prefix: bytes = b"") -> str:
    """The hex digest of ``prefix`` + a file's bytes, read in 1 MB blocks."""
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete the file to rebuild it") from None
