"""The local feature store: features of many images, stored by image name.

Written by the extraction stage (:mod:`pipeline.extract_local`), read by matching,
scoring and the reports through :class:`FeatureStore`.

A store is a folder of HDF5 part files (``part_<writer>_NNNNNN.h5``), each holding one
group per image (hloc's layout: ``keypoints [N, 2]`` float32 in pixels of the original
image file (whatever size the model described it at: ``(x + 0.5) * scale - 0.5``, so
RANSAC's thresholds are original-image pixels), ``descriptors [N, D]`` float16 (or
float32), ``scores [N]`` float16, ``image_size [2]`` = the width/height the model
described (the extractor's ``resize`` / ``resize_max``), ``original_size [2]``, optional per-keypoint ``levels [N]`` int16 and
``scales [N]`` float32, and optional per-image arrays named ``global_*``, e.g. a
global descriptor that learned scorers such as RRT read). Parts are written
to a temporary file and renamed when complete, so a killed run leaves only whole
parts; a re-run reads which images the parts already hold and extracts only the
others. The folder name carries a hash of the extractor's conf, so features made
with other settings are never mixed in. ``index.json`` beside the parts maps
image names to parts (written last) and reports the store's size.

Storage options (the extractor conf's ``store`` entry, see :data:`STORE_DEFAULTS`):
``descriptors`` float16 (half the size; what LESSONS.md asks where it loses
nothing) or float32 (part of the folder hash: the values differ);
``compression`` none (default), lzf or gzip (with byte shuffling) -- compressed
per-keypoint arrays are chunked by rows (up to 4 MB a chunk), tiny ones stay
contiguous; ``part_size`` images per part file. Measured on real SIFT features
(benchmarks/local_store.py, 10000 images of 2048 keypoints): float16 halves the
store (548 MB per 1000 images against 1072 for float32); lzf saves another 7 %
and gzip 26 %, but reads take 3-4x longer (2.5 / 3.3 ms per image against 0.8):
compress a store that is archived rather than re-read often.

At hundreds of thousands of images: parts are immutable once renamed into place,
so any number of processes may read a store while another adds parts to it
(readers open parts without HDF5 file locking, which network file systems often
refuse, and keep at most :data:`MAX_OPEN` of them open); each writer names its
parts with its own token, so two writers never collide on a part name; the index
is one JSON map name -> part.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from .conf import conf_hash
from .images import to_described_frame, to_original_frame
from .io import atomic_path
from .local_features import REGISTRY as LOCAL

logger = logging.getLogger(__name__)

PART_SIZE = 256  # images per part file
CORE = ("keypoints", "descriptors", "scores", "image_size", "original_size", "seconds")
OPTIONAL = ("levels", "scales")  # per keypoint; per-image arrays are named global_*
#: storage options of a feature store (an extractor conf's ``store`` entry)
STORE_DEFAULTS = {"descriptors": "float16", "compression": "none", "part_size": PART_SIZE}
COMPRESSIONS = ("lzf", "gzip", "none")
#: part files a reader keeps open at once
MAX_OPEN = 32
#: arrays smaller than this stay contiguous (compression needs chunks, which cost more than they save)
MIN_COMPRESS_BYTES = 1024
#: the frame stored keypoints are in (part of every store's hash; stores written before it
#: existed hold keypoints of the described image and are read back converted)
KEYPOINT_FRAME = "original"


def split_conf(conf: dict) -> tuple[dict, dict]:
    """``(model conf, storage options)`` of an extractor conf; bad storage options name the problem."""
    conf = dict(conf)
    given = conf.pop("store", None) or {}
    unknown = sorted(set(given) - set(STORE_DEFAULTS))
    if unknown:
        raise ValueError(f"local features {conf.get('name')!r}: unknown store option(s) {unknown}; "
                         f"valid: {sorted(STORE_DEFAULTS)}")
    store = {**STORE_DEFAULTS, **given}
    if store["descriptors"] not in ("float16", "float32"):
        raise ValueError(f"local features {conf.get('name')!r}: store.descriptors must be float16 or float32, "
                         f"not {store['descriptors']!r}")
    if store["compression"] not in COMPRESSIONS:
        raise ValueError(f"local features {conf.get('name')!r}: store.compression must be one of {COMPRESSIONS}, "
                         f"not {store['compression']!r}")
    if not isinstance(store["part_size"], int) or store["part_size"] < 1:
        raise ValueError(f"local features {conf.get('name')!r}: store.part_size must be a positive integer")
    return conf, store


def model_conf_full(model_conf: dict) -> dict:
    """An extractor's model conf with its class's defaults filled in."""
    return LOCAL.full_conf(model_conf, f"local features {model_conf['name']}")


def store_dir(base: str | Path, conf: dict) -> Path:
    """The parts folder for an extractor conf under ``base`` (name + hash of the conf with the
    model's defaults filled in, so a changed default -- e.g. ALIKED's NMS -- gets a new store).
    float32 descriptors are part of the hash; compression and part size are not (same values)."""
    model_conf, store = split_conf(conf)
    full = model_conf_full(model_conf)
    if store["descriptors"] != STORE_DEFAULTS["descriptors"]:
        full = {**full, "store_descriptors": store["descriptors"]}
    full = {**{k: v for k, v in full.items() if k != "trust"}, "keypoint_frame": KEYPOINT_FRAME}
    return Path(base) / f"{model_conf['name']}-{conf_hash(full)}"


def _part_names(path: Path) -> dict[str, float]:
    """Image name -> extraction seconds (NaN if not recorded) of the images in a part."""
    names = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "keypoints" in obj:
            names[name] = float(obj.attrs.get("seconds", float("nan")))

    with h5py.File(path, "r", locking=False) as f:
        f.visititems(visit)
    return names


def scan_parts(folder: Path, seconds: dict | None = None) -> dict[str, str]:
    """Image name -> part file name, for every complete part in ``folder``
    (and, into ``seconds``, image name -> extraction seconds)."""
    index = {}
    for part in sorted(folder.glob("part_*.h5")):
        try:
            for name, sec in _part_names(part).items():
                index[name] = part.name
                if seconds is not None:
                    seconds[name] = sec
        except OSError as e:
            raise ValueError(f"{part}: damaged feature part ({e}); delete it to extract its images again") from None
    return index


def _dataset(g, key, data, compression: str):
    data = np.ascontiguousarray(data)
    if compression == "none" or data.nbytes < MIN_COMPRESS_BYTES or data.ndim == 0:
        return g.create_dataset(key, data=data)
    # chunks of whole rows (~64 KB): a reader decompresses only what it reads
    rows = max(1, min(len(data), (1 << 22) // max(1, data[0].nbytes)))
    opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if compression == "gzip" else {"compression": "lzf"}
    return g.create_dataset(key, data=data, chunks=(rows, *data.shape[1:]), **opts)


def write_part(path: Path, feats: dict[str, dict], store: dict | None = None) -> None:
    """One part file of features by image name, written to a temporary file and renamed."""
    store = {**STORE_DEFAULTS, **(store or {})}
    comp = store["compression"]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, d in feats.items():
                g = f.create_group(name)
                if "seconds" in d:
                    g.attrs["seconds"] = float(d["seconds"])
                _dataset(g, "keypoints", d["keypoints"].astype(np.float32), comp)
                _dataset(g, "descriptors", d["descriptors"].astype(store["descriptors"]), comp)
                _dataset(g, "scores", d["scores"].astype(np.float16), comp)
                g.create_dataset("image_size", data=np.asarray(d["image_size"], np.int32))
                g.create_dataset("original_size", data=np.asarray(d["original_size"], np.int32))
                for key, value in d.items():
                    if key in CORE:
                        continue
                    if key == "levels":
                        _dataset(g, key, np.asarray(value).astype(np.int16), comp)
                    elif key in OPTIONAL or key.startswith("global_"):
                        _dataset(g, key, np.asarray(value, np.float32), comp)
                    else:
                        raise ValueError(f"{path}: unknown feature key {key!r} for image {name!r}")


def writer_token() -> str:
    """A token unique to one writer run (host, process, random): its part names never collide."""
    return f"{os.uname().nodename.split('.')[0][:16]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def described_keypoints(feats: dict) -> np.ndarray:
    """An image's stored keypoints (original-image pixels) in pixels of the image the model
    described (``image_size``): the frame of scorers whose thresholds are upstream's in the
    model's input (Patch-NetVLAD's and TransVPR's 480 x 640 grids)."""
    kp = np.asarray(feats["keypoints"])
    if "image_size" not in feats or "original_size" not in feats:
        return kp
    return to_described_frame(kp, feats["image_size"], feats["original_size"])


class FeatureStore:
    """Read local features by image name.

    Parts are opened on demand, read-only and without HDF5 file locking (they
    never change once written), and at most ``max_open`` stay open (least
    recently used closed first), so a store of thousands of parts never runs out
    of file handles and many processes can read it at once.
    """

    def __init__(self, index_file: str | Path, max_open: int = MAX_OPEN):
        self.index_file = Path(index_file)
        try:
            info = json.loads(self.index_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.index_file}: unreadable feature index ({e}); delete it to rebuild") from None
        self.folder = Path(info["folder"])
        self.images: dict[str, str] = info["images"]
        self.errors: dict[str, str] = info.get("errors", {})
        # stores written before keypoints were stored in the original frame: converted on read
        self.frame = info.get("keypoint_frame", "described")
        self.max_open = max(1, max_open)
        self._files: OrderedDict[str, h5py.File] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self.images

    def check(self, names) -> None:
        """Raise naming the images the store lacks (checked up front, not mid-run)."""
        missing = [n for n in dict.fromkeys(names) if n not in self.images and n not in self.errors]
        if missing:
            raise KeyError(f"{self.index_file}: no features for {len(missing)} images, e.g. {missing[:3]}")

    def _file(self, part: str) -> h5py.File:
        f = self._files.get(part)
        if f is not None:
            self._files.move_to_end(part)
            return f
        while len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        try:
            f = h5py.File(self.folder / part, "r", locking=False)
        except OSError as e:
            raise ValueError(f"{self.folder / part}: damaged or missing feature part ({e}); "
                             "delete it and its index.json to extract its images again") from None
        self._files[part] = f
        return f

    def get(self, name: str, exclude: tuple[str, ...] = ()) -> dict | None:
        """Features of one image as numpy arrays (None for an unreadable image); arrays named
        in ``exclude`` are not read (scorers need keypoints, not the descriptors: ~50x less
        to read)."""
        if name not in self.images:
            if name in self.errors:
                return None
            raise KeyError(f"{self.index_file}: no features for {name!r}")
        g = self._file(self.images[name])[name]
        d = {k: g[k][()] for k in g.keys() if k not in exclude}
        if self.frame != KEYPOINT_FRAME and "original_size" in d:
            d["keypoints"] = to_original_frame(d["keypoints"], d["image_size"], d["original_size"]).astype(np.float32)
        return d

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
