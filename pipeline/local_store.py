"""Local features of many images, extracted once, stored by image name.

A store is a folder of HDF5 part files (``part_NNNNNN.h5``), each holding one
group per image (hloc's layout: ``keypoints [N, 2]`` float32, ``descriptors
[N, D]`` float16, ``scores [N]`` float16, ``image_size [2]`` = the described
width/height, ``original_size [2]``, optional per-keypoint ``levels [N]`` int16 and
``scales [N]`` float32, and optional per-image arrays named ``global_*``, e.g. a
global descriptor that learned scorers such as RRT read). Parts are written
to a temporary file and renamed when complete, so a killed run leaves only whole
parts; a re-run reads which images the parts already hold and extracts only the
others. The folder name carries a hash of the extractor's conf, so features made
with other settings are never mixed in. ``index.json`` beside the parts maps
image names to parts (written last) and reports the store's size.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from .extract_global import conf_hash, image_loader, pick_device
from .images import to_float
from .io import atomic_path, write_json
from .global_features.base import merge_conf
from .local_features import build_model, get_model_class

logger = logging.getLogger(__name__)

PART_SIZE = 256  # images per part file
CORE = ("keypoints", "descriptors", "scores", "image_size", "original_size", "seconds")
OPTIONAL = ("levels", "scales")  # per keypoint; per-image arrays are named global_*


def store_dir(base: str | Path, conf: dict) -> Path:
    """The parts folder for an extractor conf under ``base`` (name + hash of the conf with the
    model's defaults filled in, so a changed default -- e.g. ALIKED's NMS -- gets a new store)."""
    cls = get_model_class(conf["name"])
    full = merge_conf({**cls.base_conf, **cls.default_conf}, conf, f"local features {conf['name']}")
    return Path(base) / f"{conf['name']}-{conf_hash(full)}"


def _part_names(path: Path) -> dict[str, float]:
    """Image name -> extraction seconds (NaN if not recorded) of the images in a part."""
    names = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "keypoints" in obj:
            names[name] = float(obj.attrs.get("seconds", float("nan")))

    with h5py.File(path, "r") as f:
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


def write_part(path: Path, feats: dict[str, dict]) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, d in feats.items():
                g = f.create_group(name)
                if "seconds" in d:
                    g.attrs["seconds"] = float(d["seconds"])
                g.create_dataset("keypoints", data=d["keypoints"].astype(np.float32))
                g.create_dataset("descriptors", data=d["descriptors"].astype(np.float16))
                g.create_dataset("scores", data=d["scores"].astype(np.float16))
                g.create_dataset("image_size", data=np.asarray(d["image_size"], np.int32))
                g.create_dataset("original_size", data=np.asarray(d["original_size"], np.int32))
                for key, value in d.items():
                    if key in CORE:
                        continue
                    if key == "levels":
                        g.create_dataset(key, data=np.asarray(value).astype(np.int16))
                    elif key in OPTIONAL or key.startswith("global_"):
                        g.create_dataset(key, data=np.asarray(value, np.float32))
                    else:
                        raise ValueError(f"{path}: unknown feature key {key!r} for image {name!r}")


def extract_local(conf: dict, root, names: list[str], base, device: str = "auto", num_workers: int = 1) -> dict:
    """Extract local features of ``names`` (relative to ``root``) that the store lacks.

    Returns the index (also written to ``<parts folder>/index.json``).
    """
    folder = store_dir(base, conf)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conf.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    index = scan_parts(folder)
    names = list(dict.fromkeys(names))  # unique, in order
    todo = [n for n in names if n not in index]
    logger.info("%s: %d images needed, %d already extracted, %d to extract", folder, len(names), len(names) - len(todo), len(todo))
    errors = {}
    seconds = 0.0
    if todo:
        dev = pick_device(device)
        model = build_model(conf).eval().to(dev)
        loader = image_loader(root, todo, model.conf["resize"], 1, num_workers)  # the model's default if unset
        next_part = max([int(p.stem.split("_")[1]) for p in folder.glob("part_*.h5")] + [-1]) + 1
        buffer: dict[str, dict] = {}
        t0 = time.perf_counter()
        for batch in tqdm(loader, total=len(todo), desc=f"local features {conf['name']}", mininterval=2, unit="img"):
            for i, err in batch.errors:
                errors[todo[i]] = err
                logger.warning("skipped: %s", err)
            for k, i in enumerate(batch.idx):
                img = batch.images[k]
                t_img = time.perf_counter()
                with torch.inference_mode():
                    out = model(to_float(img.to(dev)))
                d = {key: v.float().cpu().numpy() for key, v in out.items()}  # .cpu() waits for the device
                d["seconds"] = time.perf_counter() - t_img
                orig = _original_size(Path(root) / todo[i])
                d["image_size"] = (img.shape[2], img.shape[1])
                d["original_size"] = orig
                buffer[todo[i]] = d
            if len(buffer) >= PART_SIZE:
                write_part(folder / f"part_{next_part:06d}.h5", buffer)
                next_part, buffer = next_part + 1, {}
        if buffer:
            write_part(folder / f"part_{next_part:06d}.h5", buffer)
        seconds = time.perf_counter() - t0
    per_image: dict[str, float] = {}
    index = scan_parts(folder, per_image)
    size = sum(p.stat().st_size for p in folder.glob("part_*.h5"))
    info = {
        "folder": str(folder), "conf": conf, "images": {n: index[n] for n in names if n in index},
        "errors": errors, "extracted_this_run": len(todo) - len(errors), "seconds": seconds,
        # the model's time per image (decoding excluded), kept in the parts across runs
        "image_seconds": {n: per_image[n] for n in names if n in index},
        "store_bytes": size,
    }
    logger.info("%s: %.1f MB for %d images", folder, size / 1e6, len(index))
    write_json(folder / "index.json", info)
    return info


def _original_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


class FeatureStore:
    """Read local features by image name (opens part files on demand)."""

    def __init__(self, index_file: str | Path):
        self.index_file = Path(index_file)
        info = json.loads(self.index_file.read_text())
        self.folder = Path(info["folder"])
        self.images: dict[str, str] = info["images"]
        self.errors: dict[str, str] = info.get("errors", {})
        self._files: dict[str, h5py.File] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.images

    def check(self, names) -> None:
        """Raise naming the images the store lacks (checked up front, not mid-run)."""
        missing = [n for n in dict.fromkeys(names) if n not in self.images and n not in self.errors]
        if missing:
            raise KeyError(f"{self.index_file}: no features for {len(missing)} images, e.g. {missing[:3]}")

    def get(self, name: str) -> dict | None:
        """Features of one image as numpy arrays (None for an unreadable image)."""
        if name not in self.images:
            if name in self.errors:
                return None
            raise KeyError(f"{self.index_file}: no features for {name!r}")
        part = self.images[name]
        if part not in self._files:
            self._files[part] = h5py.File(self.folder / part, "r")
        g = self._files[part][name]
        return {k: g[k][()] for k in g.keys()}

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
