"""Global-extraction throughput against the model's forward-only throughput.

Measured in one run on the same images:

- forward only: the model on image tensors already in memory (the ceiling);
- pipeline: ``extract_global`` end to end (JPEG decoding, resizing, the DataLoader,
  batching, the model, chunked Zarr writes, progress files).

The ratio pipeline / forward shows how much the I/O around the model costs;
``pipeline_loop`` leaves out the fixed set-up (building the model, creating the
store), which a real shard of 100k images pays once.

    python benchmarks/global_extraction.py                    # CosPlace ResNet-50, random weights
    python benchmarks/global_extraction.py --model vlad_sift --n 64
    python benchmarks/global_extraction.py --device cuda --n 512 --batch-size 32
    python benchmarks/global_extraction.py --device cuda --autocast bfloat16   # both timings under autocast
    python benchmarks/global_extraction.py --model megaloc --device cuda --n 512 --batch-size 64

The synthetic demo dataset is generated into a temporary folder unless --root is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets.index import index_dataset, read_table  # noqa: E402
from pipeline.datasets.synthetic import generate  # noqa: E402
from pipeline.extract_global import extract_global, fit_global, load_model  # noqa: E402
from pipeline.gpus import AUTOCAST, autocast_context, pick_device  # noqa: E402
from pipeline.images import load_uint8, to_float  # noqa: E402

MODELS = {
    "cosplace": {"name": "cosplace", "backbone": "ResNet50", "fc_output_dim": 512},
    "cosplace_r18": {"name": "cosplace", "backbone": "ResNet18", "fc_output_dim": 512},
    "vlad_sift": {"name": "vlad", "local": {"name": "sift", "max_keypoints": 1000}, "n_clusters": 64, "dim": 128,
                  "fit_images": 200},
    # the modern descriptors, random weights, each at its authors' test resolution
    "megaloc": {"name": "megaloc"},
    "salad": {"name": "salad"},
    "boq_r50": {"name": "boq", "backbone": "resnet50"},
    "boq_dinov2": {"name": "boq", "backbone": "dinov2"},
    "eigenplaces": {"name": "eigenplaces"},
    "mixvpr": {"name": "mixvpr"},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="cosplace")
    p.add_argument("--root", help="dataset root (default: the synthetic demo set, generated in a temp folder)")
    p.add_argument("--n", type=int, default=128,
                   help="images to describe (the database's images are cycled if it has fewer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--autocast", choices=[k for k in AUTOCAST if k], default=None,
                   help="run the model under torch.autocast in both timings (extraction.autocast)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = Path(a.root) if a.root else tmp / "demo"
        if not a.root:
            generate(root, {"seed": 0})
        index_dataset(root, tmp / "index")
        db = read_table(tmp / "index" / "database.csv").name.tolist()
        names = [db[i % len(db)] for i in range(a.n)]
        conf = MODELS[a.model]
        fit = None
        if conf["name"] == "vlad":
            fit = tmp / "fit.pt"
            fit_global(conf, root, tmp / "index" / "database.csv", fit, device=a.device)
        dev = pick_device(a.device)
        model = load_model(conf, fit, dev)

        # forward only, on decoded 8-bit images already in memory (same batches as the pipeline)
        cache = {n: load_uint8(root / n, model.conf.get("resize")) for n in set(names)}
        tensors = [cache[n] for n in names]
        batches = [torch.stack(tensors[i : i + a.batch_size]) for i in range(0, len(tensors), a.batch_size)]
        with torch.inference_mode(), autocast_context(a.autocast, dev):
            model(to_float(batches[0].to(dev)))  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in batches:
                model(to_float(b.to(dev)))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            forward_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        attrs = extract_global(conf, root, names, tmp / "store.zarr", fit_state=fit, batch_size=a.batch_size,
                               num_workers=a.num_workers, chunk_size=1024, device=a.device, autocast=a.autocast)
        pipeline_s = time.perf_counter() - t0
        loop_s = attrs["seconds"]  # the extraction loop alone: without building the model and the store

    n = len(names)
    result = {
        "model": a.model, "device": str(dev), "images": n, "image_size": list(tensors[0].shape[1:]),
        "batch_size": a.batch_size, "autocast": a.autocast, "num_workers": a.num_workers, "torch_threads": torch.get_num_threads(),
        "forward_only_img_s": round(n / forward_s, 2),
        "pipeline_img_s": round(n / pipeline_s, 2),
        "pipeline_loop_img_s": round(n / loop_s, 2),
        "setup_s": round(pipeline_s - loop_s, 2),
        "ratio_pipeline_over_forward": round(forward_s / pipeline_s, 3),
        "ratio_loop_over_forward": round(forward_s / loop_s, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
