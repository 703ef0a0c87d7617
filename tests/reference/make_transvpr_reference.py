"""Produce ``tests/fixtures/transvpr_reference.npz`` by running the *upstream* TransVPR.

Usage (with a copy of https://github.com/RuotongWANG/TransVPR-model-implementation; its
``.pth`` files are not needed)::

    python3 tests/reference/make_transvpr_reference.py \\
        --upstream /path/to/TransVPR-model-implementation \\
        --out tests/fixtures/transvpr_reference.npz

Upstream files used: ``feature_extractor.py`` (``Extractor_base``), ``blocks.py``
(``POOL``), ``msls.py`` (``transform``: ``ToTensor -> Resize -> Normalize``) and three
functions of ``test_msls.py`` (``get_keypoints``, ``max_min_norm_tensor``,
``match_batch_tensor``). ``test_msls.py`` itself cannot be imported here (it imports
``faiss`` and ``time.clock``, removed in Python 3.8), so those three function definitions
are taken from its source with ``ast`` and executed unchanged; ``match_batch_tensor`` calls
``.cuda()``, which is made a no-op while it runs on the CPU, and the ``cv2`` it sees
records the points passed to ``findHomography`` (and seeds OpenCV's RNG with 0 first).

The model is ``Extractor_base()`` with ``POOL`` added as ``pool``, as upstream's
``test_msls.py`` builds it, filled with :func:`seeded_transvpr_state` (the test rebuilds the
same weights from our model's state dict) and run in eval mode:

- ``query``: the left 320 columns of ``montmartre_close.jpg`` resized to 240 x 352: the
  multi-level attention of every patch and the per-level maps, the kept keypoints
  (attention > 0.02) and their layer-3 descriptors (L2-normalised, float16; their norms
  float32), the global descriptor;
- ``full``: ``montmartre_close.jpg`` at upstream's 480 x 640: attention, global descriptor
  and the descriptors of every 8th kept patch;
- ``cand0``, ``cand1``: the right 320 columns of the same 240 x 352 image (the query moved by
  two patches) and ``notre_dame.jpg`` at 240 x 320, re-ranked against the query by
  ``match_batch_tensor`` (a batch of two, as upstream does): their attention and global
  descriptors, the mutual matches it passes to RANSAC (as point pairs) and the inlier
  counts it returns.

Images: ``PIL.Image.open(path).convert("RGB").resize((W, H), Image.BILINEAR)`` (this is
``pipeline.images.load_uint8(path, [H, W])``); the sha256 of the 8-bit pixels is stored.

Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# common.py and random_state.py sit beside this script, which runs outside the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO.parent / "shared" / "fixtures" / "pairs"
QUERY = "montmartre_close.jpg"
OTHER = "notre_dame.jpg"
SMALL = (240, 320)  # H, W of the query and the candidates
SOURCE = (240, 352)  # QUERY at this size: the query is its left 320 columns, candidate 0 its right 320
SHIFT = 32  # so candidate 0 is the query moved left by two patches
FULL = (480, 640)  # upstream's test size
WEIGHT_SEED = 13
GAIN = 0.7  # seeded_state_dict's default He-std multiplier
#: extra factor on the seeded ``pool.attention_pool`` weights. The trained model keeps about
#: 44% of the patches (the thesis's Table 4.2: 522 of 1200 at 480 x 640); with GAIN alone the
#: logits vary by ~1 over an image, the fused attention is spread over [0, 1] and 99% of the
#: patches pass the 0.02 threshold. At 25 the softmax maps are peaked and about half pass.
ATTENTION_GAIN = 25.0
CLASS_EMB = "transformer.class_emb"
THRESHOLD = 0.02  # test_msls.py --threshold default
LAYER = 3  # test_msls.py --layer default
FULL_STEP = 8  # keep every 8th kept descriptor of the 480 x 640 run (fixture size)
UPSTREAM_FUNCTIONS = ("get_keypoints", "max_min_norm_tensor", "match_batch_tensor")


def seeded_transvpr_state(template: dict[str, torch.Tensor], seed: int, gain: float = GAIN,
                          attention_gain: float = ATTENTION_GAIN) -> dict[str, torch.Tensor]:
    """``random_state.seeded_state_dict`` for every key but the class token, which it does
    not know; the class token ``[1, 1, 256]`` is N(0, 1) from ``default_rng([seed, 1])``, and
    ``pool.attention_pool.weight`` is multiplied by ``attention_gain`` (see ATTENTION_GAIN).

    The LayerNorm weights fall under its "other 1-d weight" rule (U(0.5, 1.5)), their biases
    under "bias" (N(0, 0.05)); the bias-free ``qkv`` and the linear layers get He-normal
    weights, as the convolutions do.
    """
    from random_state import seeded_state_dict

    state = seeded_state_dict({k: v for k, v in template.items() if k != CLASS_EMB}, seed, gain=gain)
    ref = template[CLASS_EMB]
    arr = np.random.default_rng([seed, 1]).normal(0.0, 1.0, tuple(ref.shape))
    state[CLASS_EMB] = torch.from_numpy(arr).to(ref.dtype)
    state["pool.attention_pool.weight"] = state["pool.attention_pool.weight"] * attention_gain
    return {k: state[k] for k in template}


def load_rgb_exact(path, size: tuple[int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]`` resized to exactly ``size = (H, W)`` with PIL bilinear."""
    h, w = size
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        return np.array(im)


def upstream_functions(path: str) -> types.SimpleNamespace:
    """The functions of ``test_msls.py`` named in ``UPSTREAM_FUNCTIONS``, executed unchanged
    in a namespace whose ``cv2`` records ``findHomography``'s points (see the module doc)."""
    import cv2

    source = Path(path, "test_msls.py").read_text()
    tree = ast.parse(source)
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in UPSTREAM_FUNCTIONS]
    assert sorted(n.name for n in defs) == sorted(UPSTREAM_FUNCTIONS), "test_msls.py changed"
    calls = []

    def find_homography(p0, p1, method, ransacReprojThreshold):
        calls.append((np.array(p0), np.array(p1), method, ransacReprojThreshold))
        cv2.setRNGSeed(0)
        # Windows numpy (upstream's platform) makes dtype=int int32; OpenCV 5 refuses int64
        return cv2.findHomography(np.asarray(p0, np.int32), np.asarray(p1, np.int32), method,
                                  ransacReprojThreshold=ransacReprojThreshold)

    shim = types.SimpleNamespace(findHomography=find_homography, FM_RANSAC=cv2.FM_RANSAC)
    ns = {"np": np, "torch": torch, "cv2": shim}
    code = compile(ast.Module(body=defs, type_ignores=[]), str(Path(path, "test_msls.py")), "exec")
    exec(code, ns)  # noqa: S102 - upstream's own function definitions, unchanged
    return types.SimpleNamespace(**{k: ns[k] for k in UPSTREAM_FUNCTIONS}, homography_calls=calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of RuotongWANG/TransVPR-model-implementation")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--pairs", default=str(PAIRS), help="folder with the test images")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()
    from common import upstream_commit, write_fixture

    sys.path.insert(0, os.path.abspath(args.upstream))
    from blocks import POOL  # upstream code
    from feature_extractor import Extractor_base
    from msls import transform

    up = upstream_functions(args.upstream)
    torch.use_deterministic_algorithms(True)

    model = Extractor_base()
    model.add_module("pool", POOL(model.embedding_dim))
    n_params = sum(p.numel() for p in model.parameters())
    model.load_state_dict(seeded_transvpr_state(model.state_dict(), WEIGHT_SEED), strict=True)
    model.eval()

    def prepare(u8):
        """Upstream's ``msls.transform`` (``ToTensor -> Resize -> Normalize``) of 8-bit pixels."""
        size = u8.shape[:2]
        x = transform(size)(Image.fromarray(np.ascontiguousarray(u8)))[None]
        plain = torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1).float().div(255)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        assert torch.equal(x[0], (plain - mean[:, None, None]) / std[:, None, None]), "Resize is not a no-op"
        return x

    def run(x, m=model):
        """Upstream's test-time steps of ``test_msls.predict`` for a batch."""
        with torch.no_grad():
            feature = m(x)
            encoding, mask = m.pool(feature)
        level = mask.clone()
        mask = torch.sum(up.max_min_norm_tensor(mask), 1)
        mask = up.max_min_norm_tensor(mask)
        return {"local": feature[:, LAYER, 1:, :], "global": encoding, "mask": mask, "level": level}

    out: dict[str, np.ndarray] = {}
    margins = []

    # query at 240 x 320: every patch
    source = load_rgb_exact(Path(args.pairs) / QUERY, SOURCE)
    xq = prepare(source[:, : SMALL[1]])
    q = run(xq)
    kps = up.get_keypoints(SMALL)
    keep = (q["mask"][0] > THRESHOLD).numpy()
    local = q["local"][0][keep]
    norms = local.norm(dim=1)
    out.update(
        source_image_sha256=np.array(hashlib.sha256(source.tobytes()).hexdigest()),
        query_attention=q["mask"][0].numpy().astype(np.float32),
        query_level_attention=q["level"][0].numpy().astype(np.float32),
        query_keypoints=kps[keep].astype(np.int32),
        query_descriptors=(local / norms[:, None]).numpy().astype(np.float16),
        query_descriptor_norms=norms.numpy().astype(np.float32),
        query_global=q["global"][0].numpy().astype(np.float32),
    )
    margins.append(float((q["mask"][0] - THRESHOLD).abs().min()))

    # float32 rounding noise of this fixture: upstream itself in float64
    q64 = run(xq.double(), model.double())
    model.float()
    noise = {
        "attention": float((q64["mask"][0] - q["mask"][0].double()).abs().max()),
        "descriptors": float((q64["local"][0][keep] - local.double()).abs().max()),
        "global": float((q64["global"][0] - q["global"][0].double()).abs().max()),
    }

    # the same image at 480 x 640
    u8f = load_rgb_exact(Path(args.pairs) / QUERY, FULL)
    xf = prepare(u8f)
    f = run(xf)
    keep_f = (f["mask"][0] > THRESHOLD).numpy()
    kept = np.flatnonzero(keep_f)[::FULL_STEP]
    local_f = f["local"][0][kept]
    out.update(
        full_image_sha256=np.array(hashlib.sha256(u8f.tobytes()).hexdigest()),
        full_attention=f["mask"][0].numpy().astype(np.float32),
        full_global=f["global"][0].numpy().astype(np.float32),
        full_num_keypoints=np.array(int(keep_f.sum())),
        full_subset=kept.astype(np.int32),  # patch indices (raster order) of full_descriptors
        full_descriptors=torch.nn.functional.normalize(local_f, dim=1).numpy().astype(np.float16),
        full_keypoints=up.get_keypoints(FULL)[kept].astype(np.int32),
    )
    margins.append(float((f["mask"][0] - THRESHOLD).abs().min()))

    # two candidates re-ranked against the query, as test_msls.predict does
    other = load_rgb_exact(Path(args.pairs) / OTHER, SMALL)
    c = run(torch.cat([prepare(source[:, SHIFT: SHIFT + SMALL[1]]), prepare(other)]))
    real_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU run of upstream's .cuda()
    try:
        scores = up.match_batch_tensor(q["local"][0], c["local"], q["mask"][0], c["mask"], SMALL, THRESHOLD)
    finally:
        torch.Tensor.cuda = real_cuda
    calls = up.homography_calls
    assert len(calls) == 2, "a candidate had fewer than 4 matches: pick other images"
    for i, (p0, p1, method, thr) in enumerate(calls):
        out[f"cand{i}_matches_query_xy"] = p0.astype(np.int32)
        out[f"cand{i}_matches_cand_xy"] = p1.astype(np.int32)
        out[f"cand{i}_attention"] = c["mask"][i].numpy().astype(np.float32)
        out[f"cand{i}_global"] = c["global"][i].numpy().astype(np.float32)
        margins.append(float((c["mask"][i] - THRESHOLD).abs().min()))
    out["cand_inliers"] = np.array(scores, dtype=np.int64)
    out["ransac_method"] = np.array(int(calls[0][2]))
    out["ransac_threshold"] = np.array(float(calls[0][3]))

    margin = min(margins)
    n_q, n_f = int(keep.sum()), int(keep_f.sum())
    print(f"query 240x320: {n_q}/{keep.size} patches kept; 480x640: {n_f}/{keep_f.size}; "
          f"closest attention to the threshold {margin:.2e}")
    print(f"candidates: {[len(p0) for p0, *_ in calls]} mutual matches, {scores} inliers; "
          f"float32-vs-float64 max differences {noise}")
    if not (0.2 < n_q / keep.size < 0.95 and 0.2 < n_f / keep_f.size < 0.95) or margin < 1e-5:
        raise SystemExit("degenerate fixture: (almost) all or no patches kept, or a value at the threshold")

    out.update(
        upstream_commit=np.array(args.commit or upstream_commit(args.upstream)),
        torch_version=np.array(torch.__version__),
        query_name=np.array(QUERY),
        other_name=np.array(OTHER),
        other_image_sha256=np.array(hashlib.sha256(other.tobytes()).hexdigest()),
        source_size=np.array(SOURCE),
        shift=np.array(SHIFT),
        attention_gain=np.array(ATTENTION_GAIN),
        small_size=np.array(SMALL),
        full_size=np.array(FULL),
        weight_seed=np.array(WEIGHT_SEED),
        gain=np.array(GAIN),
        threshold=np.array(THRESHOLD),
        layer=np.array(LAYER),
        upstream_num_parameters=np.array(n_params),
        threshold_margin=np.array(margin),
        float64_noise_attention=np.array(noise["attention"]),
        float64_noise_descriptors=np.array(noise["descriptors"]),
        float64_noise_global=np.array(noise["global"]),
    )
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
