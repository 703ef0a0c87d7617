"""EigenPlaces global descriptor (Berton et al., ICCV 2023), compatible with gmberton/EigenPlaces.

EigenPlaces changes how the network is trained, not the network: upstream's
``GeoLocalizationNet_`` is CosPlace's (a torchvision backbone cut before its pooling,
then ``L2Norm -> GeM -> Flatten -> Linear -> L2Norm``) with the same submodule names, so the
released ``{backbone}_{fc_output_dim}_eigenplaces.pth`` files (plain state dicts:
``backbone.<i>.…``, ``aggregation.1.p``, ``aggregation.3.weight``/``bias``) load into
:class:`~pipeline.global_features.cosplace.CosPlace`'s modules as they are. This module only
sets the released defaults (ResNet-50, 2048-d) and the backbones upstream offers.

Test-time preprocessing upstream (``datasets/test_dataset.py``): ``ToTensor`` and ImageNet
``Normalize``, no resizing, so ``resize`` defaults to ``None`` (native resolution).
"""

from __future__ import annotations

import logging

import torch

from .cosplace import CosPlace, canonical_backbone

logger = logging.getLogger(__name__)

#: the backbones upstream's network accepts (``CHANNELS_NUM_IN_LAST_CONV``)
BACKBONES = ("ResNet18", "ResNet50", "ResNet101", "ResNet152", "VGG16")
#: released models, backbone -> descriptor sizes (``hubconf.py`` ``AVAILABLE_TRAINED_MODELS``)
RELEASED = {
    "VGG16": (512,),
    "ResNet18": (256, 512),
    "ResNet50": (128, 256, 512, 1024, 2048),
    "ResNet101": (128, 256, 512, 1024, 2048),
}
#: where ``hubconf.py`` downloads them from
RELEASE_URL = ("https://github.com/gmberton/EigenPlaces/releases/download/v1.0/"
               "{backbone}_{fc_output_dim}_eigenplaces.pth")


def release_url(backbone: str = "ResNet50", fc_output_dim: int = 2048) -> str:
    """The URL of a released model (ValueError for a size that was never released)."""
    backbone = canonical_backbone(backbone)
    if int(fc_output_dim) not in RELEASED.get(backbone, ()):
        raise ValueError(f"EigenPlaces: no released {backbone} model with fc_output_dim={fc_output_dim}; "
                         f"released: {RELEASED}")
    return RELEASE_URL.format(backbone=backbone, fc_output_dim=int(fc_output_dim))


class EigenPlaces(CosPlace):
    """CosPlace's network with EigenPlaces' defaults; ``checkpoint``: a released ``.pth``
    (or a training ``best_model.pth``, any layout :func:`~pipeline.checkpoints.read_state_dict`
    reads). Errors from reading the checkpoint name the file and say ``EigenPlaces``."""

    default_conf = {"backbone": "ResNet50", "fc_output_dim": 2048, "checkpoint": None}

    def __init__(self, conf: dict | None = None):
        name = (conf or {}).get("backbone", self.default_conf["backbone"])
        try:
            backbone = canonical_backbone(name)
        except ValueError:
            backbone = None
        if backbone not in BACKBONES:
            raise ValueError(f"EigenPlaces: unknown backbone {name!r}; choose one of {list(BACKBONES)}")
        try:
            super().__init__(conf)
        except (ValueError, FileNotFoundError) as err:
            if str(err).startswith("EigenPlaces"):
                raise
            # the loader is CosPlace's (same network); say which model the file was meant for
            raise type(err)(f"EigenPlaces: {err}") from err


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded, randomly initialised EigenPlaces in the released layout.

    A plain state dict, as ``ResNet50_2048_eigenplaces.pth`` (the keys of upstream's
    ``GeoLocalizationNet_``, float32 tensors, int64 ``num_batches_tracked``); values from
    torchvision's own initialisation after ``torch.manual_seed(seed)`` and GeM's ``p = 3``.
    ``conf`` picks another backbone / size (default: ResNet-50, 2048-d).
    The result is NOT a trained model.
    """
    conf = {k: v for k, v in (conf or {}).items() if k != "checkpoint"}
    torch.manual_seed(seed)
    net = EigenPlaces(conf)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, path)
