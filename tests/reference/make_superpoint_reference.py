"""Produce ``tests/fixtures/superpoint_reference.npz`` by running the *upstream* SuperPoint.

Usage (with a copy of https://github.com/magicleap/SuperGluePretrainedNetwork; its
``models/weights/*.pth`` files are not needed)::

    python3 tests/reference/make_superpoint_reference.py \\
        --upstream /path/to/SuperGluePretrainedNetwork \\
        --out tests/fixtures/superpoint_reference.npz

It builds upstream's ``models.superpoint.SuperPoint`` (the SuperPoint the SuperGlue
code runs) with ``max_keypoints=500`` and the other settings at upstream's defaults
(``nms_radius=4, keypoint_threshold=0.005, remove_borders=4``), and once more with
``max_keypoints=100`` (keys ``small_*``): fewer than are detected, so the top-k
selection is exercised too. Upstream's
constructor loads the hard-coded ``models/weights/superpoint_v1.pth``; while it runs,
``torch.load`` is redirected to ``--weights`` (the de-quantised ``superpoint_v1`` copy
in ``../shared/weights``), and the same state dict is then loaded strictly once more.

The input image is defined here and must be rebuilt the same way by the test:

1. ``PIL.Image.open(--image).convert("RGB")`` (8-bit RGB);
2. resized with ``PIL.Image.BILINEAR`` so that the longer side is ``--resize`` (320)
   pixels, the other side ``round(side * 320 / longer)``;
   this is ``pipeline.images.load_uint8(path, resize=320)``;
3. converted to float ``/ 255`` and to grey as ``0.299 R + 0.587 G + 0.114 B``
   in float32, in that order of operations (BT.601 luma, as OpenCV's RGB2GRAY).

The sha256 of the resized 8-bit RGB pixels is stored so that a test on a machine whose
JPEG decoder differs can tell that apart from a model difference.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, upstream_commit  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = REPO.parent / "shared" / "fixtures" / "pairs" / "montmartre_close.jpg"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "superpoint_v1_dequant_uint8.pth"
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def to_gray(rgb: np.ndarray) -> torch.Tensor:
    """Step 3: ``[1, 1, H, W]`` float32 grey in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    r, g, b = GRAY_WEIGHTS
    return (r * x[0] + g * x[1] + b * x[2])[None, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of magicleap/SuperGluePretrainedNetwork")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="superpoint_v1 state dict")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--resize", type=int, default=320, help="longer image side in pixels")
    ap.add_argument("--max-keypoints", type=int, default=500)
    ap.add_argument("--max-keypoints-small", type=int, default=100,
                    help="a second run with fewer keypoints than detected, so top-k is exercised")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    from models import superpoint as upstream  # upstream code

    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    real_load = torch.load

    def redirected_load(f, *a, **kw):
        if Path(str(f)).name != "superpoint_v1.pth":
            return real_load(f, *a, **kw)
        return real_load(args.weights, map_location="cpu", weights_only=True)

    rgb = load_rgb(args.image, args.resize)
    gray = to_gray(rgb)
    runs = {}
    for prefix, max_kp in [("", args.max_keypoints), ("small_", args.max_keypoints_small)]:
        with mock.patch.object(upstream.torch, "load", redirected_load):
            net = upstream.SuperPoint({"max_keypoints": max_kp})
        net.load_state_dict(state, strict=True)
        net.eval()
        with torch.no_grad():
            pred = net({"image": gray})
        # keypoints (x, y): in raster order when all are kept, else by score (torch.topk)
        runs[prefix + "keypoints"] = pred["keypoints"][0].numpy().astype(np.float32)
        runs[prefix + "scores"] = pred["scores"][0].numpy().astype(np.float32)
        runs[prefix + "descriptors"] = pred["descriptors"][0].t().numpy().astype(np.float16)  # [N, 256]
        runs[prefix + "max_keypoints"] = max_kp
        runs[prefix + "config"] = repr(net.config)
        print(f"image {rgb.shape[1]}x{rgb.shape[0]}: {len(runs[prefix + 'keypoints'])} keypoints, config {net.config}")

    np.savez_compressed(
        args.out,
        **runs,
        image_name=os.path.basename(args.image),
        image_shape=np.array(rgb.shape),
        image_sha256=hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest(),
        resize=args.resize,
        gray_weights=np.array(GRAY_WEIGHTS),
        weights_sha256=hashlib.sha256(Path(args.weights).read_bytes()).hexdigest(),
        upstream_commit=args.commit or upstream_commit(args.upstream),
        torch_version=torch.__version__,
    )
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
