"""Produce ``tests/fixtures/delg_reference.npz`` by running the *upstream* feymanpriv/DELG code.

Usage (upstream's code needs ``yacs``; ``--pythonpath`` adds a folder holding it)::

    pip install --target /tmp/refpkgs yacs
    python3 tests/reference/make_delg_reference.py --upstream /path/to/DELG \\
        --pythonpath /tmp/refpkgs --out tests/fixtures/delg_reference.npz

Upstream's ``tools/delg_utils.DelgExtraction`` is built with its
``configs/resnet_delg_8gpu.yaml`` (ResNet-50, ``REDUCTION_DIM`` 512) and filled with
:func:`random_state.seeded_state_dict` (seed 11; no checkpoint is read). The image is
``montmartre_close.jpg`` resized (PIL bilinear) to a longer side of 224 px, turned to BGR
float32 as ``cv2.imread`` gives it to upstream's extractor. Then:

- local features: upstream's ``tools/extractor.delg_extract`` unchanged (7 scales,
  threshold 260 halved while fewer than 1000 cells pass, receptive-field boxes, NMS at
  IoU 0.98, top 1000). Two wrappers only record what it computes: the scale of each
  feature (upstream computes it but does not return it) and NMS's kept count. Upstream
  calls ``.cuda()`` on some tensors; ``torch.Tensor.cuda`` is made a no-op so it runs on
  the CPU;
- global descriptor: upstream's model at scales 0.7071, 1, 1.4142 (``extractor.preprocess``),
  each output L2-normalised, averaged and L2-normalised (the DELG paper's protocol, as the
  same author's DOLG ``evaler/infer.py`` does it; the DELG repository has no script for it).

Stored: all keypoints (x, y), scores and scales, the first ``N_DESC`` descriptors (float16),
the global descriptor, the parameter count of upstream's model and its state-dict keys.
Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, upstream_commit, write_fixture
from random_state import seeded_state_dict

WEIGHT_SEED = 11
RESIZE = 224
N_DESC = 160  # descriptors stored (float16) for the highest-scoring features
GLOBAL_SCALES = (0.7071, 1.0, 1.4142)
IMAGE = "montmartre_close.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of https://github.com/feymanpriv/DELG")
    ap.add_argument("--pythonpath", default=None, help="extra folder on sys.path (where yacs is installed)")
    ap.add_argument("--images", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                                     "fixtures", "pairs"), help="folder of montmartre_close.jpg")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    up = os.path.abspath(args.upstream)
    if args.pythonpath:
        sys.path.insert(0, os.path.abspath(args.pythonpath))
    sys.path[:0] = [up, os.path.join(up, "tools")]
    torch.Tensor.cuda = lambda self, *a, **k: self  # upstream hard-codes .cuda()

    from core.config import cfg  # upstream code

    cfg.merge_from_file(os.path.join(up, "configs", "resnet_delg_8gpu.yaml"))
    import delg_utils  # upstream code
    import extractor  # upstream code

    # upstream's nms resizes its out= tensors on every iteration
    warnings.filterwarnings("ignore", message="An output with one or more elements was resized")
    torch.use_deterministic_algorithms(True)
    model = delg_utils.DelgExtraction()
    template = model.state_dict()
    model.load_state_dict(seeded_state_dict(template, WEIGHT_SEED), strict=True)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    # record what upstream computes but does not return: per-feature scales, NMS count
    seen: dict = {"concat": [], "nms": None}
    real_concat, real_nms = delg_utils.concat_tensors_in_list, delg_utils.nms

    def concat(tensors, dim):
        out = real_concat(tensors, dim)
        seen["concat"].append(out)
        return out

    def nms(**kw):
        keep, count = real_nms(**kw)
        seen["nms"] = (keep.clone(), count, len(kw["scores"]))
        return keep, count

    delg_utils.concat_tensors_in_list, delg_utils.nms = concat, nms

    rgb = load_rgb(os.path.join(args.images, IMAGE), RESIZE)
    bgr = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)  # as cv2.imread(...).astype(float32)
    with torch.no_grad():
        data = extractor.delg_extract(bgr.copy(), model)
        g = None
        for s in GLOBAL_SCALES:
            x = torch.from_numpy(np.asarray([extractor.preprocess(bgr.copy(), s)], dtype=np.float32))
            gs = torch.nn.functional.normalize(model(x, targets=None)[0], p=2, dim=1)
            g = gs if g is None else g + gs
        g = torch.nn.functional.normalize(g / len(GLOBAL_SCALES), p=2, dim=1)[0]

    _, _, all_scales, _ = seen["concat"]
    keep, count, n_candidates = seen["nms"]
    keep = keep[: extractor.TOP_K]
    if count < len(keep):
        raise SystemExit(f"NMS removed features ({count} kept of {len(keep)}): upstream pads with index 0")
    loc = data["locations"]  # (y, x)
    scores = data["scores"]
    out = {
        "keypoints": np.ascontiguousarray(loc[:, ::-1]).astype(np.float32),
        "scores": scores.astype(np.float32),
        "scales": all_scales[keep].numpy().astype(np.float32),
        "descriptors": data["descriptors"][:N_DESC].astype(np.float16),
        "global_descriptor": g.numpy().astype(np.float32),
        "image_size": np.array(rgb.shape[1::-1], dtype=np.int64),  # width, height
    }
    scales, counts = np.unique(out["scales"], return_counts=True)
    print(f"{len(scores)} features from {n_candidates} candidates; per scale {dict(zip(scales.round(4), counts))}; "
          f"scores {scores.min():.3f}..{scores.max():.3f}; {n_params} parameters")
    if not (len(scores) == extractor.TOP_K < n_candidates and len(scales) >= 5):
        raise SystemExit("degenerate fixture: expected a top-k cut and features at most scales")
    out.update(
        upstream_commit=np.array(args.commit or upstream_commit(up)),
        torch_version=np.array(torch.__version__),
        weight_seed=np.array(WEIGHT_SEED),
        resize=np.array(RESIZE),
        image=np.array(IMAGE),
        n_candidates=np.array(n_candidates),
        n_params=np.array(n_params),
        state_keys=np.array(sorted(template)),
        global_scales=np.array(GLOBAL_SCALES),
        upstream_scales=np.array(extractor.SCALE_LIST),
        attn_thres=np.array(extractor.ATTN_THRES),
        iou_thres=np.array(extractor.IOU_THRES),
        top_k=np.array(extractor.TOP_K),
    )
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
