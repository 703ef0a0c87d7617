"""Local-feature stores at scale: size, write and read speed per storage option, concurrent readers.

Real features (SIFT 2048 and ALIKED 1024 keypoints, or ``--extractor``) of the
photo pairs in ../shared/fixtures/pairs, repeated with jittered keypoints to
``--images`` images, are written into a feature store with each storage option
(``store: {descriptors: float16|float32, compression: none|lzf|gzip}``), then
read back in random order by one process and by ``--readers`` processes at once.
One table, all measured in this run:

    python benchmarks/local_store.py                       # 20000 images, SIFT
    python benchmarks/local_store.py --images 100000 --extractor aliked --work /tmp/ls

Columns: store size (MB per 1000 images, and the ratio to float32 uncompressed),
write seconds per 1000 images, random-read ms per image with one reader, and
images per second over all readers when ``--readers`` read at once. At SF-XL's
scale (queries + top-100 candidates: ~100k images) multiply the size column by 100.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.images import load_tensor
from pipeline.io import write_json
from pipeline.local_features import build_model
from pipeline.local_store import PART_SIZE, FeatureStore, scan_parts, write_part

SHARED = Path(__file__).resolve().parents[2] / "shared"
EXTRACTORS = {
    "sift": {"name": "sift", "max_keypoints": 2048},
    "aliked": {"name": "aliked", "weights": str(SHARED / "weights" / "aliked-n16.pth"), "max_keypoints": 1024},
}
OPTIONS = [("float32", "none"), ("float16", "none"), ("float16", "lzf"), ("float16", "gzip"), ("float32", "lzf")]


def real_features(extractor: str, size: int = 640) -> list[dict]:
    model = build_model(EXTRACTORS[extractor]).eval()
    out = []
    for img in sorted((SHARED / "fixtures" / "pairs").glob("*.jpg")):
        t = load_tensor(img, size)
        import torch

        with torch.inference_mode():
            f = {k: v.float().numpy() for k, v in model(t).items()}
        f.update(image_size=(t.shape[2], t.shape[1]), original_size=(t.shape[2], t.shape[1]), seconds=0.0)
        out.append(f)
    return out


def write_store(folder: Path, base: list[dict], n: int, dtype: str, comp: str) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for p, a in enumerate(range(0, n, PART_SIZE)):
        feats = {}
        for i in range(a, min(n, a + PART_SIZE)):
            f = dict(base[i % len(base)])
            f["keypoints"] = f["keypoints"] + rng.random(f["keypoints"].shape, dtype=np.float32)
            feats[f"db/{i:07d}.jpg"] = f
        write_part(folder / f"part_bench_{p:06d}.h5", feats, {"descriptors": dtype, "compression": comp})
    return time.perf_counter() - t


def read_random(args) -> tuple[int, float]:
    index, n, count, seed = args
    store = FeatureStore(index)
    order = np.random.default_rng(seed).choice(n, count, replace=False)
    t = time.perf_counter()
    for i in order:
        store.get(f"db/{i:07d}.jpg")
    store.close()
    return count, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--extractor", choices=sorted(EXTRACTORS), default="sift")
    p.add_argument("--reads", type=int, default=2000, help="random reads per reader")
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_local_store"))
    a = p.parse_args(argv)
    base = real_features(a.extractor)
    kp = np.mean([len(f["keypoints"]) for f in base])
    print(f"{a.extractor}: {kp:.0f} keypoints, {base[0]['descriptors'].shape[1]}-d descriptors per image (real), "
          f"{a.images} images, {a.readers} concurrent readers")
    rows = []
    ctx = mp.get_context("spawn")
    for dtype, comp in OPTIONS:
        folder = a.work / f"{dtype}-{comp}"
        shutil.rmtree(folder, ignore_errors=True)
        w = write_store(folder, base, a.images, dtype, comp)
        size = sum(f.stat().st_size for f in folder.glob("part_*.h5"))
        index = a.work / f"{dtype}-{comp}.json"
        write_json(index, {"folder": str(folder), "images": scan_parts(folder), "errors": {}})
        reads = min(a.reads, a.images)
        _, r1 = read_random((index, a.images, reads, 1))
        with ctx.Pool(a.readers) as pool:
            t = time.perf_counter()
            done = pool.map(read_random, [(index, a.images, reads, 10 + j) for j in range(a.readers)])
            rc = time.perf_counter() - t
        rows.append((dtype, comp, size / a.images * 1000 / 1e6, 1000 * w / a.images, 1000 * r1 / reads,
                     sum(c for c, _ in done) / max(max(s for _, s in done), 1e-9), rc))
        shutil.rmtree(folder, ignore_errors=True)
    ref = rows[0][2]
    print(f"\n{'descriptors':>11s} {'compression':>11s} {'MB/1000 img':>12s} {'size ratio':>10s} {'write s/1000':>12s} "
          f"{'read ms/img':>11s} {f'{a.readers} readers img/s':>17s}")
    for dtype, comp, mb, ws, rms, rate, _ in rows:
        print(f"{dtype:>11s} {comp:>11s} {mb:12.1f} {mb / ref:10.2f} {ws:12.2f} {rms:11.2f} {rate:17.0f}")


if __name__ == "__main__":
    main()
