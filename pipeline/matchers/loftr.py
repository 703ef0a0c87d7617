"""LoFTR (Sun et al., CVPR 2021), outdoor model, on kornia's implementation.

LoFTR matches two images without a detector (zju3dv/LoFTR ``src/loftr``; kornia's
``kornia.feature.LoFTR`` is a port with the same parameter names):

* ``backbone``: a ResNet-FPN on the grey image gives a coarse map (1/8 resolution, 256
  channels) and a fine map (1/2 resolution, 128 channels);
* ``pos_encoding``: a 2-D sine encoding is added to the coarse map. The released
  ``outdoor_ds.ckpt`` was trained with the original ("buggy") frequencies, upstream's
  ``TEMP_BUG_FIX = False`` (``configs/loftr/outdoor/buggy_pos_enc/loftr_ds.py``, the config
  of ``scripts/reproduce_test/outdoor_ds.sh``); kornia's default for ``outdoor``;
* ``loftr_coarse``: 4 x (self, cross) linear-attention transformer layers (8 heads);
* ``coarse_matching``: dual-softmax over the coarse similarity ``<f0, f1> / 256 / 0.1``;
  matches are the mutual maxima with probability above ``match_threshold`` (0.2), away
  from a 2-cell border;
* ``fine_preprocess``/``loftr_fine``/``fine_matching``: a 5x5 window of the fine map around
  each coarse match, one (self, cross) layer, and the expectation of a softmax heat map
  refines the position in image 1; image 0 keeps the coarse cell position ``8 * (col,
  row)``.

Test time as the authors run outdoor matching (``notebooks/demo_single_pair.ipynb``, outdoor
part, and the MegaDepth loader ``read_megadepth_gray`` of the outdoor evaluation):

* grey input in [0, 1]. The pipeline hands us RGB in [0, 1]; we take the ITU-R BT.601 luma
  ``0.299 R + 0.587 G + 0.114 B`` (OpenCV's ``RGB2GRAY``, the JPEG luma that upstream's
  ``cv2.imread(..., IMREAD_GRAYSCALE)`` returns), in float, without rounding to 8 bits;
* the longer side is ``resize`` px (840: ``MGDPT_IMG_RESIZE`` of upstream's MegaDepth test
  config ``configs/data/megadepth_test_1500.py``); the pipeline does this resize (PIL
  bilinear) before :meth:`LoFTR.prepare`;
* both sides are then resized (bilinear, like ``cv2.resize``) to the multiple of 8 below
  (``w // 8 * 8``, upstream's ``get_divisible_wh`` and the demo), and the keypoints are scaled
  back by ``(w / w8, h / h8)``, as upstream's ``scale0`` / ``scale1``, so they are in pixels of
  the image given to :meth:`prepare`. Upstream's MegaDepth loader also zero-pads each image
  to a square (with a mask) to batch pairs; we batch only candidates of one size, unpadded;
* coarse threshold 0.2, dual-softmax temperature 0.1, border 2 cells (upstream defaults).

Keypoints are in pixels of the images given to :meth:`prepare` (upstream's numbers): image-0
points sit on ``8 * cell * scale0``. The match stage maps them to the original photos' pixels
(``pipeline.rerank``), like every extractor's keypoints.
The confidence of a match is its coarse dual-softmax probability.

Weights: the official ``outdoor_ds.ckpt`` (Google Drive link in zju3dv/LoFTR's README) is a
Lightning checkpoint ``{'state_dict': {'matcher.backbone.conv1.weight': ..., ...}, 'epoch':
..., ...}``; kornia's hosted ``loftr_outdoor.ckpt`` has the same ``state_dict``. Keys starting
with ``matcher.`` (the Lightning module's attribute) lose that prefix, as upstream's and
kornia's ``LoFTR.load_state_dict`` do; a plain state dict (e.g. kornia's
``LoFTR().state_dict()``) loads as is. LoFTR-OT files (``coarse_matching.bin_score``) and
other variants are refused with the offending keys named. Nothing is ever downloaded.

On GPU, PyTorch's default TF32 convolutions (``torch.backends.cudnn.allow_tf32``) perturb the
backbone slightly; we leave that global setting alone (see ``tests/reference/README_loftr.md``).

:meth:`LoFTR.prepare` converts each image to grey once (the pipeline caches it per image);
:meth:`LoFTR._forward_many` runs the query's backbone once for all its candidates, and
candidates of one size as a batch of ``batch_size`` (``auto``: one at a time on a CPU, where
batches gain nothing; on a GPU as many as :meth:`LoFTR.pair_bytes_image` says fit a share of
the free memory). Caching
backbone maps per image in ``prepare`` would cost ~75 MB per 840-px image.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from ..local_features.base import weights_file
from .base import Matcher

logger = logging.getLogger(__name__)

#: RGB -> grey weights (ITU-R BT.601, as OpenCV's RGB2GRAY and the JPEG luma channel)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
#: the prefix of the model's keys in upstream's Lightning checkpoints (``PL_LoFTR.matcher``)
PREFIX = "matcher."
#: parameters of the outdoor model: ``LoFTR(lower_config(cfg)['loftr'])`` of zju3dv/LoFTR
#: with ``configs/loftr/outdoor/buggy_pos_enc/loftr_ds.py`` (BatchNorm buffers excluded)
NUM_PARAMETERS = 11_561_456
WEIGHTS_HINT = (
    "download outdoor_ds.ckpt from https://github.com/zju3dv/LoFTR (README, 'pretrained models'; "
    "or kornia's loftr_outdoor.ckpt) and set its path as the matcher's 'weights'"
)


def kornia_config(conf: dict) -> dict:
    """kornia's LoFTR config for our conf (kornia's outdoor ``default_cfg`` otherwise)."""
    from kornia.feature.loftr.loftr import default_cfg

    cfg = copy.deepcopy(default_cfg)
    cfg["coarse"]["temp_bug_fix"] = bool(conf.get("temp_bug_fix", False))
    cfg["match_coarse"]["thr"] = float(conf.get("match_threshold", 0.2))
    return cfg


def build_net(conf: dict | None = None):
    """kornia's LoFTR with random (torch-initialised) weights, in eval mode; nothing downloaded."""
    import kornia.feature as KF

    return KF.LoFTR(pretrained=None, config=kornia_config(conf or {})).eval()


def strip_prefix(state: dict, layout: str) -> tuple[dict, str]:
    """Drop the Lightning ``matcher.`` prefix (what upstream's ``load_state_dict`` does)."""
    if not any(k.startswith(PREFIX) for k in state):
        return state, layout
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    return state, f"{layout} -> '{PREFIX}' prefix (Lightning PL_LoFTR)"


def load_loftr_weights(net, path: str | os.PathLike) -> str:
    """Load an official LoFTR-DS checkpoint (or a plain / kornia state dict) into ``net``.

    Returns the layout found. Missing or unexpected keys and shape mismatches raise
    :class:`ValueError` naming the file; BatchNorm ``num_batches_tracked`` counters (unused
    at inference) may be absent.
    """
    what = "LoFTR weights"
    state, layout = read_state_dict(path, what, f" ({WEIGHTS_HINT})")
    state, layout = strip_prefix(state, layout)
    load_into(net, state, os.fspath(path), what, layout, "LoFTR-DS, ResNet-FPN 8/2",
              optional=lambda k: k.endswith("num_batches_tracked"))
    return layout


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Write a randomly initialised LoFTR in the layout of the official ``outdoor_ds.ckpt``.

    ``torch.manual_seed(seed)`` and kornia's (PyTorch's default) initialisation; saved as
    ``{'epoch', 'global_step', 'pytorch-lightning_version', 'state_dict': {'matcher.<key>':
    float32}}`` like the Lightning checkpoints of zju3dv/LoFTR (only ``state_dict`` is read).
    Random LoFTR features are nearly the same in every cell, so its dual-softmax confidences
    are tiny: at the default ``match_threshold`` 0.2 it finds no matches; with 0 it returns
    the mutual nearest neighbours (tens per pair), enough for an end-to-end run.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_net(conf)
    state = {PREFIX + k: v.detach().clone() for k, v in net.state_dict().items()}
    ckpt = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.3.5", "state_dict": state}
    torch.save(ckpt, os.fspath(path))


def rgb_to_gray(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` (or ``[1, H, W]``) in [0, 1] to grey ``[1, H, W]``."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"LoFTR: expected an image [3, H, W] (or [1, H, W]), got {tuple(image.shape)}")
    if image.shape[0] == 1:
        return image
    r, g, b = GRAY_WEIGHTS
    return (r * image[0] + g * image[1] + b * image[2])[None]


class LoFTR(Matcher):
    """LoFTR-DS outdoor on pairs of images; returns matched positions in pixels of the inputs."""

    inputs = "images"
    output = "points"
    default_conf: ClassVar[dict[str, Any]] = {
        "weights": None,  # path to outdoor_ds.ckpt (never downloaded)
        "resize": 840,  # longer side, px (upstream's MegaDepth test); None: as is
        "match_threshold": 0.2,  # coarse dual-softmax probability (MATCH_COARSE.THR)
        "divisible_by": 8,  # both sides are resized down to a multiple of this (coarse stride)
        "temp_bug_fix": False,  # positional encoding: False for outdoor_ds, True for indoor_ds_new
    }

    def __init__(self, conf: dict | None = None):
        super().__init__(conf)
        c = self.conf
        if not c["weights"]:
            raise ValueError(f"LoFTR: no 'weights' path configured; weights are never downloaded: {WEIGHTS_HINT}.")
        if int(c["divisible_by"]) < 1 or int(c["divisible_by"]) % 8:
            raise ValueError(f"LoFTR: divisible_by must be a positive multiple of 8, got {c['divisible_by']}")
        path = weights_file(c["weights"], "LoFTR")
        self.net = build_net(c)
        self.layout = load_loftr_weights(self.net, path)
        self.eval()

    def prepare(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """RGB ``[3, H, W]`` in [0, 1] -> ``{"image": grey [1, 1, H8, W8], "scale": (W/W8, H/H8)}``."""
        gray = rgb_to_gray(image).float()
        h, w = gray.shape[-2:]
        df = int(self.conf["divisible_by"])
        h8, w8 = h // df * df, w // df * df
        if h8 == 0 or w8 == 0:
            raise ValueError(f"LoFTR: image {w}x{h} is smaller than {df} px")
        gray = gray[None]
        if (h8, w8) != (h, w):
            gray = F.interpolate(gray, size=(h8, w8), mode="bilinear", align_corners=False)
        scale = torch.tensor([w / w8, h / h8], dtype=torch.float32, device=gray.device)
        return {"image": gray, "scale": scale}

    @staticmethod
    def _points(out: dict, s0: torch.Tensor, s1: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "keypoints0": out["keypoints0"] * s0.to(out["keypoints0"]),
            "keypoints1": out["keypoints1"] * s1.to(out["keypoints1"]),
            "scores": out["confidence"],
        }

    def _forward(self, p0, p1):
        out = self.net({"image0": p0["image"], "image1": p1["image"]})
        return self._points(out, p0["scale"], p1["scale"])

    def pair_bytes_image(self, height: int, width: int) -> int:
        """Device memory one candidate of ``height`` x ``width`` (network input) takes in a
        batch: backbone activations and the 1/2-resolution fine map dominate (measured
        about 1.1 kB a pixel on CPU at 840 px; 2 kB leaves room for the transformer)."""
        return 2048 * height * width

    def _forward_many(self, p0, candidates: list) -> list[dict[str, torch.Tensor]]:
        # the query's backbone maps (coarse + positional encoding, fine) serve every candidate;
        # candidates of one input size run as a batch (no padding, so each gets its own
        # result: LoFTR's matching is per batch element), ``batch_size`` at a time
        f0 = self.net.extract_features(p0["image"])
        out: list[dict | None] = [None] * len(candidates)
        by_shape: dict[tuple, list[int]] = {}
        for i, c in enumerate(candidates):
            by_shape.setdefault(tuple(c["image"].shape[-2:]), []).append(i)
        for (h, w), idx in by_shape.items():
            step = self.fit_batch(self.pair_bytes_image(h, w), p0["image"].device)
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                if len(chunk) == 1:
                    c = candidates[chunk[0]]
                    out[chunk[0]] = self._points(self.net({"features0": f0, "image1": c["image"]}),
                                                 p0["scale"], c["scale"])
                    continue
                feats0 = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in f0.items()}
                res = self.net({"features0": feats0,
                                "image1": torch.cat([candidates[i]["image"] for i in chunk])})
                for b, i in enumerate(chunk):
                    sel = res["batch_indexes"] == b
                    one = {k: res[k][sel] for k in ("keypoints0", "keypoints1", "confidence")}
                    out[i] = self._points(one, p0["scale"], candidates[i]["scale"])
        return out
