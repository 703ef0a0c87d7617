"""Patch-NetVLAD (Hausler et al., CVPR 2021) loading QVPR's ``mapillary_WPCA*.pth.tar``.

The network is upstream's ``get_model(..., append_pca_layer=True)`` with
``pooling = patchnetvlad`` (``patchnetvlad/models/models_generic.py``, ``netvlad.py``,
``patchnetvlad.py``), rebuilt here with upstream's parameter names so that the released
files load as they are:

- ``encoder``: VGG-16's ``features`` up to conv5_3, without its last ReLU and max-pool
  (upstream's ``features[:-2]``): 13 3x3 convolutions at module indices 0, 2, 5, ... 28,
  four 2x2 max-pools, output stride 16, 512 channels, *before* the ReLU;
- ``pool`` (NetVLAD in patch mode): the conv5_3 descriptors are L2-normalised per
  position, soft-assigned to ``K`` clusters (``pool.conv``, a 1x1 convolution without
  bias: upstream's ``vladv2 = False``), and each position contributes the residuals
  ``a_k(x) (x - c_k)`` to the cluster centres ``pool.centroids [K, 512]``;
  - patch descriptors (IntegralVLAD): the ``K * 512``-channel residual map is turned
    into an integral image (cumulative sums over width, then height, zero-padded at the
    top and left), and the sum over every ``p x p`` window at stride ``s`` is read off
    with a depth-wise ``2 x 2`` convolution of weights ``[[1, -1], [-1, 1]]`` dilated by
    ``p`` (then divided by ``p^2``), as upstream's ``get_integral_feature`` /
    ``get_square_regions_from_integral``; each window's VLAD is intra-normalised (per
    cluster) and L2-normalised;
  - the global NetVLAD descriptor sums the residuals over all positions, then the same
    two normalisations;
- ``WPCA``: a 1x1 convolution ``K * 512 -> num_pcs`` with bias (``WPCA.0.weight``,
  ``WPCA.0.bias``: PCA + whitening learnt by upstream's ``add_pca.py``) followed by L2
  normalisation; applied to every patch descriptor and to the global one.

Released files (``add_pca.py`` saves ``{'num_pcs': N, 'state_dict': model.state_dict()}``
with no ``epoch`` nor ``optimizer``; QVPR/Patch-NetVLAD issue 31): the WPCA tensors are
float64 there (``add_pca.py`` builds them from numpy float64; the file sizes on
huggingface.co/TobiasRobotics/Patch-NetVLAD agree to within the zip overhead) and are cast
to float32 when loaded. The Mapillary models use **16** clusters (WPCA input 8192), the
Pittsburgh ones 64 (input 32768); upstream reads ``K`` from ``pool.centroids``, here it is
the ``num_clusters`` option (16, for ``mapillary_WPCA4096.pth.tar`` of ``performance.ini``)
and a file with another ``K`` or ``num_pcs`` is refused with a message saying what to set.

Test time follows upstream's ``feature_extract.py`` with ``configs/performance.ini``:

- the image is resized to 480 x 640 (height x width; PIL bilinear, torchvision's
  ``Resize((480, 640))`` on a PIL image, which is what ``resize: [480, 640]`` gives here),
  scaled to [0, 1] and normalised with the ImageNet mean / std;
- patch sizes 2, 5, 8 (in conv5_3 cells of 16 x 16 px), strides 1, 1, 1: at 480 x 640 the
  30 x 40 feature map gives 29 x 39 + 26 x 36 + 23 x 33 = 2826 patches of 4096 dims;
- the ``performance.ini`` patch weights (0.45, 0.15, 0.4), used when scoring, are kept in
  ``patch_weights``; :meth:`PatchNetVLAD.scorer_confs` turns them into scorer confs.

Outputs, per image: ``descriptors [N, num_pcs]`` (all patch sizes stacked in the order of
``patch_sizes``; within a size row-major over the patch grid, upstream's order), ``levels
[N]`` (index of the patch size), ``scores`` (ones: every patch is kept, there is no
detector, so ``max_keypoints`` must stay unset), ``keypoints [N, 2]`` and
``global_descriptor [num_pcs]`` (upstream's NetVLAD + WPCA global descriptor).

Keypoints are the patch centres in pixels of the given image, with pixel centres at
integer coordinates: feature cell ``c`` covers pixels ``16 c .. 16 c + 15`` (VGG's output
stride; the receptive-field box upstream's ``calc_receptive_boxes`` uses, ``16 c - 90 ..
16 c + 105``, has the same centre), so the patch at grid position ``(i, j)`` (top-left cell
``(s i, s j)``) has its centre at ``x = 16 s j + (16 p - 1) / 2``, ``y = 16 s i + (16 p - 1) / 2``.
Upstream's ``calc_keypoint_centers_from_patches`` computes the same centre but stores it in
an integer array, i.e. truncates it by 0.5 px (``16 j + 8 (p - 1) + 7``): a translation of
both images' points, which leaves RANSAC's inlier counts and the rapid-spatial-scoring grid
displacements unchanged. For strides above 1 upstream's function places the patches wrongly
(it steps ``range(0, Hout, stride)`` over the already strided grid and leaves the rest of the
array at zero); the formula above is the correct one. Keypoints stay in pixels of the image
the model saw (480 x 640 by default), so RANSAC thresholds in pixels (upstream: 1.5 x 16 x
stride = 24 px) apply directly.

Matching and scoring as upstream (``local_matcher.py``, ``tools/patch_matcher.py``), for the
record: per patch size, mutual nearest neighbours on ``sqrt(2 - 2 <q, d> + 1e-9)``; with
``performance.ini`` (``matcher = RANSAC``) ``cv2.findHomography(database -> query points,
RANSAC, 1.5 * 16 * stride px)`` (OpenCV's default 2000 iterations, confidence 0.995) on the
mutual matches in database-index order, 0 below 4 matches, score ``-inliers / #query
patches``; with ``speed.ini`` / ``storage.ini`` (``spatialApproximator``) rapid spatial
scoring on the patch-grid indices; then per patch size a z-score over the query's candidates
(population std) and the sum weighted by ``patch_weights``, lower is better.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_file, unwrap
from .base import LocalModel, weights_file

logger = logging.getLogger(__name__)

#: upstream's ``input_transform`` normalisation (ImageNet statistics)
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
#: output stride of VGG-16 at conv5_3 (four 2x2 max-pools)
CELL = 16
#: channels of conv5_3
ENCODER_DIM = 512
#: VGG-16 ``features`` (torchvision's config "D"); "M" is a 2x2 max-pool
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: upstream's RANSAC reprojection threshold: 1.5 patch strides of 16 px
RANSAC_THRESHOLD_STRIDES = 1.5

#: upstream's ``configs/*.ini`` as confs (weights path aside); ``performance`` is the default
PRESETS = {
    "performance": {"num_clusters": 16, "num_pcs": 4096, "patch_sizes": [2, 5, 8], "strides": [1, 1, 1],
                    "patch_weights": [0.45, 0.15, 0.4], "resize": [480, 640]},  # mapillary_WPCA4096, RANSAC
    "speed": {"num_clusters": 16, "num_pcs": 512, "patch_sizes": [5], "strides": [1],
              "patch_weights": [1.0], "resize": [480, 640]},  # mapillary_WPCA512, rapid spatial scoring
    "storage": {"num_clusters": 16, "num_pcs": 128, "patch_sizes": [5], "strides": [1],
                "patch_weights": [1.0], "resize": [480, 640]},  # mapillary_WPCA128, rapid spatial scoring
}


def vgg16_conv5_3() -> nn.Sequential:
    """VGG-16 ``features[:-2]``: up to conv5_3, its ReLU and the last max-pool removed;
    module indices (hence ``encoder.<i>.weight``) as torchvision's."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers[:-1])


def integral_feature(x: torch.Tensor) -> torch.Tensor:
    """``[N, D, H, W]`` -> integral image ``[N, D, H + 1, W + 1]`` (zero first row and column)."""
    return F.pad(x.cumsum(dim=-1).cumsum(dim=-2), (1, 0, 1, 0))


def square_regions(integral: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Mean over every ``patch_size``-square window at ``stride`` of the map behind
    ``integral``: ``[N, D, Hout, Wout]`` with ``Hout = (H - p) // s + 1``.

    A depth-wise 2x2 convolution dilated by ``p`` with weights ``[[1, -1], [-1, 1]]``
    computes ``I[y, x] - I[y, x + p] - I[y + p, x] + I[y + p, x + p]`` (upstream's
    ``get_square_regions_from_integral``).
    """
    d = integral.shape[1]
    weight = integral.new_ones(d, 1, 2, 2)
    weight[:, :, 0, 1] = -1
    weight[:, :, 1, 0] = -1
    out = F.conv2d(integral, weight, stride=stride, dilation=patch_size, groups=d)
    return out / patch_size**2


def patch_centres(height: int, width: int, patch_size: int, stride: int) -> torch.Tensor:
    """Pixel centres ``[P, 2]`` (x, y) of the patches of a ``height x width`` feature map,
    row-major (upstream's patch order): ``16 s j + (16 p - 1) / 2``."""
    hout = (height - patch_size) // stride + 1
    wout = (width - patch_size) // stride + 1
    if hout <= 0 or wout <= 0:
        return torch.zeros(0, 2)
    offset = (CELL * patch_size - 1) / 2
    ys = torch.arange(hout, dtype=torch.float32) * (CELL * stride) + offset
    xs = torch.arange(wout, dtype=torch.float32) * (CELL * stride) + offset
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


class NetVLADPool(nn.Module):
    """Upstream's ``PatchNetVLAD`` pooling layer (``vladv2 = False``): parameters
    ``conv.weight [K, D, 1, 1]`` (soft-assignment) and ``centroids [K, D]``."""

    def __init__(self, num_clusters: int, dim: int = ENCODER_DIM):
        super().__init__()
        self.num_clusters, self.dim = num_clusters, dim
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    def residuals(self, features: torch.Tensor) -> torch.Tensor:
        """conv5_3 ``[N, D, H, W]`` -> soft-assigned residuals ``[N, K, D, H, W]``."""
        x = F.normalize(features, p=2, dim=1)
        assign = F.softmax(self.conv(x), dim=1)  # [N, K, H, W]
        res = x[:, None] - self.centroids[None, :, :, None, None]
        res *= assign[:, :, None]
        return res


def vlad_normalise(vlad: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """``[N, K * D, P]`` VLADs -> intra-normalised (per cluster) then L2-normalised (over K * D)."""
    n, kd, p = vlad.shape
    vlad = F.normalize(vlad.view(n, num_clusters, kd // num_clusters, p), p=2, dim=2)
    return F.normalize(vlad.view(n, kd, p), p=2, dim=1)


class PatchNetVLADNet(nn.Module):
    """``encoder``, ``pool`` and ``WPCA``: the parameter names of the released files."""

    def __init__(self, num_clusters: int = 16, num_pcs: int = 4096, dim: int = ENCODER_DIM):
        super().__init__()
        self.num_clusters, self.num_pcs, self.dim = num_clusters, num_pcs, dim
        self.encoder = vgg16_conv5_3()
        self.pool = NetVLADPool(num_clusters, dim)
        self.WPCA = nn.Sequential(nn.Conv2d(num_clusters * dim, num_pcs, kernel_size=1))

    def project(self, vlad: torch.Tensor) -> torch.Tensor:
        """VLADs ``[P, K * D]`` -> WPCA descriptors ``[P, num_pcs]``, L2-normalised.

        Upstream's ``get_pca_encoding`` runs the 1x1 convolution on ``[P, K * D, 1, 1]``; the
        same product as a matrix multiplication is twice as fast on the CPU and differs by
        float rounding only (~5e-8).
        """
        conv = self.WPCA[0]
        out = F.linear(vlad, conv.weight.view(conv.out_channels, -1), conv.bias)
        return F.normalize(out, p=2, dim=-1)

    def forward(self, x: torch.Tensor, patch_sizes, strides) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalised images ``[N, 3, H, W]`` -> (per patch size ``[N, P, num_pcs]``,
        global descriptors ``[N, num_pcs]``)."""
        res = self.pool.residuals(self.encoder(x))  # [N, K, D, h, w]
        n, k, d, h, w = res.shape
        glob = vlad_normalise(res.view(n, k * d, h * w).sum(dim=-1, keepdim=True), k)[..., 0]
        integral = integral_feature(res.view(n, k * d, h, w))
        del res
        local = []
        for p, s in zip(patch_sizes, strides):
            if h < p or w < p:  # the feature map is smaller than the patch
                local.append(x.new_zeros(n, 0, self.num_pcs))
                continue
            vlad = vlad_normalise(square_regions(integral, p, s).flatten(2), k)  # [N, K*D, P]
            num = vlad.shape[-1]
            desc = self.project(vlad.permute(2, 0, 1).reshape(num * n, k * d))
            local.append(desc.view(num, n, self.num_pcs).transpose(0, 1))
        return local, self.project(glob)


def _positive_ints(values, what: str) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ValueError(f"PatchNetVLAD: {what} must be a non-empty list of positive integers, got {values!r}")
    return list(values)


class PatchNetVLAD(LocalModel):
    """Patch-NetVLAD patch descriptors (+ the NetVLAD global descriptor); ``weights`` is
    a released ``mapillary_WPCA*.pth.tar`` / ``pitts_WPCA*.pth.tar`` (set ``num_clusters``:
    16 / 64 and ``num_pcs`` to match)."""

    default_conf: ClassVar[dict[str, Any]] = {
        "weights": None,
        "num_clusters": 16,
        "num_pcs": 4096,
        "patch_sizes": [2, 5, 8],
        "strides": [1, 1, 1],
        "patch_weights": [0.45, 0.15, 0.4],
        "resize": [480, 640],
        "max_keypoints": None,
    }

    def __init__(self, conf=None):
        super().__init__(conf)
        c = self.conf
        self.patch_sizes = _positive_ints(c["patch_sizes"], "patch_sizes")
        self.strides = _positive_ints(c["strides"], "strides")
        if len(self.strides) != len(self.patch_sizes):
            raise ValueError(f"PatchNetVLAD: {len(self.patch_sizes)} patch_sizes but {len(self.strides)} strides")
        if len(c["patch_weights"]) != len(self.patch_sizes):
            raise ValueError(
                f"PatchNetVLAD: {len(self.patch_sizes)} patch_sizes but {len(c['patch_weights'])} patch_weights"
            )
        if c["max_keypoints"] not in (None, -1):
            raise ValueError(
                f"PatchNetVLAD: max_keypoints must be None (every patch is kept, as upstream), got {c['max_keypoints']}"
            )
        _positive_ints([c["num_clusters"], c["num_pcs"]], "num_clusters and num_pcs")
        with torch.device("meta"):  # no random init of the big WPCA: the checkpoint fills it
            net = PatchNetVLADNet(c["num_clusters"], c["num_pcs"])
        self.net = net.to_empty(device="cpu")
        self._warned_size = False
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1), persistent=False)
        self.load_checkpoint(weights_file(c["weights"], "PatchNetVLAD"))
        self.eval()

    @property
    def descriptor_dim(self) -> int:
        return self.conf["num_pcs"]

    def load_checkpoint(self, path) -> None:
        """Load a released ``{'num_pcs': N, 'state_dict': {encoder.*, pool.*, WPCA.*}}`` file
        (or the bare state dict; ``module.`` prefixes stripped); float64 WPCA tensors are cast
        to float32. A mismatch raises ValueError naming ``path`` and the keys."""
        path = str(path)
        what = "PatchNetVLAD checkpoint"
        state, layout = unwrap(read_file(path, what), path, what)
        c = self.conf
        for key, dim, option in (("pool.centroids", c["num_clusters"], "num_clusters"),
                                 ("WPCA.0.bias", c["num_pcs"], "num_pcs")):
            if key in state and state[key].ndim >= 1 and state[key].shape[0] != dim:
                raise ValueError(
                    f"{what} {path}: {key} has shape {tuple(state[key].shape)}, the model {option}={dim}; "
                    f"set {option}: {state[key].shape[0]} (mapillary_WPCA*: 16 clusters, pitts_WPCA*: 64)"
                )
        load_into(self.net, state, path, what, layout,
                  f"Patch-NetVLAD, {c['num_clusters']} clusters, WPCA to {c['num_pcs']}")

    def scorer_confs(self) -> dict[str, dict]:
        """Scorer confs with upstream's matching settings for these patches: RANSAC per patch
        size with a reprojection threshold of 1.5 strides (``1.5 * 16 * s`` px), rapid
        spatial scoring on the 16 px grid; both weighted by ``patch_weights``, both in the
        pixels of the image the model saw (``frame: model``: 480 x 640 by default)."""
        weights = [float(w) for w in self.conf["patch_weights"]]
        thresholds = [RANSAC_THRESHOLD_STRIDES * CELL * s for s in self.strides]
        return {
            "multiscale_ransac": {"name": "multiscale_ransac", "method": "ransac", "threshold": thresholds[0],
                                  "thresholds": thresholds, "max_iters": 2000, "confidence": 0.995,
                                  "weights": weights, "frame": "model"},
            "rapid_spatial": {"name": "rapid_spatial", "cell_size": float(CELL), "weights": weights,
                              "frame": "model"},
        }

    @torch.inference_mode()
    def extract(self, image: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """``image [3, H, W]`` in [0, 1] -> (per patch size: descriptors ``[P, num_pcs]``,
        per patch size: centres ``[P, 2]`` in pixels, global descriptor ``[num_pcs]``)."""
        h, w = image.shape[-2:]
        if h < CELL or w < CELL:
            raise ValueError(f"PatchNetVLAD: image {h}x{w} is smaller than one {CELL}x{CELL} VGG cell")
        x = (image[None].float() - self.mean) / self.std
        local, glob = self.net(x, self.patch_sizes, self.strides)
        fh, fw = h // CELL, w // CELL  # conv5_3 size (four floor-halvings)
        centres = [patch_centres(fh, fw, p, s).to(image.device) for p, s in zip(self.patch_sizes, self.strides)]
        return [d[0] for d in local], centres, glob[0]

    def _forward(self, image):
        size = self.conf["resize"]
        if isinstance(size, (list, tuple)) and list(image.shape[-2:]) != list(size) and not self._warned_size:
            logger.warning("PatchNetVLAD: got a %dx%d image, upstream runs at %dx%d (resize: %s); "
                           "keypoints are in pixels of the image given", *image.shape[-2:], *size, list(size))
            self._warned_size = True
        descs, centres, glob = self.extract(image)
        levels = torch.cat([torch.full((len(d),), i, dtype=torch.int64, device=image.device)
                            for i, d in enumerate(descs)])
        keypoints = torch.cat(centres)
        return {
            "keypoints": keypoints,
            "descriptors": torch.cat(descs),
            "scores": torch.ones(len(keypoints), device=image.device),
            "levels": levels,
            "global_descriptor": glob,
        }


def random_state(num_clusters: int = 16, num_pcs: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict of :class:`PatchNetVLADNet` in float32.

    He-normal convolutions with small biases (VGG has no normalisation, He keeps the
    activations' scale), unit-norm random centroids scaled by 0.5, the soft-assignment
    ``30 * c_k / |c_k|`` (upstream's ``init_params`` form ``alpha * c_k / |c_k|``, with an
    alpha that gives a non-uniform assignment), and a random WPCA ``N(0, 1 / (K * 512))``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # shapes only
        template = PatchNetVLADNet(num_clusters, num_pcs).state_dict()
    state = {}
    for key, value in template.items():
        if key.startswith("encoder.") and key.endswith(".weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif key.endswith(".bias"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.01
    centroids = F.normalize(torch.randn(num_clusters, ENCODER_DIM, generator=gen), dim=1)
    state["pool.centroids"] = 0.5 * centroids
    state["pool.conv.weight"] = (30.0 * centroids)[:, :, None, None]
    wpca = template["WPCA.0.weight"]
    state["WPCA.0.weight"] = torch.randn(wpca.shape, generator=gen) / math.sqrt(wpca[0].numel())
    return {k: state[k] for k in template}


def official_layout(state: dict[str, torch.Tensor]) -> dict:
    """``state`` as upstream's ``add_pca.py`` saves it: ``{'num_pcs', 'state_dict'}`` with the
    WPCA tensors in float64."""
    out = {k: (v.double() if k.startswith("WPCA.") else v.float()).contiguous() for k, v in state.items()}
    return {"num_pcs": int(state["WPCA.0.bias"].shape[0]), "state_dict": out}


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded random Patch-NetVLAD in the released ``mapillary_WPCA*.pth.tar`` layout
    (``num_clusters`` / ``num_pcs`` from ``conf``, default 16 / 4096: about 330 MB)."""
    c = {**PatchNetVLAD.default_conf, **(conf or {})}
    state = random_state(int(c["num_clusters"]), int(c["num_pcs"]), seed)
    torch.save(official_layout(state), Path(path))
