"""Produce ``tests/fixtures/d2net_reference.npz`` by running the *upstream* D2-Net code.

Usage (with mihaidusmanu/d2-net's ``lib/`` extracted outside this repository)::

    python3 tests/reference/make_d2net_reference.py \\
        --upstream /tmp/d2_ref --out tests/fixtures/d2net_reference.npz

Builds upstream's test-time network (``lib/model_test.py``: ``D2Net(model_file=None,
use_relu=True, use_cuda=False)``), fills its state dict with
:func:`random_state.seeded_state_dict` (no released weights exist here) and loads it
strictly. The photo is read as 8-bit RGB and resized so its longer side is ``--size``
pixels (PIL bilinear, as ``pipeline.images.load_uint8``). Then, as
``extract_features.py`` does it: no resizing (the image is below ``max_edge=1600`` and
``max_sum_edges=2800``; checked), ``preprocess_image(image, preprocessing='caffe')``,
``process_multiscale`` with its default scales ``[.5, 1, 2]`` (``--multiscale``) and once
more with ``scales=[1]`` (the single-scale default, keys ``single_*``), and the columns
swapped from (i, j, scale) to (x, y, scale). The scale factors back to the image are 1.

Stored: ``keypoints`` (x, y, 1 / scale) float32, ``scores`` float32, ``descriptors``
float16 (to keep the file small), the same with the prefix ``single_``, and the settings,
seed, image hash and versions.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, upstream_commit, write_fixture
from random_state import DEFAULT_GAIN, seeded_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "..", "shared")
DEFAULT_IMAGE = os.path.join(SHARED, "fixtures", "pairs", "montmartre_close.jpg")
WEIGHT_SEED = 0
MAX_EDGE, MAX_SUM_EDGES = 1600, 2800  # extract_features.py defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="extracted mihaidusmanu/d2-net code (holding lib/)")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD of --upstream)")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--size", type=int, default=256, help="longer side after resizing")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    from lib.model_test import D2Net  # upstream code
    from lib.pyramid import process_multiscale
    from lib.utils import preprocess_image

    torch.set_grad_enabled(False)
    net = D2Net(model_file=None, use_relu=True, use_cuda=False)
    net.load_state_dict(seeded_state_dict(net.state_dict(), WEIGHT_SEED, gain=DEFAULT_GAIN), strict=True)
    net.eval()
    n_params = sum(p.numel() for p in net.parameters())

    image = load_rgb(args.image, args.size)
    h, w = image.shape[:2]
    assert max(image.shape) <= MAX_EDGE and h + w <= MAX_SUM_EDGES, "extract_features.py would resize"
    batch = torch.tensor(preprocess_image(image, preprocessing="caffe")[None].astype(np.float32))

    out = {}
    for prefix, kwargs in (("", {}), ("single_", {"scales": [1]})):
        keypoints, scores, descriptors = process_multiscale(batch, net, **kwargs)
        keypoints = keypoints[:, [1, 0, 2]]  # i, j -> x, y (extract_features.py)
        print(f"{prefix or 'multiscale_'}: {len(scores)} keypoints, per 1/scale "
              f"{dict(zip(*np.unique(keypoints[:, 2], return_counts=True)))}")
        out[prefix + "keypoints"] = keypoints.astype(np.float32)
        out[prefix + "scores"] = scores.astype(np.float32)
        out[prefix + "descriptors"] = descriptors.astype(np.float16)

    out.update({
        "scales": np.array([0.5, 1.0, 2.0]),
        "preprocessing": np.array("caffe"),
        "weight_seed": np.array(WEIGHT_SEED),
        "gain": np.array(DEFAULT_GAIN),
        "n_params": np.array(n_params),
        "image_name": np.array(os.path.basename(args.image)),
        "resize": np.array(args.size),
        "image_size": np.array([w, h]),
        "image_sha256": np.array(hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()),
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "torch_version": np.array(torch.__version__),
    })
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
