"""Produce ``tests/fixtures/eigenplaces_reference.npz`` by running the *upstream* EigenPlaces code.

Usage (from anywhere, with a checkout of https://github.com/gmberton/EigenPlaces)::

    python3 tests/reference/make_eigenplaces_reference.py \\
        --upstream /path/to/EigenPlaces --out tests/fixtures/eigenplaces_reference.npz

It builds upstream's ``eigenplaces_network.GeoLocalizationNet_`` (what ``hubconf.py``'s
``get_trained_model`` builds before loading the released ``.pth``) for the released
ResNet-50 / 2048-d model. Nothing is downloaded: upstream's ``_get_backbone`` asks
``torch.hub`` for CosPlace's ImageNet-initialised weights, which every run here overwrites,
so ``torch.hub.load`` is replaced by a stub with no weights and the torchvision constructor
by a ``weights=None`` one. The state dict is then filled by
:func:`random_state.seeded_state_dict`. The seeded 8-bit input batch goes through
upstream's test-time transform (``datasets/test_dataset.py``: PIL image -> ``ToTensor`` ->
``Normalize`` with the ImageNet mean/std, no resizing: images at their native size)
and the descriptors are stored in eval mode.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture  # noqa: E402
from random_state import seeded_state_dict  # noqa: E402

#: (backbone, fc_output_dim, weight seed): the released model hubconf.py serves by default
CASES = [("ResNet50", 2048, 2023)]
INPUT_SEED = 77
#: [B, 3, H, W]: not square, to run at a native (unresized) size as upstream's test does
INPUT_SHAPE = (2, 3, 112, 144)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_input(seed: int, shape=INPUT_SHAPE) -> np.ndarray:
    """Two 8-bit images ``[2, 3, H, W]`` of different kinds (pixel noise, and a coarse mosaic
    of 16 px tiles), so that even a randomly weighted network gives them clearly different
    descriptors."""
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (c, h, w), dtype=np.uint8)
    tiles = rng.integers(0, 256, (c, -(-h // 16), -(-w // 16)), dtype=np.uint8)
    mosaic = tiles.repeat(16, axis=1).repeat(16, axis=2)[:, :h, :w]
    assert b == 2
    return np.ascontiguousarray(np.stack([noise, mosaic]))


class _NoWeights(torch.nn.Module):
    """Stands in for the CosPlace model upstream fetches from torch.hub (an empty state dict:
    upstream's shape-matched copy then copies nothing)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout of gmberton/EigenPlaces")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    from eigenplaces_model import eigenplaces_network  # upstream code

    def no_download(backbone_name: str) -> torch.nn.Module:
        return getattr(torchvision.models, backbone_name.lower())(weights=None)

    def no_hub(*a, **k) -> torch.nn.Module:
        return _NoWeights()

    eigenplaces_network._get_torchvision_model = no_download
    torch.hub.load = no_hub

    torch.use_deterministic_algorithms(True)
    # upstream's TestDataset.base_transform (datasets/test_dataset.py)
    base_transform = T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    out: dict[str, np.ndarray] = {
        "backbones": np.array([c[0] for c in CASES]),
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "torch_version": np.array(torch.__version__),
    }
    for backbone, fc_dim, seed in CASES:
        model = eigenplaces_network.GeoLocalizationNet_(backbone, fc_dim).eval()
        model.load_state_dict(seeded_state_dict(model.state_dict(), seed), strict=True)
        u8 = make_input(INPUT_SEED)
        images = torch.stack([base_transform(Image.fromarray(im.transpose(1, 2, 0))) for im in u8])
        with torch.no_grad():
            desc = model(images)
        out[f"{backbone}_input_uint8"] = u8
        out[f"{backbone}_output"] = desc.numpy().astype(np.float32)
        # upstream's key names and shapes: the layout of the released .pth files
        out[f"{backbone}_state_dict"] = np.array([f"{k} {list(v.shape)}" for k, v in model.state_dict().items()])
        out[f"{backbone}_weight_seed"] = np.array(seed)
        out[f"{backbone}_input_seed"] = np.array(INPUT_SEED)
        out[f"{backbone}_fc_output_dim"] = np.array(fc_dim)
        print(f"{backbone}/{fc_dim}: output {tuple(desc.shape)}, norms {desc.norm(dim=1).tolist()}, "
              f"cos(img0, img1) {float(desc[0] @ desc[1]):.4f}")
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
