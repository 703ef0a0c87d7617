"""Produce ``tests/fixtures/mixvpr_reference.npz`` by running the *upstream* MixVPR code.

Usage (from anywhere, with a checkout of https://github.com/amaralibey/MixVPR)::

    python3 tests/reference/make_mixvpr_reference.py \\
        --upstream /path/to/MixVPR --out tests/fixtures/mixvpr_reference.npz

It builds upstream's ``main.VPRModel`` exactly as the README / ``demo.py`` ``load_model`` do
for the released ``resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt`` (``resnet50``,
``layers_to_crop=[4]``, MixVPR aggregator with in_channels 1024, in_h = in_w = 20,
out_channels 1024, mix_depth 4, mlp_ratio 1, out_rows 4), except ``pretrained=False``: no
ImageNet download, every weight is overwritten by :func:`random_state.seeded_state_dict`.
The training-only imports of ``main.py`` (pytorch_lightning, pytorch_metric_learning via
``utils``, the GSV-Cities data module, timm via ``models.backbones``) are stubbed in
``sys.modules``; none of them holds a tensor of the model (``VPRModel.state_dict()`` is
``backbone.*`` + ``aggregator.*`` either way). The seeded 8-bit images are written as PNG
files and read back through upstream's own ``demo.load_image`` (PIL ``Resize((320, 320),
BICUBIC)`` -> ``ToTensor`` -> ``Normalize`` with the ImageNet mean/std); they are already
320 x 320, so the resize leaves the pixels unchanged (checked) and our model can be fed the
same pixels. Descriptors are stored in eval mode.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture  # noqa: E402
from random_state import seeded_state_dict  # noqa: E402

#: the released 4096-d model (README "Weights" table, demo.py load_model)
AGG_CONFIG = {"in_channels": 1024, "in_h": 20, "in_w": 20, "out_channels": 1024,
              "mix_depth": 4, "mlp_ratio": 1, "out_rows": 4}
WEIGHT_SEED = 2303
INPUT_SEED = 320
IMAGE_SIZE = 320
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_input(seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Two 8-bit images ``[2, 3, size, size]``: a mosaic of 4 px tiles and one of 16 px tiles
    (tiles keep the fixture small once compressed, and the two kinds give clearly different
    descriptors even with random weights)."""
    rng = np.random.default_rng(seed)
    out = []
    for tile in (4, 16):
        cells = rng.integers(0, 256, (3, size // tile, size // tile), dtype=np.uint8)
        out.append(cells.repeat(tile, axis=1).repeat(tile, axis=2))
    return np.ascontiguousarray(np.stack(out))


def _stub_training_imports() -> None:
    """Modules ``main.py`` / ``models`` import for training only."""

    class LightningModule(torch.nn.Module):
        def save_hyperparameters(self, *a, **k):
            pass

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = LightningModule
    callbacks = types.ModuleType("pytorch_lightning.callbacks")
    callbacks.Callback = callbacks.ModelCheckpoint = object
    pl.callbacks = callbacks
    utils = types.ModuleType("utils")  # losses (pytorch_metric_learning), validation (faiss)
    utils.get_loss = utils.get_miner = lambda *a, **k: None
    dataloaders = types.ModuleType("dataloaders")
    gsv = types.ModuleType("dataloaders.GSVCitiesDataloader")
    gsv.GSVCitiesDataModule = object
    timm = types.ModuleType("timm")  # efficientnet / swin backbones only
    sys.modules.update({
        "pytorch_lightning": pl, "pytorch_lightning.callbacks": callbacks, "utils": utils,
        "dataloaders": dataloaders, "dataloaders.GSVCitiesDataloader": gsv, "timm": timm,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout of amaralibey/MixVPR")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    _stub_training_imports()
    sys.path.insert(0, os.path.abspath(args.upstream))
    from demo import load_image  # upstream code: the test-time transform
    from main import VPRModel  # upstream code

    torch.use_deterministic_algorithms(True)
    model = VPRModel(backbone_arch="resnet50", pretrained=False, layers_to_crop=[4],
                     agg_arch="MixVPR", agg_config=dict(AGG_CONFIG)).eval()
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.model.", "aggregator.")) for k in keys), keys[:5]
    assert not any(k.startswith("backbone.model.layer4.") for k in keys)
    model.load_state_dict(seeded_state_dict(model.state_dict(), WEIGHT_SEED), strict=True)

    u8 = make_input(INPUT_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, im in enumerate(u8):
            paths.append(os.path.join(tmp, f"{i}.png"))
            Image.fromarray(im.transpose(1, 2, 0)).save(paths[-1])
        images = torch.stack([load_image(p) for p in paths])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected_input = (torch.from_numpy(u8).float().div(255) - mean) / std
    assert torch.equal(images, expected_input), "upstream's transform changed the 320x320 pixels"
    with torch.no_grad():
        desc = model(images)
    print(f"output {tuple(desc.shape)}, norms {desc.norm(dim=1).tolist()}, "
          f"cos(img0, img1) {float(desc[0] @ desc[1]):.4f}, "
          f"max |d0 - d1| {float((desc[0] - desc[1]).abs().max()):.3g}")
    write_fixture(args.out, {
        "input_uint8": u8,
        "output": desc.numpy().astype(np.float32),
        # upstream's key names and shapes: the layout of the released file
        "state_dict": np.array([f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]),
        "weight_seed": np.array(WEIGHT_SEED),
        "input_seed": np.array(INPUT_SEED),
        **{f"agg_{k}": np.array(v) for k, v in AGG_CONFIG.items()},
        "upstream_commit": np.array(args.commit or upstream_commit(args.upstream)),
        "torch_version": np.array(torch.__version__),
    })


if __name__ == "__main__":
    main()
