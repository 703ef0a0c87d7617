"""Produce the fixtures for the kornia-based wrappers by running the *upstream* code.

Usage (upstream copies extracted outside this repository, see ``README.md``)::

    python3 tests/reference/make_kornia_references.py \\
        --upstream-lightglue /tmp/lg_ref --lightglue-commit <sha> \\
        --upstream-xfeat /tmp/xfeat_ref --xfeat-commit <sha> \\
        --outdir tests/fixtures

Writes

- ``aliked_reference.npz``: upstream ALIKED (``lightglue/aliked.py`` of cvg/LightGlue, a
  self-contained copy of Shiaoming/ALIKED using torchvision's ``deform_conv2d``) on
  ``montmartre_close.jpg`` at 320 px, ``aliked-n16``, ``max_num_keypoints=512``,
  ``detection_threshold=0.0`` (our wrapper's default: top-k mode), ``nms_radius=2``;
- ``aliked_lightglue_reference.npz``: the same for ``montmartre_far.jpg`` and the upstream
  LightGlue (``lightglue/lightglue.py``, ``features="aliked"``, defaults
  ``depth_confidence=0.95, width_confidence=0.99, filter_threshold=0.1``) matches between
  the two (descriptors rounded to float16 *before* matching, so the test feeds our matcher
  exactly what upstream got);
- ``xfeat_reference.npz`` (with ``--upstream-xfeat``): upstream XFeat
  (verlab/accelerated_features ``modules/xfeat.py``, ``top_k=512, detection_threshold=0.05``)
  on both images and upstream ``modules/lighterglue.py`` matches (``min_conf=0.1``).

Input images (rebuilt the same way by the test): ``PIL.Image.open(p).convert("RGB")``,
``resize`` with ``Image.BILINEAR`` so the longer side is 320 (``round`` for the other),
i.e. ``pipeline.images.load_uint8(p, resize=320)``; ALIKED gets ``uint8 / 255``
``[1, 3, H, W]`` (upstream's ``load_image``/``numpy_image_to_torch`` convention); XFeat gets the
same float tensor times 255 (upstream's convention: ``cv2`` uint8 arrays cast to float; the
network instance-normalises its grey input, so the scale matters only through the eps).
The sha256 of the 8-bit pixels is stored. Weight downloads in upstream code are redirected
to the files in ``../shared/weights``. Nothing from ``pipeline`` is imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_rgb, sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
PAIRS = SHARED / "fixtures" / "pairs"
WEIGHTS = SHARED / "weights"
IMAGES = ("montmartre_close.jpg", "montmartre_far.jpg")


def local_hub(file):
    def load(url, *a, **kw):
        print(f"  (download of {url} redirected to {file})")
        return torch.load(file, map_location="cpu", weights_only=True)
    return load


def aliked_and_lightglue(args, rgbs, common):
    sys.path.insert(0, os.path.abspath(args.upstream_lightglue))
    from lightglue import aliked as up_aliked, lightglue as up_lg  # upstream code

    with mock.patch.object(up_aliked.torch.hub, "load_state_dict_from_url", local_hub(WEIGHTS / "aliked-n16.pth")):
        net = up_aliked.ALIKED(model_name="aliked-n16", max_num_keypoints=args.max_keypoints,
                               detection_threshold=args.aliked_threshold, nms_radius=2).eval()
    feats = []
    for rgb in rgbs:
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)[None]
        with torch.no_grad():
            out = net({"image": x})
        feats.append({"keypoints": out["keypoints"][0].float(), "scores": out["keypoint_scores"][0].float(),
                      "descriptors": out["descriptors"][0].float(),
                      "image_size": torch.tensor([x.shape[-1], x.shape[-2]], dtype=torch.float32)})
        print(f"  ALIKED: {len(feats[-1]['keypoints'])} keypoints")

    with mock.patch.object(up_lg.torch.hub, "load_state_dict_from_url", local_hub(WEIGHTS / "aliked_lightglue.pth")):
        lg = up_lg.LightGlue(features="aliked").eval()
    side = lambda f: {"keypoints": f["keypoints"][None],  # noqa: E731
                      "descriptors": f["descriptors"].half().float()[None], "image_size": f["image_size"][None]}
    with torch.no_grad():
        m = lg({"image0": side(feats[0]), "image1": side(feats[1])})
    matches, mscores = m["matches"][0].numpy(), m["scores"][0].float().numpy()
    print(f"  LightGlue(aliked): {len(matches)} matches, stopped after {int(m['stop'])} layers")

    def dump(f, p=""):
        return {p + "keypoints": f["keypoints"].numpy(), p + "scores": f["scores"].numpy(),
                p + "descriptors": f["descriptors"].numpy().astype(np.float16), p + "image_size": f["image_size"].numpy()}

    settings = dict(model_name="aliked-n16", max_keypoints=args.max_keypoints,
                    detection_threshold=args.aliked_threshold, nms_radius=2,
                    weights_sha256=sha256(WEIGHTS / "aliked-n16.pth"), upstream_commit=args.lightglue_commit)
    np.savez_compressed(Path(args.outdir) / "aliked_reference.npz", **dump(feats[0]), **common[0], **settings)
    np.savez_compressed(
        Path(args.outdir) / "aliked_lightglue_reference.npz", **dump(feats[1]), **common[1], **settings,
        matches=matches, match_scores=mscores, stop_layer=int(m["stop"]),
        lightglue_weights_sha256=sha256(WEIGHTS / "aliked_lightglue.pth"),
        lightglue_conf=str(vars(lg.conf)), image0_name=IMAGES[0])


def xfeat(args, rgbs, common):
    sys.path.insert(0, os.path.abspath(args.upstream_xfeat))
    from modules.xfeat import XFeat  # upstream code
    from modules.lighterglue import LighterGlue

    net = XFeat(weights=str(WEIGHTS / "xfeat.pt"), top_k=args.max_keypoints, detection_threshold=0.05)
    feats = []
    for rgb in rgbs:
        x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]  # 0..255, upstream's convention
        f = net.detectAndCompute(x)[0]
        f["image_size"] = (x.shape[-1], x.shape[-2])
        feats.append(f)
        print(f"  XFeat: {len(f['keypoints'])} keypoints")
    net.lighterglue = LighterGlue(weights=str(WEIGHTS / "xfeat-lighterglue.pt"))
    net.lighterglue.eval()
    half = [{**f, "descriptors": f["descriptors"].half().float()} for f in feats]
    _, _, idx = net.match_lighterglue(half[0], half[1], min_conf=0.1)
    # scores of those matches: run the same call once more through the module itself
    data = {f"{k}{i}": (half[i][k][None] if k != "image_size" else torch.tensor(half[i][k])[None])
            for i in range(2) for k in ("keypoints", "descriptors", "image_size")}
    out = net.lighterglue(data, min_conf=0.1)
    assert np.array_equal(out["matches"][0].numpy(), idx)
    print(f"  LighterGlue: {len(idx)} matches")
    arrays = {}
    for i, f in enumerate(feats):
        arrays.update({f"keypoints{i}": f["keypoints"].numpy(), f"scores{i}": f["scores"].numpy(),
                       f"descriptors{i}": f["descriptors"].numpy().astype(np.float16),
                       f"image_size{i}": np.array(f["image_size"], dtype=np.float32),
                       f"image_sha256_{i}": common[i]["image_sha256"], f"image_name{i}": common[i]["image_name"]})
    np.savez_compressed(
        Path(args.outdir) / "xfeat_reference.npz", **arrays, matches=idx, match_scores=out["scores"][0].numpy(),
        resize=args.resize, max_keypoints=args.max_keypoints, detection_threshold=0.05, min_conf=0.1,
        input_scale=255.0, weights_sha256=sha256(WEIGHTS / "xfeat.pt"),
        lighterglue_weights_sha256=sha256(WEIGHTS / "xfeat-lighterglue.pt"),
        upstream_commit=args.xfeat_commit, torch_version=torch.__version__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream-lightglue", required=True, help="copy of cvg/LightGlue")
    ap.add_argument("--lightglue-commit", default="unknown")
    ap.add_argument("--upstream-xfeat", default=None, help="copy of verlab/accelerated_features")
    ap.add_argument("--xfeat-commit", default="unknown")
    ap.add_argument("--outdir", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--resize", type=int, default=320)
    ap.add_argument("--max-keypoints", type=int, default=512)
    ap.add_argument("--aliked-threshold", type=float, default=0.0, help="our wrapper's default")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    rgbs, common = [], []
    for name in IMAGES:
        rgb = load_rgb(PAIRS / name, args.resize)
        rgbs.append(rgb)
        common.append({"image_name": name, "resize": args.resize, "image_shape": np.array(rgb.shape),
                       "image_sha256": hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest(),
                       "torch_version": torch.__version__})
    aliked_and_lightglue(args, rgbs, common)
    if args.upstream_xfeat:
        xfeat(args, rgbs, common)


if __name__ == "__main__":
    main()
