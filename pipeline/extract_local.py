"""Local feature extraction stage: the images a store lacks, described and written as parts.

:func:`extract_local` describes the queries and their top-K candidates once per
extractor conf into a feature store (:mod:`pipeline.local_store`: format, folder hash,
reader). A re-run extracts only images no complete part holds; an image that cannot
be read, or that runs the device out of memory, is listed in the store's index as an
error, not fatal to the run. On the CPU, models that allow it describe one image per
core at once (:func:`extraction_threads`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from .args import json_arg, topk_k_arg
from .gpus import pick_device
from .images import to_float, to_original_frame
from .io import write_json
from .loader import image_loader
from .local_features import build_model
from .local_store import (
    KEYPOINT_FRAME,
    model_conf_full,
    scan_parts,
    split_conf,
    store_dir,
    write_part,
    writer_token,
)

logger = logging.getLogger(__name__)


def extract_local(conf: dict, root, names: list[str], base, device: str = "auto", num_workers: int = 1) -> dict:
    """Extract local features of ``names`` (relative to ``root``) that the store lacks.

    Returns the index (also written to ``<parts folder>/index.json``).
    """
    folder = store_dir(base, conf)
    model_conf, store = split_conf(conf)
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
        model = build_model(model_conf).eval().to(dev)
        # the model's default size if the conf sets none
        loader = image_loader(root, todo, model.conf["resize"], 1, num_workers, resize_max=model.conf["resize_max"])
        token, next_part = writer_token(), 0
        buffer: dict[str, dict] = {}

        def describe(img):
            t_img = time.perf_counter()
            try:
                with torch.inference_mode():
                    out = model(to_float(img.to(dev)))
                d = {key: v.float().cpu().numpy() for key, v in out.items()}  # .cpu() waits for the device
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                return OutOfMemory(f"out of memory describing it at {img.shape[2]} x {img.shape[1]} px ({e}); "
                                   f"set a smaller resize_max for {conf['name']}")
            d["seconds"] = time.perf_counter() - t_img
            return d

        originals: dict[int, tuple[int, int]] = {}

        def keep(i, img, d):
            nonlocal next_part, buffer
            if isinstance(d, OutOfMemory):  # this image is reported, the others go on
                originals.pop(i, None)
                errors[todo[i]] = f"{Path(root) / todo[i]}: {d}"
                logger.warning("skipped: %s", errors[todo[i]])
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                return
            orig = originals.pop(i)
            d["image_size"] = (img.shape[2], img.shape[1])
            d["original_size"] = orig
            d["keypoints"] = to_original_frame(d["keypoints"], d["image_size"], orig)
            buffer[todo[i]] = d
            if len(buffer) >= store["part_size"]:
                write_part(folder / f"part_{token}_{next_part:06d}.h5", buffer, store)
                next_part, buffer = next_part + 1, {}

        threads = extraction_threads(model, dev)
        pool = ThreadPoolExecutor(threads) if threads > 1 else None
        cv_threads = cv2.getNumThreads()
        if pool:  # one image per thread, each single-threaded
            cv2.setNumThreads(1)
            logger.info("describing %d images at once on the CPU", threads)
        pending: deque = deque()  # images in flight, kept in order
        t0 = time.perf_counter()
        try:
            for batch in tqdm(loader, total=len(todo), desc=f"local features {conf['name']}", mininterval=2, unit="img"):
                for i, err in batch.errors:
                    errors[todo[i]] = err
                    logger.warning("skipped: %s", err)
                for k, i in enumerate(batch.idx):
                    img = batch.images[k]
                    originals[i] = batch.original_sizes[k]  # the file's size, read with the image
                    if pool is None:
                        keep(i, img, describe(img))
                        continue
                    pending.append((i, img, pool.submit(describe, img)))
                    while len(pending) > 2 * threads:
                        keep(*_resolved(pending.popleft()))
            while pending:
                keep(*_resolved(pending.popleft()))
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
                cv2.setNumThreads(cv_threads)
        if buffer:
            write_part(folder / f"part_{token}_{next_part:06d}.h5", buffer, store)
        seconds = time.perf_counter() - t0
    per_image: dict[str, float] = {}
    index = scan_parts(folder, per_image)
    size = sum(p.stat().st_size for p in folder.glob("part_*.h5"))
    info = {
        "folder": str(folder), "conf": conf, "images": {n: index[n] for n in names if n in index},
        "errors": errors, "extracted_this_run": len(todo) - len(errors), "seconds": seconds,
        # the model's time per image (decoding excluded), kept in the parts across runs
        "image_seconds": {n: per_image[n] for n in names if n in index},
        "store_bytes": size, "store": store, "keypoint_frame": KEYPOINT_FRAME,
        "resize": model_conf_full(model_conf).get("resize"), "resize_max": model_conf_full(model_conf).get("resize_max"),
    }
    logger.info("%s: %.1f MB for %d images", folder, size / 1e6, len(index))
    write_json(folder / "index.json", info)
    return info


class OutOfMemory(str):
    """Why an image could not be described for lack of memory (kept as that image's error)."""


def is_out_of_memory(err: BaseException) -> bool:
    """A MemoryError, or torch's CPU / CUDA allocation failure."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text


def extraction_threads(model, device) -> int:
    """Images described at once: one per core of this process (``torch.get_num_threads``)
    for a CPU model that allows it (:attr:`LocalModel.cpu_threads_safe`), else 1."""
    if torch.device(device).type != "cpu" or not getattr(model, "cpu_threads_safe", False):
        return 1
    return max(1, torch.get_num_threads())


def _resolved(item):
    i, img, future = item
    return i, img, future.result()


def _arguments(p):
    p.add_argument("--conf", type=json_arg, required=True, help="extractor conf (JSON)")
    p.add_argument("--root", required=True)
    p.add_argument("--index-dir", default=None, help="index tables (to find imported top-k names)")
    p.add_argument("--topk", type=topk_k_arg, nargs="+", required=True, help="PATH:K top-k files and their K")
    p.add_argument("--base", required=True, help="folder for the feature stores")
    p.add_argument("--out", required=True, help="the store's index (JSON)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=1)


def _run(a):
    from .rerank import name_resolver, needed_images

    resolve = name_resolver(a.root, a.index_dir)
    names = needed_images(a.topk, resolve)
    resolve.check(names)
    write_json(a.out, extract_local(a.conf, a.root, names, a.base, a.device, a.num_workers))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"extract-local": (_arguments, _run)}
