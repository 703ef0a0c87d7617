"""Produce ``tests/fixtures/cosplace_reference.npz`` by running the *upstream* CosPlace code.

Usage (from anywhere, with a checkout of https://github.com/gmberton/CosPlace)::

    python3 tests/reference/make_cosplace_reference.py \\
        --upstream /path/to/CosPlace --out tests/fixtures/cosplace_reference.npz

For each backbone it builds upstream's ``GeoLocalizationNet`` (ImageNet weights are
not downloaded: upstream's ``get_pretrained_torchvision_model`` is replaced by a
``weights=None`` constructor, since every weight is overwritten anyway), loads a
state dict filled by :func:`random_state.seeded_state_dict`, normalises a seeded
8-bit input batch the way upstream's ``TestDataset`` does (``ToTensor`` then
``Normalize`` with the ImageNet mean/std) and stores the descriptors in eval mode.

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture  # noqa: E402
from random_state import seeded_state_dict  # noqa: E402

#: (backbone, fc_output_dim, weight seed)
CASES = [("ResNet18", 512, 18), ("ResNet50", 512, 50)]
INPUT_SEED = 123
INPUT_SHAPE = (2, 3, 96, 128)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout of gmberton/CosPlace")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    from cosplace_model import cosplace_network  # upstream code

    def no_download(backbone_name: str) -> torch.nn.Module:
        return getattr(torchvision.models, backbone_name.lower())(weights=None)

    cosplace_network.get_pretrained_torchvision_model = no_download

    torch.use_deterministic_algorithms(True)
    normalize = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out: dict[str, np.ndarray] = {
        "backbones": np.array([c[0] for c in CASES]),
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "torch_version": np.array(torch.__version__),
    }
    for backbone, fc_dim, seed in CASES:
        model = cosplace_network.GeoLocalizationNet(backbone, fc_dim).eval()
        model.load_state_dict(seeded_state_dict(model.state_dict(), seed), strict=True)
        u8 = np.random.default_rng(INPUT_SEED).integers(0, 256, INPUT_SHAPE, dtype=np.uint8)
        images = torch.from_numpy(u8).float().div(255)  # what ToTensor does to 8-bit RGB
        with torch.no_grad():
            desc = model(normalize(images))
        out[f"{backbone}_input_uint8"] = u8
        out[f"{backbone}_output"] = desc.numpy().astype(np.float32)
        out[f"{backbone}_weight_seed"] = np.array(seed)
        out[f"{backbone}_input_seed"] = np.array(INPUT_SEED)
        out[f"{backbone}_fc_output_dim"] = np.array(fc_dim)
        print(f"{backbone}: output {tuple(desc.shape)}, norms {desc.norm(dim=1).tolist()}")
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
