"""Produce ``tests/fixtures/rrt_reference.npz`` by running the *upstream* RRT code.

Usage (from anywhere, with a copy of https://github.com/uvavision/RerankingTransformer;
its checkpoints and data files are not needed)::

    python3 tests/reference/make_rrt_reference.py \\
        --upstream /path/to/RerankingTransformer --out tests/fixtures/rrt_reference.npz

Upstream's ``RRT_GLD/models/matcher.MatchERT`` is built with the released configuration
(``models/ingredient.py``, named config ``RRT``: 2048-d global, 128-d local, 4 heads,
6 layers, feed-forward 1024, post-norm) and filled by :func:`seeded_rrt_state` (seed 5).
Synthetic DELG-like features (unit descriptors, attention scores sorted as DELG writes
them, DELF scales ``1 / s`` in float32 for TF DELG's image scales ``s``) are fed through
upstream's own preprocessing, ``RRT_GLD/utils/data/dataset.FeatureDataset.__getitem__``
(``max_sequence_len`` 500: truncation, padding mask, scale buckets), with its DELF
readers (``datum_io`` / ``feature_io``, which need protobuf) replaced by functions that
return the arrays. To import upstream's modules without their package ``__init__``
files (which pull in ``sacred`` and Google Landmarks tooling), the packages ``models``,
``utils`` and ``utils.data`` are registered as bare namespace modules.

Stored: the inputs (descriptors and globals rounded to float16, the values both sides
use), upstream's scale buckets and masks, and its logits for the query against each
candidate, computed one pair at a time and as one batch. The query has more than 500
features (upstream keeps the first 500), the candidates fewer (padding).
Nothing from this repository's ``pipeline`` package is imported.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import upstream_commit, write_fixture

WEIGHT_SEED = 5
INPUT_SEED = 2021
#: image scales of TF DELG (delg_gld_config.pbtxt) and how often features come from each
DELG_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
SCALE_WEIGHTS = (0.02, 0.04, 0.08, 0.14, 0.2, 0.24, 0.28)
N_FEATURES = (505, 200, 90, 31)  # query, then candidates
MAX_SEQUENCE_LEN = 500
D_GLOBAL, D_LOCAL = 2048, 128
SIZES = ((640, 480), (512, 384), (480, 640), (1024, 768))  # (width, height) per image
N_SHARED = 60  # descriptors of candidate 0 that are noisy copies of query descriptors


def seeded_rrt_state(template: dict, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with the keys, shapes and dtypes of ``template`` filled from
    ``numpy.random.default_rng(seed)`` in sorted key order (framework-independent, so
    upstream's and our model get bit-identical weights):

    * matrices (linear weights, ``in_proj_weight``, embeddings): Xavier-uniform, as
      upstream initialises them;
    * LayerNorm weights: U(0.5, 1.5); every bias: N(0, 0.05).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(template):
        ref = template[key]
        shape = tuple(ref.shape)
        if ref.dim() >= 2:
            bound = math.sqrt(6.0 / (shape[0] + shape[1]))
            arr = rng.uniform(-bound, bound, shape)
        elif key.endswith("bias"):
            arr = rng.normal(0.0, 0.05, shape)
        elif key.endswith("weight"):
            arr = rng.uniform(0.5, 1.5, shape)
        else:
            raise ValueError(f"seeded_rrt_state: don't know how to fill {key!r} {shape}")
        out[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
    return out


def make_inputs() -> dict[str, np.ndarray]:
    """Per image ``i``: ``global{i}`` (float16), ``descriptors{i}`` (float16), ``scores{i}``
    (decreasing), ``image_scales{i}`` (TF DELG's float32 image scale), ``delf_scales{i}``
    (``1 / s`` in float32, what DELF files hold), ``locations{i}`` ((y, x), as DELF files)."""
    rng = np.random.default_rng(INPUT_SEED)
    out: dict[str, np.ndarray] = {}

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    levels = np.array(DELG_SCALES, dtype=np.float32)
    for i, n in enumerate(N_FEATURES):
        desc = unit(rng.normal(size=(n, D_LOCAL)))
        if i == 1:
            desc[:N_SHARED] = unit(out["descriptors0"][:N_SHARED].astype(np.float64)
                                   + rng.normal(size=(N_SHARED, D_LOCAL)) * 0.03)
        w, h = SIZES[i]
        lv = rng.choice(len(levels), size=n, p=np.array(SCALE_WEIGHTS) / sum(SCALE_WEIGHTS))
        out[f"global{i}"] = unit(rng.normal(size=D_GLOBAL)).astype(np.float16)
        out[f"descriptors{i}"] = desc.astype(np.float16)
        out[f"scores{i}"] = np.sort(rng.uniform(100.0, 900.0, n)).astype(np.float32)[::-1].copy()
        out[f"image_scales{i}"] = levels[lv]
        out[f"delf_scales{i}"] = np.float32(1.0) / levels[lv]
        out[f"locations{i}"] = (rng.uniform(0, 1, (n, 2)) * [h, w]).astype(np.float32)
        out[f"image_size{i}"] = np.array([w, h], dtype=np.int64)
    return out


def load_upstream(path: str):
    """Upstream's ``MatchERT`` class and ``FeatureDataset`` with in-memory DELF readers."""
    root = os.path.join(os.path.abspath(path), "RRT_GLD")
    sys.path.insert(0, root)
    for name in ("models", "utils", "utils/data"):
        mod = types.ModuleType(name.replace("/", "."))
        mod.__path__ = [os.path.join(root, name)]
        sys.modules[mod.__name__] = mod
    store: dict[str, tuple] = {}
    delf = types.ModuleType("utils.data.delf")
    delf.datum_io = types.SimpleNamespace(ReadFromFile=lambda p: store[p])
    delf.feature_io = types.SimpleNamespace(ReadFromFile=lambda p: store[p])
    sys.modules["utils.data.delf"] = delf
    from models.matcher import MatchERT  # upstream code
    from utils.data.dataset import FeatureDataset  # upstream code

    return MatchERT, FeatureDataset, store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="copy of uvavision/RerankingTransformer")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--commit", default=None, help="upstream commit to record (default: git HEAD)")
    args = ap.parse_args()

    MatchERT, FeatureDataset, store = load_upstream(args.upstream)
    torch.use_deterministic_algorithms(True)
    # models/ingredient.py, named config RRT
    model = MatchERT(d_global=D_GLOBAL, d_model=D_LOCAL, seq_len=1004, d_K=256, nhead=4, num_encoder_layers=6,
                     dim_feedforward=1024, dropout=0.0, activation="relu", normalize_before=False)
    template = model.state_dict()
    model.load_state_dict(seeded_rrt_state(template, WEIGHT_SEED), strict=True)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    inp = make_inputs()
    tmp = tempfile.mkdtemp()
    desc_dir = os.path.join(tmp, "delg_synthetic")
    os.makedirs(desc_dir)
    samples = []
    for i in range(len(N_FEATURES)):
        name = f"image{i}"
        gpath, lpath = (os.path.join(desc_dir, name + ext) for ext in (".delg_global", ".delg_local"))
        for p in (gpath, lpath):
            open(p, "w").close()  # upstream asserts the files exist
        store[gpath] = inp[f"global{i}"].astype(np.float32)
        n = N_FEATURES[i]
        # feature_io.ReadFromFile: locations, scales, descriptors, attention, orientations.
        # The scales are float32 in DELF files; upstream bisects each np.float32 against
        # Python floats, which NumPy 1.x (upstream's, 2021) compares in float64 and NumPy 2
        # (NEP 50) in float32, giving other buckets. Passing the same values as float64
        # reproduces upstream as it ran when the released weights were trained.
        store[lpath] = (inp[f"locations{i}"], inp[f"delf_scales{i}"].astype(np.float64),
                        inp[f"descriptors{i}"].astype(np.float32),
                        inp[f"scores{i}"], np.zeros(n, dtype=np.float32))
        w, h = inp[f"image_size{i}"]
        samples.append((f"jpg/{name}.jpg", 0, int(w), int(h)))
    dataset = FeatureDataset(tmp, samples, "synthetic", MAX_SEQUENCE_LEN)
    items = [dataset[i] for i in range(len(N_FEATURES))]  # global, local, mask, scale_inds, positions, ...

    def batch(ids):
        return [torch.stack([items[i][j] for i in ids]) for j in range(5)]

    K = len(N_FEATURES) - 1
    with torch.no_grad():
        single = [float(model(*batch([0]), *batch([k]))[0]) for k in range(1, K + 1)]
        batched = model(*batch([0] * K), *batch(list(range(1, K + 1)))).numpy()
        # float64 run: the float32 rounding noise of this fixture
        model64 = model.double()
        b64 = [t.double() if t.is_floating_point() else t for t in batch([0] * K)]
        c64 = [t.double() if t.is_floating_point() else t for t in batch(list(range(1, K + 1)))]
        logits64 = model64(*b64, *c64).numpy()
    single = np.array(single, dtype=np.float32)
    noise = float(np.abs(logits64 - single).max())
    print(f"logits {single}; batched - single {np.abs(batched - single).max():.2e}; float64 - float32 {noise:.2e}; "
          f"{n_params} parameters")
    buckets = [items[i][3].numpy() for i in range(len(N_FEATURES))]
    print("scale buckets used:", sorted(set(np.concatenate(buckets).tolist())))
    if np.ptp(single) < 0.1:
        raise SystemExit("degenerate fixture: the logits barely differ between candidates")

    out = {k: v for k, v in inp.items() if not k.startswith(("locations", "delf_scales"))}
    out["delf_scales0"] = inp["delf_scales0"]
    for i in range(len(N_FEATURES)):
        out[f"scale_inds{i}"] = buckets[i].astype(np.int64)
        out[f"mask{i}"] = items[i][2].numpy()
    out.update(
        logits=single,
        logits_batched=batched.astype(np.float32),
        logits_float64=logits64,
        upstream_commit=np.array(args.commit or upstream_commit(args.upstream)),
        torch_version=np.array(torch.__version__),
        weight_seed=np.array(WEIGHT_SEED),
        input_seed=np.array(INPUT_SEED),
        max_sequence_len=np.array(MAX_SEQUENCE_LEN),
        n_params=np.array(n_params),
        state_keys=np.array(sorted(template)),
        float64_noise=np.array(noise),
    )
    write_fixture(args.out, out)


if __name__ == "__main__":
    main()
