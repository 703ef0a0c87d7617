"""Produce ``tests/fixtures/cvnet_reference.npz`` by running the *upstream* CVNet code.

Usage (with a copy of https://github.com/sungonce/CVNet; no weights file is needed)::

    python3 tests/reference/make_cvnet_reference.py \\
        --upstream /path/to/CVNet --out tests/fixtures/cvnet_reference.npz

Upstream's ``CVNet_Rerank(50, 2048)`` (``model/CVNet_Rerank_model.py``) gets the weights
of :func:`random_state.seeded_state_dict` (seed :data:`WEIGHT_SEED`, gain :data:`GAIN`;
every parameter kind of the model is covered: convs, BN, GroupNorm, linear layers and
GeM's ``p``) and runs on CPU in eval mode under ``torch.no_grad()``. Inputs: real
photos from ``../shared/fixtures/pairs``, resized with PIL so the longer side is
:data:`RESIZE` px (``common.load_rgb``, the pixels of ``pipeline.images.load_uint8``),
turned into upstream's network input by upstream's own ``DataSet._prepare_im``
(``test/dataset.py``) on the BGR float image, as ``cv2.imread`` would give it.

Per image: upstream's ``extract_featuremap`` (the ``res3`` map; the first
:data:`N_CHANNELS` channels are stored) and ``extract_global_descriptor``. Per pair:
``extract_score_with_featuremap`` (what ``test/test_model.py`` calls), the logits that
``cv_learner`` returned on the way (captured by wrapping its ``forward``), and for the
first pair per-channel statistics of the cross-scale correlation tensor. The whole run
is repeated in float64 to record the float32 rounding noise of the fixture.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, sha256, upstream_commit, write_fixture
from random_state import seeded_state_dict

WEIGHT_SEED = 2022
#: He-std multiplier: the random_state default; the res3 map stays O(10), the global
#: descriptor's GeM input finite
GAIN = 0.7
#: longer side in px: 200 gives res3 maps 9 x 13 / 13 x 10 / 13 x 13, odd sides, so the
#: pyramid's ``round(6.5)`` (half to even) is exercised
RESIZE = 200
IMAGES = ("montmartre_close.jpg", "montmartre_far.jpg", "notre_dame.jpg", "chartres.jpg")
#: (query, candidate) indices into IMAGES
PAIRS = ((0, 1), (1, 0), (0, 2), (0, 0), (3, 2), (2, 3))
N_CHANNELS = 16


def default_images_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "fixtures", "pairs"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of sungonce/CVNet")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--images", default=default_images_dir(), help="folder with the pair photos")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    # upstream's packages are called model/, test/, core/: put them before the stdlib's "test"
    sys.path.insert(0, os.path.abspath(args.upstream))
    for name in [m for m in sys.modules if m == "test" or m.startswith("test.")]:
        del sys.modules[name]
    from model.CVNet_Rerank_model import CVNet_Rerank  # upstream code
    from test.dataset import DataSet  # upstream code

    torch.use_deterministic_algorithms(True)
    model = CVNet_Rerank(50, 2048).eval()
    model.load_state_dict(seeded_state_dict(model.state_dict(), WEIGHT_SEED, gain=GAIN), strict=True)

    captured: dict[str, torch.Tensor] = {}
    learner_forward = model.cv_learner.forward

    def keep(corr):
        captured["corr"] = corr.detach().clone()
        logits = learner_forward(corr)
        captured["logits"] = logits.detach().clone()
        return logits

    model.cv_learner.forward = keep

    out: dict[str, np.ndarray] = {}
    inputs = []
    for i, name in enumerate(IMAGES):
        path = os.path.join(args.images, name)
        rgb = load_rgb(path, RESIZE)
        bgr = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
        im = DataSet._prepare_im(None, bgr)  # upstream: HWC -> CHW, / 255, BGR mean / std
        inputs.append(torch.from_numpy(np.ascontiguousarray(im))[None])
        out[f"image{i}_sha256"] = np.array(sha256(path))
        out[f"image{i}_shape"] = np.array(rgb.shape, dtype=np.int64)
        out[f"image{i}_pixel_sum"] = np.array(int(rgb.astype(np.int64).sum()))

    def run(dtype):
        m = model.to(dtype)
        with torch.no_grad():
            feats = [m.extract_featuremap(x.to(dtype)) for x in inputs]
            glob = [m.extract_global_descriptor(x.to(dtype))[0] for x in inputs]
            res = []
            for q, k in PAIRS:
                score = m.extract_score_with_featuremap(feats[q], feats[k])
                res.append((float(score), captured["logits"][0].clone(), captured["corr"][0].clone()))
        return feats, glob, res

    feats, glob, res = run(torch.float32)
    feats64, glob64, res64 = run(torch.float64)

    for i, (f, g) in enumerate(zip(feats, glob)):
        out[f"res3_{i}"] = f[0][0, :N_CHANNELS].numpy().astype(np.float32)  # [16, h, w]
        out[f"res3_size{i}"] = np.array(f[0].shape[-2:], dtype=np.int64)
        out[f"global{i}"] = g.numpy().astype(np.float32)
    out["pairs"] = np.array(PAIRS, dtype=np.int64)
    out["scores"] = np.array([r[0] for r in res], dtype=np.float64)
    out["logits"] = np.stack([r[1].numpy() for r in res]).astype(np.float32)
    corr = res[0][2]  # first pair, [9, hq, wq, hk, wk]
    out["corr0_mean"] = corr.flatten(1).mean(1).numpy().astype(np.float32)
    out["corr0_max"] = corr.flatten(1).amax(1).numpy().astype(np.float32)
    out["corr0_nonzero"] = (corr.flatten(1) > 0).float().mean(1).numpy().astype(np.float32)
    out["corr0_shape"] = np.array(corr.shape, dtype=np.int64)

    noise = {
        "logits": max(float((r64[1] - r[1].double()).abs().max()) for r, r64 in zip(res, res64)),
        "scores": max(abs(r64[0] - r[0]) for r, r64 in zip(res, res64)),
        "global": max(float((a - b.double()).abs().max()) for a, b in zip(glob64, glob)),
        "res3_rel": max(float((a[0] - b[0].double()).abs().max() / a[0].abs().max()) for a, b in zip(feats64, feats)),
    }
    for key, value in noise.items():
        out[f"float64_noise_{key}"] = np.array(value)

    print("res3 sizes:", [tuple(out[f"res3_size{i}"]) for i in range(len(IMAGES))],
          "max |res3|:", [float(f[0].abs().max()) for f in feats])
    print("pairs:", PAIRS)
    print("logits:", out["logits"].tolist())
    print("scores:", out["scores"].round(4).tolist())
    print("corr0 mean / nonzero:", out["corr0_mean"].round(3).tolist(), out["corr0_nonzero"].round(2).tolist())
    print("float32 vs float64:", {k: f"{v:.2e}" for k, v in noise.items()})
    s = out["scores"]
    if not (np.all(np.isfinite(s)) and s.min() > 1e-3 and s.max() < 1 - 1e-3 and np.ptp(s) > 1e-3):
        raise SystemExit("degenerate fixture: scores saturate or do not vary; revisit GAIN / WEIGHT_SEED")

    out.update(
        upstream_commit=np.array(args.commit or upstream_commit(args.upstream)),
        torch_version=np.array(torch.__version__),
        weight_seed=np.array(WEIGHT_SEED),
        gain=np.array(GAIN),
        resize=np.array(RESIZE),
        images=np.array(IMAGES),
        depth=np.array(50),
        reduction_dim=np.array(2048),
    )
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
