"""Produce ``tests/fixtures/patchnetvlad_reference.npz`` by running the *upstream* Patch-NetVLAD code.

Usage (with a copy of https://github.com/QVPR/Patch-NetVLAD; no pretrained model is needed)::

    python3 tests/reference/make_patchnetvlad_reference.py \\
        --upstream /path/to/Patch-NetVLAD --out tests/fixtures/patchnetvlad_reference.npz

For each variant in :data:`VARIANTS` the script

1. reads upstream's ``patchnetvlad/configs/performance.ini`` and overrides the image size
   (:data:`SIZE`, small so that the test is fast) and, for the second variant, the patch
   settings, as ``[global_params]`` / ``[feature_extract]`` / ``[feature_match]`` options;
2. builds upstream's model with ``get_backend()`` + ``get_model(..., append_pca_layer=True)``
   (``torchvision.models.vgg16`` is patched to return an *untrained* VGG-16, so nothing is
   downloaded; every weight is replaced next) and loads :func:`seeded_state` strictly;
3. runs upstream's ``feature_extract()`` (``feature_extract.py``, CPU) on a one-image
   ``PlaceDataset`` of ``--image``, which writes the patch descriptors (one ``.npy`` per
   patch size, ``[num_pcs, P]``) and the global descriptor, and upstream's
   ``calc_keypoint_centers_from_patches`` for the patch positions (stride-1 patch sizes
   only: for other strides upstream's function is wrong, see our module's docstring).

What is stored per variant ``<v>_`` (the 4096-d descriptors are too big to keep whole):
``patch_sizes``, ``strides``, ``num_clusters``, ``num_pcs``, ``counts`` (patches per size),
``keypoints`` (upstream's integer centres ``[N1, 2]`` (x, y) of the stride-1 sizes, stacked),
``keypoint_levels``, ``projection`` (all patch descriptors times :func:`projection_matrix`,
float32 ``[N, 32]``), ``subset`` (indices of the first, middle and last patch of each size;
all patches where ``num_pcs <= 256``) and ``subset_descriptors`` (their full descriptors,
float16), ``global_descriptor`` (float32), ``mean_cosine`` (mean
cosine similarity between the patch descriptors: not ~1, so the weights are not degenerate).

The input image: ``PIL.Image.open(--image).convert("RGB")`` resized with ``Image.BILINEAR``
to ``SIZE`` (w x h) is what our test feeds our model (``pipeline.images.load_uint8(path,
resize=[h, w])``); upstream's ``PlaceDataset`` resizes the original file with
``transforms.Resize((h, w))`` (the same PIL call). The sha256 of the resized 8-bit pixels
is stored so that a test on a machine whose JPEG decoder differs can tell.

Upstream's ``netvlad.py``, ``patchnetvlad.py`` and ``datasets.py`` import scikit-learn at
module level but only use it for training / ground truth; where it is not installed an empty
stand-in module is registered (same for ``faiss``). Nothing from this repository's
``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture
from random_state import seeded_state_dict

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = REPO.parent / "shared" / "fixtures" / "pairs" / "montmartre_close.jpg"
#: input size (height, width): a 12 x 16 conv5_3 grid, 3:4 as upstream's 480 x 640
SIZE = (192, 256)
WEIGHT_SEED = 11
#: He-std multiplier for ``seeded_state_dict``: VGG has no normalisation, so the default 0.7
#: would shrink the activations by 0.7 per layer until the biases dominate and every position
#: looks alike; 1.0 keeps the scale
GAIN = 1.0
#: the soft-assignment is ``ALPHA * c_k / |c_k|`` (upstream's ``init_params`` form), the
#: centroids ``CENTROID_NORM * c_k / |c_k|``
ALPHA = 30.0
CENTROID_NORM = 0.5
#: ``seeded_state_dict``'s N(0, 0.05) biases give the 4096-d WPCA bias a norm of ~3 against
#: ~1 for the projected VLAD, so every patch would get nearly the same descriptor (mean
#: cosine 0.99); scaled by this factor the mean cosine between patches is 0.92 (perf) and 0.96 (pitts)
WPCA_BIAS_SCALE = 0.05
PROJECTION_SEED = 5
PROJECTION_DIM = 32
#: (name, num_clusters, num_pcs, patch_sizes, strides, patch weights): ``perf`` is
#: ``performance.ini`` with the Mapillary model's 16 clusters; ``pitts`` has 64 clusters (the
#: Pittsburgh models), a small WPCA and a stride-2 patch size
VARIANTS = (
    ("perf", 16, 4096, "2,5,8", "1,1,1", "0.45,0.15,0.4"),
    ("pitts", 64, 128, "5,3", "1,2", "0.5,0.5"),
)


def seeded_state(template: dict[str, torch.Tensor], seed: int, gain: float = GAIN) -> dict[str, torch.Tensor]:
    """Weights for a Patch-NetVLAD state dict (upstream's key names and shapes).

    Everything but the NetVLAD parameters comes from ``seeded_state_dict(.., seed, gain)``;
    ``pool.centroids`` (a 2-d parameter that function cannot fill) and ``pool.conv.weight``
    are built from ``K`` random unit vectors drawn from ``default_rng(seed + 1000)``;
    ``WPCA.0.bias`` is scaled by :data:`WPCA_BIAS_SCALE`.
    """
    vlad = ("pool.centroids", "pool.conv.weight")
    state = seeded_state_dict({k: v for k, v in template.items() if k not in vlad}, seed, gain=gain)
    k, d = template["pool.centroids"].shape
    rng = np.random.default_rng(seed + 1000)
    c = rng.normal(size=(k, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    state["pool.centroids"] = torch.from_numpy(CENTROID_NORM * c).float()
    state["pool.conv.weight"] = torch.from_numpy(ALPHA * c).float()[:, :, None, None]
    state["WPCA.0.bias"] = state["WPCA.0.bias"] * WPCA_BIAS_SCALE
    return {key: state[key] for key in template}


def projection_matrix(dim: int) -> np.ndarray:
    """``[dim, PROJECTION_DIM]`` float64 Gaussian matrix, columns of unit expected norm."""
    return np.random.default_rng(PROJECTION_SEED).normal(size=(dim, PROJECTION_DIM)) / np.sqrt(dim)


def resized_pixels(path, size=SIZE) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))


def stub_missing(name: str, attrs: dict) -> None:
    try:
        __import__(name)
    except ImportError:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod = types.ModuleType(".".join(parts[:i]))
            mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)  # torch's import scans want one
            sys.modules.setdefault(mod.__name__, mod)
        for key, value in attrs.items():
            setattr(sys.modules[name], key, value)
        if len(parts) > 1:
            setattr(sys.modules[parts[0]], parts[1], sys.modules[name])


def run_variant(upstream: Path, image: Path, name, num_clusters, num_pcs, patch_sizes, strides, weights, work: Path):
    import torchvision
    from feature_extract import feature_extract  # upstream's
    from patchnetvlad.models import models_generic as mg
    from patchnetvlad.models.local_matcher import calc_keypoint_centers_from_patches
    from patchnetvlad.tools.datasets import PlaceDataset

    config = configparser.ConfigParser()
    config.read(upstream / "patchnetvlad" / "configs" / "performance.ini")
    h, w = SIZE
    for section in ("feature_extract", "feature_match"):
        config[section]["imageresizeh"], config[section]["imageresizew"] = str(h), str(w)
    config["feature_match"]["patchweights2use"] = weights
    gp = config["global_params"]
    gp["num_pcs"], gp["patch_sizes"], gp["strides"] = str(num_pcs), patch_sizes, strides
    gp["num_clusters"] = str(num_clusters)  # upstream reads it from the checkpoint

    untrained = torchvision.models.vgg16
    with mock.patch.object(mg.models, "vgg16", lambda *a, **k: untrained(weights=None)):
        encoder_dim, encoder = mg.get_backend()
    model = mg.get_model(encoder, encoder_dim, gp, append_pca_layer=True)
    state = seeded_state(model.state_dict(), WEIGHT_SEED)
    model.load_state_dict(state, strict=True)

    out_dir = work / name
    list_file = work / f"{name}_images.txt"
    list_file.write_text(str(image.resolve()) + "\n")
    dataset = PlaceDataset(None, str(list_file), "", None, config["feature_extract"])
    opt = SimpleNamespace(output_features_dir=str(out_dir), nocuda=True)
    feature_extract(dataset, model, torch.device("cpu"), opt, config)

    stem = image.stem
    sizes = [int(p) for p in patch_sizes.split(",")]
    steps = [int(s) for s in strides.split(",")]
    descs = [np.load(out_dir / f"patchfeats_psize{p}_{stem}.npy").T for p in sizes]  # [P, num_pcs]
    glob = np.load(out_dir / "globalfeats.npy")[0]
    kps, kp_levels = [], []
    for level, (p, s) in enumerate(zip(sizes, steps)):
        if s != 1:
            continue
        keypoints, _ = calc_keypoint_centers_from_patches(config["feature_match"], p, p, s, s)
        assert keypoints.shape[1] == len(descs[level])
        kps.append(keypoints.T)
        kp_levels.append(np.full(len(descs[level]), level))

    all_desc = np.concatenate(descs).astype(np.float64)
    counts = np.array([len(d) for d in descs])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    subset = np.concatenate([st + np.unique([0, n // 2, n - 1]) for st, n in zip(starts, counts)])
    if all_desc.shape[1] <= 256:  # small descriptors: keep them all
        subset = np.arange(len(all_desc))
    unit = all_desc / np.linalg.norm(all_desc, axis=1, keepdims=True)
    cos = unit @ unit.T
    mean_cos = float((cos.sum() - len(cos)) / (len(cos) * (len(cos) - 1)))
    print(f"{name}: {counts.tolist()} patches of {all_desc.shape[1]} dims; mean cosine between patches "
          f"{mean_cos:.3f}; global norm {np.linalg.norm(glob):.4f}")
    if mean_cos > 0.98:
        raise SystemExit(f"{name}: degenerate fixture (patch descriptors nearly identical); revisit GAIN/ALPHA")
    return {
        f"{name}_num_clusters": np.array(num_clusters),
        f"{name}_num_pcs": np.array(num_pcs),
        f"{name}_patch_sizes": np.array(sizes),
        f"{name}_strides": np.array(steps),
        f"{name}_patch_weights": np.array([float(x) for x in weights.split(",")]),
        f"{name}_counts": counts,
        f"{name}_keypoints": np.concatenate(kps).astype(np.int32),
        f"{name}_keypoint_levels": np.concatenate(kp_levels).astype(np.int64),
        f"{name}_projection": (all_desc @ projection_matrix(all_desc.shape[1])).astype(np.float32),
        f"{name}_subset": subset.astype(np.int64),
        f"{name}_subset_descriptors": all_desc[subset].astype(np.float16),
        f"{name}_global_descriptor": glob.astype(np.float32),
        f"{name}_mean_cosine": np.array(mean_cos),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of QVPR/Patch-NetVLAD")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    upstream = Path(args.upstream).resolve()
    stub_missing("sklearn.neighbors", {"NearestNeighbors": None})
    stub_missing("faiss", {})
    sys.path.insert(0, str(upstream))
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    image = Path(args.image)
    pixels = resized_pixels(image)
    out: dict[str, np.ndarray] = {
        "image_name": np.array(image.name),
        "image_hw": np.array(SIZE),
        "image_sha256": np.array(hashlib.sha256(pixels.tobytes()).hexdigest()),
        "variants": np.array([v[0] for v in VARIANTS]),
        "weight_seed": np.array(WEIGHT_SEED),
        "gain": np.array(GAIN),
        "alpha": np.array(ALPHA),
        "centroid_norm": np.array(CENTROID_NORM),
        "wpca_bias_scale": np.array(WPCA_BIAS_SCALE),
        "projection_seed": np.array(PROJECTION_SEED),
        "upstream_commit": np.array(args.commit or upstream_commit(str(upstream))),
        "torch_version": np.array(torch.__version__),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            with torch.no_grad():
                out.update(run_variant(upstream, image, *variant, work=Path(tmp)))
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
