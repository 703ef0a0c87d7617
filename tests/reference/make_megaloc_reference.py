"""Produce ``tests/fixtures/megaloc_reference.npz`` by running the *upstream* MegaLoc code.

Usage (from anywhere, with an extracted copy of https://github.com/gmberton/MegaLoc)::

    python3 tests/reference/make_megaloc_reference.py \\
        --upstream /path/to/MegaLoc --out tests/fixtures/megaloc_reference.npz [--commit SHA]

For each case it builds upstream's ``megaloc_model.MegaLoc(**sizes)`` (self-contained: nothing
is downloaded; the pretrained ``model.safetensors`` is not needed), loads a state dict filled by
:func:`random_state.seeded_state_dict` in upstream's own key layout (that of the released
safetensors file), normalises a seeded 8-bit batch as upstream's evaluation does (``ToTensor``
then ``Normalize`` with the ImageNet mean/std) and stores the descriptors in eval mode. The
input (120 x 165 px) is not a multiple of 14, so upstream's in-``forward`` antialiased resize
(to 126 x 168) is part of what is checked. Image 0 is i.i.d. noise, image 1 blocky (15 px
cells) noise, so the two descriptors differ clearly.

Cases: ``released`` (upstream's default sizes: 64 x 256 clusters + 256 token -> 8448) and
``small`` (the same ViT-B/14 and 64 clusters, ``cluster_dim=32, feat_dim=512``): the released
head's ``Linear(16640, 8448)`` alone has 140 M weights, too slow to seed in CI, so CI checks
``small`` and the ``released`` case is a ``slow`` test.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

import numpy as np
import torch
import torchvision.transforms as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture  # noqa: E402
from random_state import seeded_state_dict  # noqa: E402

#: (case, upstream MegaLoc(**sizes), weight seed)
CASES = [("small", {"feat_dim": 512, "cluster_dim": 32}, 512), ("released", {}, 8448)]
INPUT_SEED = 123
INPUT_SHAPE = (2, 3, 120, 165)
BLOCK = 15
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout / extracted archive of gmberton/MegaLoc")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    from megaloc_model import MegaLoc  # upstream code

    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(INPUT_SEED)
    n, c, h, w = INPUT_SHAPE
    u8 = rng.integers(0, 256, INPUT_SHAPE, dtype=np.uint8)
    cells = rng.integers(0, 256, (c, -(-h // BLOCK), -(-w // BLOCK)), dtype=np.uint8)
    u8[1] = cells.repeat(BLOCK, 1).repeat(BLOCK, 2)[:, :h, :w]
    images = torch.from_numpy(u8).float().div(255)  # what ToTensor does to 8-bit RGB
    normalized = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)(images)
    out: dict[str, np.ndarray] = {
        "cases": np.array([case for case, _, _ in CASES]),
        "input_uint8": u8,
        "input_seed": np.array(INPUT_SEED),
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "torch_version": np.array(torch.__version__),
    }
    for case, sizes, seed in CASES:
        model = MegaLoc(**sizes).eval()
        model.load_state_dict(seeded_state_dict(model.state_dict(), seed), strict=True)
        with torch.no_grad():
            desc = model(normalized)
        print(f"MegaLoc {case} {sizes}: output {tuple(desc.shape)}, norms {desc.norm(dim=1).tolist()}")
        out[f"{case}_output"] = desc.numpy().astype(np.float32)
        out[f"{case}_weight_seed"] = np.array(seed)
        for key in ("feat_dim", "num_clusters", "cluster_dim", "token_dim", "mlp_dim"):
            out[f"{case}_{key}"] = np.array(sizes.get(key, _default(MegaLoc, key)))
        del model
    write_fixture(args.out, out)


def _default(cls, name: str) -> int:
    """The default of ``cls.__init__``'s argument ``name`` (upstream's released sizes)."""
    return int(inspect.signature(cls.__init__).parameters[name].default)


if __name__ == "__main__":
    main()
