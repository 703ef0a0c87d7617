"""Produce ``tests/fixtures/r2d2_reference.npz`` by running the *upstream* naver/r2d2 code.

Usage (with the upstream code extracted outside this repository)::

    python3 tests/reference/make_r2d2_reference.py \\
        --upstream /tmp/r2d2_ref --commit <upstream commit> \\
        --out tests/fixtures/r2d2_reference.npz

It loads the real checkpoint ``r2d2_WASF_N16.pt`` with upstream's ``load_network``
(``extract.py``), reads the photo with PIL, resizes it so its longer side is ``--size``
pixels (``PIL.Image.resize(..., BILINEAR)``, what ``pipeline.images.load_tensor`` does),
normalises it with upstream's ``norm_RGB`` and runs upstream's ``extract_multiscale``
with its ``NonMaxSuppression`` and default arguments (scale_f 2**0.25, min_size 256,
max_size 1024, min_scale 0, max_scale 1, thresholds 0.7 / 0.7). The ``--top-k``
best keypoints are kept as upstream's ``extract_keypoints`` does
(``scores.argsort()[-top_k:]``, so in increasing score order).

Stored: ``keypoints`` (x, y, scale) float32, ``descriptors`` float16 (to keep the
file small), ``scores`` float32, plus the settings and versions.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "..", "shared")
DEFAULT_IMAGE = os.path.join(SHARED, "fixtures", "pairs", "montmartre_close.jpg")
DEFAULT_WEIGHTS = os.path.join(SHARED, "weights", "r2d2_WASF_N16.pt")
# upstream's extract.py defaults
SETTINGS = {"scale_f": 2**0.25, "min_scale": 0.0, "max_scale": 1.0, "min_size": 256, "max_size": 1024}
THRESHOLDS = {"rel_thr": 0.7, "rep_thr": 0.7}


def resized(path: str, size: int) -> Image.Image:
    """The RGB image with its longer side ``size`` px (PIL bilinear), as load_tensor does."""
    with Image.open(path) as im:
        img = np.array(im.convert("RGB"))
    h, w = img.shape[:2]
    scale = size / max(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    return Image.fromarray(img).resize((tw, th), Image.BILINEAR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="extracted naver/r2d2 code")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default="unknown", help="upstream commit to record")
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--size", type=int, default=320, help="longer side after resizing")
    ap.add_argument("--top-k", type=int, default=500)
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    import extract  # upstream code
    from tools.dataloader import norm_RGB

    torch.set_grad_enabled(False)
    net = extract.load_network(args.weights)
    detector = extract.NonMaxSuppression(**THRESHOLDS)
    pil = resized(args.image, args.size)
    W, H = pil.size
    img = norm_RGB(pil)[None]
    xys, desc, scores = extract.extract_multiscale(net, img, detector, verbose=True, **SETTINGS)
    xys, desc, scores = xys.numpy(), desc.numpy(), scores.numpy()
    idxs = scores.argsort()[-args.top_k or None:]
    print(f"{len(scores)} detections, kept {len(idxs)}; score range {scores[idxs].min():.4f}..{scores[idxs].max():.4f}")
    out = {
        "keypoints": xys[idxs].astype(np.float32),
        "descriptors": desc[idxs].astype(np.float16),
        "scores": scores[idxs].astype(np.float32),
        "n_detections": np.array(len(scores)),
        "image": np.array(os.path.basename(args.image)),
        "image_size": np.array([W, H]),
        "resize": np.array(args.size),
        "top_k": np.array(args.top_k),
        "upstream_commit": np.array(args.commit),
        "torch_version": np.array(torch.__version__),
        **{k: np.array(v) for k, v in {**SETTINGS, **THRESHOLDS}.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
