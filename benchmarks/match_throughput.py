"""Match-stage throughput: the stage (feature store -> pair store -> view) against the
matcher's batched forward pass alone on the same pairs in memory, and against matching
one pair at a time (the stage before pair blocks: features read per query, one forward
per pair), in one run on the same pairs.

    python benchmarks/match_throughput.py --matcher lightglue
    python benchmarks/match_throughput.py --matcher superglue --device cuda --pairs 2000
    python benchmarks/match_throughput.py --matcher mnn --batch-sizes 1 8 32

Images: crops and rescalings of the real photos in ../shared/fixtures/pairs (so
neighbouring queries share candidates, as in real top-k lists). SuperGlue runs on seeded
random weights (its timing does not depend on them); the others on ../shared/weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.gpus import pick_device  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.local_store import FeatureStore  # noqa: E402
from pipeline.extract_local import extract_local  # noqa: E402
from pipeline.matchers import build_matcher  # noqa: E402
from pipeline.rerank import _host_feats, match_topk  # noqa: E402
from pipeline.topk import TopK, write_topk  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
W = SHARED / "weights"
SETUPS = {
    "lightglue": ({"name": "aliked", "weights": str(W / "aliked-n16.pth"), "max_keypoints": 1024, "resize": 640},
                  {"name": "lightglue", "features": "aliked", "weights": str(W / "aliked_lightglue.pth")}),
    "lighterglue": ({"name": "xfeat", "weights": str(W / "xfeat.pt"), "max_keypoints": 1024, "resize": 640},
                    {"name": "lighterglue", "weights": str(W / "xfeat-lighterglue.pt")}),
    "superglue": ({"name": "superpoint", "weights": str(W / "superpoint_v1_dequant_uint8.pth"),
                   "max_keypoints": 1024, "resize": 640},
                  {"name": "superglue", "weights": None}),
    "mnn": ({"name": "sift", "max_keypoints": 2048, "resize": 640}, {"name": "mnn", "ratio": 0.9}),
}


def make_images(root: Path, n: int) -> list[str]:
    """``n`` views: random crops (60-100 %) of the four photos, saved as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = sorted((SHARED / "fixtures" / "pairs").glob("*.jpg"))
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        w, h = im.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        name = f"img_{i:04d}.jpg"
        im.crop((x, y, x + cw, y + ch)).save(root / name, quality=90)
        names.append(name)
    return names


def topk_of(names: list[str], n_queries: int, k: int) -> TopK:
    """Query i's candidates: a sliding window over the images (neighbours share most of them)."""
    rng = np.random.default_rng(1)
    q = [names[i % len(names)] for i in range(n_queries)]
    cands = []
    for i in range(n_queries):
        start = (i * 3) % len(names)
        row = [names[(start + j) % len(names)] for j in range(k + 1) if names[(start + j) % len(names)] != q[i]][:k]
        cands.append(row)
    d = np.sort(rng.random((n_queries, k)).astype(np.float32), 1)
    return TopK(q, cands, np.zeros((n_queries, k), np.int64), d)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--matcher", choices=sorted(SETUPS), default="lightglue")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[], help="also time the forward at these batch sizes")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ext_conf, match_conf = SETUPS[a.matcher]
    dev = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if match_conf["name"] == "superglue":
            from pipeline.matchers.superglue import write_random_checkpoint

            write_random_checkpoint(tmp / "sg.pth", seed=0)
            match_conf = {**match_conf, "weights": str(tmp / "sg.pth")}
        names = make_images(tmp / "img", a.images)
        topk = topk_of(names, a.queries, a.k)
        write_topk(tmp / "topk.h5", topk)
        write_json(tmp / "feat.json", extract_local(ext_conf, tmp / "img", names, tmp / "local", device=str(dev)))
        pairs = [(q, c) for q, row in zip(topk.query_names, topk.candidate_names) for c in row]
        matcher = build_matcher(match_conf).eval().to(dev)
        store = FeatureStore(tmp / "feat.json")
        mem = {n: {k: v.to(dev) for k, v in _host_feats(store.get(n)).items()} for n in names}
        blocks = [(mem[q], mem[c]) for q, c in pairs]

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        # warm-up: kernels, caches, CUDA context
        matcher.match_block(blocks[: min(8, len(blocks))])
        sync()

        def timed(fn):
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0

        forward_s = timed(lambda: matcher.match_block(blocks))
        extra = {}
        for bs in a.batch_sizes:
            m_bs = build_matcher({**match_conf, "batch_size": bs}).eval().to(dev)
            extra[f"forward_bs{bs}_pairs_per_s"] = round(len(pairs) / timed(lambda: m_bs.match_block(blocks)), 2)

        def pair_at_a_time():  # the stage before pair blocks: per query, read, then one forward per pair
            for qi, q in enumerate(topk.query_names):
                fq = {k: v.to(dev) for k, v in _host_feats(store.get(q)).items()}
                for c in topk.candidate_names[qi]:
                    fc = {k: v.to(dev) for k, v in _host_feats(store.get(c)).items()}
                    {k: v.cpu() for k, v in matcher(fq, fc).items()}

        single_s = timed(pair_at_a_time)
        stage_s = timed(lambda: match_topk(tmp / "feat.json", match_conf, tmp / "topk.h5", a.k, tmp / "m.h5",
                                           device=str(dev), store_base=tmp / "pairs"))
        store.close()
    n = len(pairs)
    print(json.dumps({
        "matcher": a.matcher, "device": str(dev), "torch_threads": torch.get_num_threads(), "pairs": n,
        "batch_size": match_conf.get("batch_size", "auto"),
        "auto_batch": matcher.batch_size(ext_conf["max_keypoints"], ext_conf["max_keypoints"], dev),
        "forward_pairs_per_s": round(n / forward_s, 2), "stage_pairs_per_s": round(n / stage_s, 2),
        "pair_at_a_time_pairs_per_s": round(n / single_s, 2),
        "stage_over_forward": round(forward_s / stage_s, 3), "stage_speedup_over_pair_at_a_time": round(single_s / stage_s, 2),
        **extra,
    }, indent=2))


if __name__ == "__main__":
    main()
