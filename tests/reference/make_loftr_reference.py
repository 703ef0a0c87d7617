"""Produce ``tests/fixtures/loftr_reference.npz`` by running the *upstream* LoFTR code.

Usage (a copy of https://github.com/zju3dv/LoFTR, ``src/`` and ``configs/`` suffice; its
weights are not needed). Upstream imports ``einops``, ``yacs`` and ``kornia`` 0.4.1
(``kornia.utils.grid``, gone from newer kornia): install them into a separate folder and put
it first on ``PYTHONPATH``, so this repository's kornia is not touched::

    pip install --target /tmp/loftr_deps einops yacs
    pip install --no-deps --target /tmp/loftr_kornia041 kornia==0.4.1
    PYTHONPATH=/tmp/loftr_kornia041:/tmp/loftr_deps python3 tests/reference/make_loftr_reference.py \\
        --upstream /path/to/LoFTR --out tests/fixtures/loftr_reference.npz

What it runs: upstream's ``LoFTR(config=lower_config(cfg)['loftr'])`` where ``cfg`` is
``get_cfg_defaults()`` merged with ``configs/loftr/outdoor/buggy_pos_enc/loftr_ds.py`` (the
config of upstream's ``scripts/reproduce_test/outdoor_ds.sh`` for ``outdoor_ds.ckpt``:
dual-softmax, ``TEMP_BUG_FIX = False``), in eval mode under ``torch.no_grad()``. Every weight
comes from :func:`random_state.seeded_state_dict` (seed 0, default gain; it covers all of
LoFTR's parameter kinds: conv / linear weights, BatchNorm, and LayerNorm as "other 1-d
weight" + bias), loaded strictly.

Inputs: ``montmartre_close.jpg`` / ``montmartre_far.jpg`` from ``../shared/fixtures/pairs``,
RGB resized with PIL to 320 px on the longer side (``common.load_rgb``, the pixels the
pipeline loads with ``resize: 320``: 320x219 and 320x224), then upstream's outdoor
preprocessing: 8-bit grey (``cv2.cvtColor(RGB2GRAY)``), ``cv2.resize`` to
``(w // 8 * 8, h // 8 * 8)`` (upstream's demo / ``get_divisible_wh``) and ``/ 255``; the
resize factors go in as ``scale0`` / ``scale1`` as upstream's MegaDepth loader passes them,
so upstream returns keypoints in pixels of the 320-px images.

A random LoFTR is a poor matcher: its coarse features are dominated by a component common
to all cells, so dual-softmax probabilities stay tiny (largest here ~7e-3) and no match
passes the default threshold 0.2 (recorded as ``n_default``). The compared matches are
therefore those of a run with the coarse threshold lowered to :data:`LOW_THRESHOLD` (every
mutual nearest neighbour off the border with probability above 1e-6; the test uses the same
threshold), plus dense statistics of the full coarse probability matrix (the maximum and
arg-max of every row and column), which cover the backbone, positional encoding and coarse
transformer for all cells. Upstream is also run in float64 to record the float32 noise.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, sha256, upstream_commit, write_fixture
from random_state import seeded_state_dict

WEIGHT_SEED = 0
DEFAULT_THRESHOLD = 0.2  # upstream MATCH_COARSE.THR
LOW_THRESHOLD = 1e-6  # lowered for the check (a random LoFTR has no match above 0.2)
RESIZE = 320
DF = 8
PAIRS = ("montmartre_close.jpg", "montmartre_far.jpg")
CONFIG = "configs/loftr/outdoor/buggy_pos_enc/loftr_ds.py"


def upstream_input(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB at ``RESIZE`` px, upstream's 8-bit grey at multiple-of-8 size, and the scale back."""
    rgb = load_rgb(path, RESIZE)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    w8, h8 = w // DF * DF, h // DF * DF
    gray8 = cv2.resize(gray, (w8, h8))  # INTER_LINEAR, as upstream
    return rgb, gray8, np.array([w / w8, h / h8], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of zju3dv/LoFTR (src/ and configs/)")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--pairs", default=os.path.join(os.path.dirname(__file__), "../../../shared/fixtures/pairs"))
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    upstream = os.path.abspath(args.upstream)
    sys.path.insert(0, upstream)
    import kornia  # the version upstream runs with (0.4.1, see the usage above)
    from src.config.default import get_cfg_defaults  # upstream code
    from src.loftr import LoFTR
    from src.loftr.utils.cvpr_ds_config import lower_config  # as src.utils.misc's

    cfg = get_cfg_defaults()
    cfg.merge_from_file(os.path.join(upstream, CONFIG))
    config = lower_config(cfg)["loftr"]
    assert config["coarse"]["temp_bug_fix"] is False and config["match_coarse"]["match_type"] == "dual_softmax"

    def build(threshold: float, dtype=torch.float32) -> torch.nn.Module:
        c = {**config, "match_coarse": {**config["match_coarse"], "thr": threshold}}
        model = LoFTR(config=c).eval()
        model.load_state_dict(seeded_state_dict(model.state_dict(), WEIGHT_SEED), strict=True)
        return model.to(dtype)

    torch.use_deterministic_algorithms(True)
    paths = [os.path.join(args.pairs, p) for p in PAIRS]
    inputs = [upstream_input(p) for p in paths]

    def data(dtype=torch.float32) -> dict:
        d = {}
        for i, (_, gray, scale) in enumerate(inputs):
            d[f"image{i}"] = torch.from_numpy(gray)[None, None].to(dtype) / 255
            d[f"scale{i}"] = torch.from_numpy(scale)[None].to(dtype)
        return d

    model = build(LOW_THRESHOLD)
    n_params = sum(p.numel() for p in model.parameters())
    res = data()
    with torch.no_grad():
        model(res)
    default = data()
    with torch.no_grad():
        build(DEFAULT_THRESHOLD)(default)
    res64 = data(torch.float64)
    with torch.no_grad():
        build(LOW_THRESHOLD, torch.float64)(res64)

    conf = res["conf_matrix"][0]  # [L, S]
    n = len(res["mconf"])
    same64 = len(res64["mconf"]) == n and torch.equal(res64["i_ids"], res["i_ids"]) and torch.equal(res64["j_ids"], res["j_ids"])
    if not same64:
        raise SystemExit("float32 and float64 runs find different matches; pick another seed/threshold")
    kp_noise = float((res64["mkpts1_f"] - res["mkpts1_f"].double()).abs().max())
    conf_noise = float(((res64["mconf"] - res["mconf"].double()) / res64["mconf"]).abs().max())
    print(f"{n} matches at threshold {LOW_THRESHOLD}, {len(default['mconf'])} at {DEFAULT_THRESHOLD}; "
          f"confidences {float(res['mconf'].min()):.2e}..{float(res['mconf'].max()):.2e}; "
          f"parameters {n_params}; float32-vs-float64: keypoints1 {kp_noise:.2e} px, "
          f"confidence {conf_noise:.2e} (relative)")
    if n < 5:
        raise SystemExit("degenerate fixture: fewer than 5 matches")

    out = {
        "gray0": inputs[0][1], "gray1": inputs[1][1],  # uint8 upstream inputs
        "image_size0": np.array(inputs[0][0].shape[1::-1], dtype=np.int64),  # (w, h) at RESIZE px
        "image_size1": np.array(inputs[1][0].shape[1::-1], dtype=np.int64),
        "scale0": inputs[0][2], "scale1": inputs[1][2],
        "keypoints0": res["mkpts0_f"].numpy().astype(np.float32),
        "keypoints1": res["mkpts1_f"].numpy().astype(np.float32),
        "confidence": res["mconf"].numpy().astype(np.float32),
        "i_ids": res["i_ids"].numpy().astype(np.int32),
        "j_ids": res["j_ids"].numpy().astype(np.int32),
        "hw0_c": np.array(res["hw0_c"], dtype=np.int64), "hw1_c": np.array(res["hw1_c"], dtype=np.int64),
        "row_max": conf.max(1).values.numpy().astype(np.float32),
        "row_argmax": conf.argmax(1).numpy().astype(np.int32),
        "col_max": conf.max(0).values.numpy().astype(np.float32),
        "col_argmax": conf.argmax(0).numpy().astype(np.int32),
        "n_default": np.array(len(default["mconf"])),
        "num_parameters": np.array(n_params),
        "weight_seed": np.array(WEIGHT_SEED),
        "default_threshold": np.array(DEFAULT_THRESHOLD),
        "low_threshold": np.array(LOW_THRESHOLD),
        "resize": np.array(RESIZE),
        "float64_keypoint_noise": np.array(kp_noise),
        "float64_confidence_noise": np.array(conf_noise),
        "images": np.array(PAIRS),
        "image_sha256": np.array([sha256(p) for p in paths]),
        "upstream_commit": np.array(args.commit or upstream_commit(upstream)),
        "upstream_config": np.array(CONFIG),
        "upstream_kornia_version": np.array(kornia.__version__),
        "torch_version": np.array(torch.__version__),
    }
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
