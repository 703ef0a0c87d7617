"""Produce ``tests/fixtures/salad_reference.npz`` by running the *upstream* SALAD code.

Usage (from anywhere; extracted copies of https://github.com/serizba/salad, of
https://github.com/facebookresearch/dinov2 and, for the resize wrapper, of
https://github.com/gmberton/VPR-methods-evaluation)::

    python3 tests/reference/make_salad_reference.py \\
        --upstream /path/to/salad --dinov2 /path/to/dinov2 \\
        --vpr-eval /path/to/VPR-methods-evaluation \\
        --out tests/fixtures/salad_reference.npz [--commit SHA]

Builds upstream's ``vpr_model.VPRModel`` exactly as upstream's ``eval.py`` ``load_model`` /
``hubconf.dinov2_salad`` do (``dinov2_vitb14`` backbone with ``num_trainable_blocks=4,
return_token=True, norm_layer=True``; ``SALAD`` with 768 channels, 64 clusters of 128, a 256
token). Nothing is downloaded: the backbone's ``torch.hub.load('facebookresearch/dinov2',
'dinov2_vitb14')`` is redirected to ``torch.hub.load(<--dinov2>, 'dinov2_vitb14',
source='local', pretrained=False)``, and the training-only imports (``pytorch_lightning``,
``pytorch_metric_learning``) are stubbed: ``LightningModule`` becomes ``nn.Module`` and the
loss / miner (parameter-free in pytorch_metric_learning) plain objects, so the model's state
dict is exactly the released ``dino_salad.ckpt``'s keys (``backbone.model.*``, ``aggregator.*``).
It is filled by :func:`random_state.seeded_state_dict`; a seeded 8-bit batch (image 0 i.i.d.
noise, image 1 blocky noise, 120 x 165 px) is turned into tensors as upstream's ``eval.py``
does (``ToTensor``, ImageNet ``Normalize``) and described in eval mode:

* ``native``: the batch cropped to 112 x 154 (multiples of 14) straight into ``VPRModel``;
* ``wrapped``: the whole 120 x 165 batch through VPR-methods-evaluation's
  ``ResizingWrapper(model, 'dino_v2_resize')`` (resized to 126 x 168), how that repo runs SALAD.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np
import torch
import torchvision.transforms as T
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture  # noqa: E402
from random_state import seeded_state_dict  # noqa: E402

WEIGHT_SEED = 322
INPUT_SEED = 123
INPUT_SHAPE = (2, 3, 120, 165)
NATIVE_CROP = (112, 154)
BLOCK = 15
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def stub_training_imports() -> None:
    """pytorch_lightning / pytorch_metric_learning are only needed for training."""

    class LightningModule(nn.Module):
        def save_hyperparameters(self, *args, **kwargs):
            pass

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = LightningModule
    sys.modules["pytorch_lightning"] = pl

    class Placeholder:  # pml losses / miners / distances: no parameters, no buffers
        def __init__(self, *args, **kwargs):
            pass

    pml = types.ModuleType("pytorch_metric_learning")
    for sub in ("losses", "miners", "distances"):
        mod = types.ModuleType(f"pytorch_metric_learning.{sub}")
        mod.__getattr__ = lambda name: Placeholder
        setattr(pml, sub, mod)
        sys.modules[mod.__name__] = mod
    sys.modules["pytorch_metric_learning"] = pml


def redirect_hub(dinov2_dir: str) -> None:
    real_load = torch.hub.load

    def load(repo, model, *args, **kwargs):
        if repo == "facebookresearch/dinov2":
            return real_load(dinov2_dir, model, source="local", pretrained=False)
        return real_load(repo, model, *args, **kwargs)

    torch.hub.load = load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout / extracted archive of serizba/salad")
    ap.add_argument("--dinov2", required=True, help="checkout / extracted archive of facebookresearch/dinov2")
    ap.add_argument("--vpr-eval", required=True, help="checkout of gmberton/VPR-methods-evaluation")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="salad commit to record (default: git HEAD)")
    ap.add_argument("--dinov2-commit", default=None, help="dinov2 commit to record (default: git HEAD)")
    ap.add_argument("--vpr-eval-commit", default=None, help="VPR-methods-evaluation commit (default: git HEAD)")
    args = ap.parse_args()

    stub_training_imports()
    redirect_hub(os.path.abspath(args.dinov2))
    sys.path.insert(0, os.path.abspath(args.upstream))
    from vpr_model import VPRModel  # upstream code

    sys.path.insert(0, os.path.join(os.path.abspath(args.vpr_eval), "vpr_models"))
    from resizing_wrapper import ResizingWrapper  # VPR-methods-evaluation

    torch.use_deterministic_algorithms(True)
    model = VPRModel(  # upstream eval.py load_model / hubconf.dinov2_salad
        backbone_arch="dinov2_vitb14",
        backbone_config={"num_trainable_blocks": 4, "return_token": True, "norm_layer": True},
        agg_arch="SALAD",
        agg_config={"num_channels": 768, "num_clusters": 64, "cluster_dim": 128, "token_dim": 256},
    ).eval()
    model.load_state_dict(seeded_state_dict(model.state_dict(), WEIGHT_SEED), strict=True)

    rng = np.random.default_rng(INPUT_SEED)
    n, c, h, w = INPUT_SHAPE
    u8 = rng.integers(0, 256, INPUT_SHAPE, dtype=np.uint8)
    cells = rng.integers(0, 256, (c, -(-h // BLOCK), -(-w // BLOCK)), dtype=np.uint8)
    u8[1] = cells.repeat(BLOCK, 1).repeat(BLOCK, 2)[:, :h, :w]
    images = torch.from_numpy(u8).float().div(255)  # what ToTensor does to 8-bit RGB
    normalized = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)(images)
    ch, cw = NATIVE_CROP
    with torch.no_grad():
        native = model(normalized[:, :, :ch, :cw])
        wrapped = ResizingWrapper(model, resize_type="dino_v2_resize")(normalized)
    for name, desc in (("native", native), ("wrapped", wrapped)):
        print(f"SALAD {name}: output {tuple(desc.shape)}, norms {desc.norm(dim=1).tolist()}")
    write_fixture(args.out, {
        "input_uint8": u8,
        "native_crop": np.array(NATIVE_CROP),
        "native_output": native.numpy().astype(np.float32),
        "wrapped_output": wrapped.numpy().astype(np.float32),
        "weight_seed": np.array(WEIGHT_SEED),
        "input_seed": np.array(INPUT_SEED),
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "dinov2_commit": np.array(args.dinov2_commit or upstream_commit(args.dinov2)),
        "vpr_eval_commit": np.array(args.vpr_eval_commit or upstream_commit(args.vpr_eval)),
        "torch_version": np.array(torch.__version__),
    })


if __name__ == "__main__":
    main()
