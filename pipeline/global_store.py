"""Global descriptor stores: chunked Zarr groups of ``descriptors [n, D]``, ``valid [n]``, ``names [n]``.

Written by the extraction (one store per database shard, and the queries) and the gather
stage (the shards in one store), read by the index and search stages through
:class:`GlobalStore`. A store is built as ``<out>.partial`` (:func:`open_partial_store`,
restarted if its signature changed) and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import zarr

logger = logging.getLogger(__name__)

STORE_VERSION = 1


def shard_range(n: int, shard_size: int, shard: int) -> tuple[int, int]:
    n_shards = num_shards(n, shard_size)
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range: {n} images in {n_shards} shards of {shard_size}")
    return shard * shard_size, min(n, (shard + 1) * shard_size)


def num_shards(n: int, shard_size: int) -> int:
    return max(1, -(-n // shard_size))


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
