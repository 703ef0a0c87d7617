"""Produce ``tests/fixtures/boq_reference.npz`` by running the *upstream* Bag-of-Queries code.

Usage (from anywhere, with extracted copies of https://github.com/amaralibey/Bag-of-Queries and
https://github.com/facebookresearch/dinov2)::

    python3 tests/reference/make_boq_reference.py --upstream /path/to/Bag-of-Queries \\
        --dinov2 /path/to/dinov2 --out tests/fixtures/boq_reference.npz \\
        [--commit SHA] [--dinov2-commit SHA]

Both released variants are built by upstream's own ``hubconf.get_trained_boq(backbone_name,
output_dim)`` (so its channel projection, query count, layer count and ``row_dim`` are the ones
checked), with nothing downloaded: the ResNet-50 is built with ``pretrained=False`` (torchvision
``resnet50(weights=None)``), ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')`` is
redirected to the local dinov2 copy with ``pretrained=False``, and the released weights' download
is skipped (the URL hubconf asks for is recorded). Each model then loads a state dict filled by
:func:`random_state.seeded_state_dict` (upstream's own key layout, that of the released files).

Inputs go through the README's test transform (``ToTensor -> Resize(size, BICUBIC,
antialias=True) -> Normalize``) and upstream's eval-mode forward; the descriptor (the first of
upstream's ``(descriptor, attentions)``) is stored:

* ``resnet50``: 2 seeded images of 160 x 224 px at ``size = (160, 224)`` (the resize is the
  identity): the network itself, small enough for a fast test;
* ``resnet50_default``: 1 seeded 48 x 64 image at the released ``size = (384, 384)``: the
  bicubic upsampling is part of what is checked (only the first 4096 of the 16384 values are
  stored, to keep the fixture small; all of them depend on the whole image);
* ``dinov2``: 2 seeded images of 98 x 140 px (7 x 10 patches, so the position embeddings are
  interpolated from 37 x 37) at ``size = (98, 140)``.

The 2-image inputs are 8-bit noise in 7 x 7 px blocks (they compress; the network sees strong
edges and flat patches alike). Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys

import numpy as np
import torch
import torchvision.transforms as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture  # noqa: E402
from random_state import seeded_state_dict  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
INPUT_SEED = 123
BLOCK = 7
#: case -> (backbone_name, output_dim, weight seed, input shape [B, 3, H, W], transform size,
#: values stored, blocky input)
CASES = {
    "resnet50": ("resnet50", 16384, 50, (2, 3, 160, 224), (160, 224), None, True),
    "resnet50_default": ("resnet50", 16384, 50, (1, 3, 48, 64), (384, 384), 4096, False),
    "dinov2": ("dinov2", 12288, 14, (2, 3, 98, 140), (98, 140), None, True),
}
_SKIP = object()


def seeded_images(shape, seed: int, blocky: bool) -> np.ndarray:
    """``uint8 [B, 3, H, W]``: seeded noise, in ``BLOCK x BLOCK`` blocks if ``blocky``."""
    rng = np.random.default_rng(seed)
    b, c, h, w = shape
    if not blocky:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    small = rng.integers(0, 256, (b, c, -(-h // BLOCK), -(-w // BLOCK)), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(BLOCK, 2).repeat(BLOCK, 3)[:, :, :h, :w])


def readme_transform(size) -> T.Compose:
    """upstream README's ``input_transform(image_size)``."""
    return T.Compose([
        T.ToTensor(),
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def load_hubconf(upstream: str, dinov2: str, urls: list):
    """upstream's hubconf module with downloads disabled (see the module docstring)."""
    spec = importlib.util.spec_from_file_location("boq_hubconf", os.path.join(upstream, "hubconf.py"))
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)  # puts upstream's src/ on sys.path, imports backbones and boq

    import backbones  # upstream src/backbones.py (the module hubconf imported)

    hub.ResNet = functools.partial(backbones.ResNet, pretrained=False)
    hub_load = torch.hub.load

    def local_dinov2(repo, name, *args, **kwargs):
        if repo != "facebookresearch/dinov2":
            raise RuntimeError(f"unexpected torch.hub.load({repo!r}, {name!r})")
        return hub_load(dinov2, name, *args, source="local", pretrained=False, **kwargs)

    def no_download(url, *args, **kwargs):
        urls.append(url)
        return _SKIP

    class VPRModel(hub.VPRModel):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is _SKIP:  # hubconf's load of the released file: weights come later
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    torch.hub.load = local_dinov2
    torch.hub.load_state_dict_from_url = no_download
    hub.VPRModel = VPRModel
    return hub


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="extracted amaralibey/Bag-of-Queries")
    ap.add_argument("--dinov2", required=True, help="extracted facebookresearch/dinov2")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="Bag-of-Queries commit to record (default: git HEAD)")
    ap.add_argument("--dinov2-commit", default=None, help="dinov2 commit to record (default: git HEAD)")
    args = ap.parse_args()

    urls: list[str] = []
    hub = load_hubconf(os.path.abspath(args.upstream), os.path.abspath(args.dinov2), urls)
    torch.use_deterministic_algorithms(True)
    out: dict[str, np.ndarray] = {
        "cases": np.array(list(CASES)),
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "dinov2_commit": np.array(args.dinov2_commit or upstream_commit(args.dinov2)),
        "torch_version": np.array(torch.__version__),
    }
    models = {}
    for case, (backbone, dim, seed, shape, size, keep, blocky) in CASES.items():
        if (backbone, dim) not in models:
            model = hub.get_trained_boq(backbone_name=backbone, output_dim=dim).eval()
            model.load_state_dict(seeded_state_dict(model.state_dict(), seed), strict=True)
            models[backbone, dim] = model
            out[f"{backbone}_url"] = np.array(urls[-1])
        model = models[backbone, dim]
        u8 = seeded_images(shape, INPUT_SEED, blocky)
        transform = readme_transform(size)
        # ToTensor takes an H x W x 3 uint8 image (what PIL's np.array gives)
        batch = torch.stack([transform(np.ascontiguousarray(im.transpose(1, 2, 0))) for im in u8])
        with torch.no_grad():
            desc, attns = model(batch)
        desc = desc.numpy().astype(np.float32)
        print(f"{case}: input {tuple(batch.shape)}, output {desc.shape}, norms {np.linalg.norm(desc, axis=1)}, "
              f"{len(attns)} attention maps {tuple(attns[0].shape)}")
        out[f"{case}_input_uint8"] = u8
        out[f"{case}_output"] = desc if keep is None else desc[:, :keep]
        out[f"{case}_backbone"] = np.array(backbone)
        out[f"{case}_output_dim"] = np.array(dim)
        out[f"{case}_weight_seed"] = np.array(seed)
        out[f"{case}_input_seed"] = np.array(INPUT_SEED)
        out[f"{case}_size"] = np.array(size)
    print("released weight URLs hubconf asked for:", urls)
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
