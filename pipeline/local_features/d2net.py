"""D2-Net (Dusmanu et al., CVPR 2019) loading the released ``d2_tf.pth`` weights.

The network is upstream's test-time model (``lib/model_test.py`` of
mihaidusmanu/d2-net), rebuilt with the same module names so that the released file
(``{'model': state_dict}``, keys ``dense_feature_extraction.model.<i>.weight|bias``)
loads as is:

- ``dense_feature_extraction.model``: VGG-16 up to ``conv4_3`` (indices as in
  torchvision's ``vgg16().features``: convolutions at 0, 2, 5, 7, 10, 12, 14, 17, 19,
  21), with the two test-time changes of the paper (section 4.3): ``pool3`` (index 16)
  becomes a 2x2 *average* pooling with stride 1, and ``conv4_1..conv4_3`` are dilated
  by 2 (padding 2), so the feature map has stride 4 instead of 8. A ReLU follows
  ``conv4_3`` (upstream's ``use_relu=True``, the default of ``extract_features.py``).
  7,635,264 parameters; descriptors are the 512 channels.

Inference follows upstream's ``extract_features.py --multiscale`` (what the thesis ran,
section 4.3.2.4):

- the image is read as 8 bits (our ``[0, 1]`` input is mapped back to its 8-bit
  levels); if its longer side exceeds ``max_edge`` (1600) it is resized by
  ``max_edge / longer side``, then if the sum of its sides exceeds ``max_sum_edges``
  (2800) by ``max_sum_edges / (H + W)``, each time as ``scipy.misc.imresize`` does it
  (sizes truncated to integers, PIL bilinear on the 8-bit image; PIL runs on the CPU).
  Upstream's quirk is kept: the second resize receives the float output of the first,
  which ``imresize`` contrast-stretches to 0..255 (``bytescale``) before resizing.
  Keypoints are scaled back to the given image by ``H / h`` and ``W / w``;
- ``caffe`` preprocessing: RGB to BGR and subtraction of the Caffe mean pixel
  ``(103.939, 116.779, 123.68)`` from the 0-255 values (no division);
- ``lib/pyramid.py``'s ``process_multiscale`` with scales ``(0.5, 1, 2)``: at each
  scale the image is resized bilinearly (``align_corners=True``, size
  ``floor(s H) x floor(s W)``), its feature map gets the previous (accumulated) feature
  map added after bilinear upsampling (``align_corners=True``), and then
  * hard detection: a pixel/channel ``(c, i, j)`` is detected where channel ``c`` is the
    maximum over channels at ``(i, j)``, ``(i, j)`` is the maximum of channel ``c`` in
    its 3x3 window, and the 3x3 Hessian (finite differences, zero padding) passes the
    edge test ``tr^2 / det <= (e + 1)^2 / e`` with ``det > 0`` (``e = 5``); pixels
    detected at a coarser scale are banned (nearest upsampling of the banned mask);
  * localisation: one Newton step ``-H^-1 grad``; detections whose step exceeds 0.5
    in either direction are dropped; positions are refined by the step;
  * descriptors: bilinear interpolation of the (accumulated) feature map at the
    refined position (positions needing a corner outside the map are dropped), then
    L2-normalised; score: the feature value at ``(c, i, j)`` divided by the scale's
    index + 1;
  * map position ``p`` to input pixels ``4 p + 1.5`` (upstream's ``upscale_positions``
    twice), times the input / scaled image size ratio;
- upstream keeps every detection. So does ``max_keypoints: None`` (or -1), our
  default, which reproduces the thesis (2,775 keypoints per image on average, its Table 4.2);
  a positive ``max_keypoints`` keeps the highest scores. Keypoints come sorted by
  decreasing score (upstream's order is by scale, then channel, row, column).

Upstream computes the Hessian, gradient and Newton step as dense maps over all
channels; here they are computed with the same formulas only at the candidate
pixels (maxima over channels and in space), which needs far less memory. The sums of
three or four finite-difference terms could round in another order than upstream's
``conv2d``; on the reference fixture (``tests/test_d2net.py``) keypoints, scores and
descriptors came out bit-identical to upstream's on the same CPU.

On a GPU, PyTorch runs convolutions in TF32 by default (``torch.backends.cudnn``
``allow_tf32`` / ``conv.fp32_precision``), a global setting this module leaves alone.
Measured on an H200 (random weights, a 640x480 image): in float32 the keypoints are the
CPU's (all within 1e-3 px, descriptors within 5e-6); with TF32 about 1% of them differ
(the exact-comparison detections flip) and 37% move by more than 0.01 px, at 3.6x the
speed.

Deviation: upstream fails on a pyramid level smaller than 8 pixels on a side (e.g. the
0.5 level of an image under 16 pixels); such levels are skipped here (an image under
8 pixels gives no keypoints).

The resizing code of ``extract_features.py`` needs ``scipy.misc.imresize`` (removed
from SciPy 1.3), so it is reproduced from SciPy's source rather than run; images whose
sides are at most 1600 px and sum to at most 2800 px are not resized at all.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_state_dict
from .base import LocalModel, weights_file

#: Caffe VGG-16 mean pixel, BGR order (upstream's ``preprocess_image(..., 'caffe')``)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: ``preprocess_image(..., 'torch')``: RGB / 255, ImageNet statistics
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
STRIDE_STEPS = 2  # two stride-2 poolings: feature map position p -> pixel 4 p + 1.5
MIN_LEVEL_SIZE = 8  # smaller pyramid levels leave the stride-1 average pooling a 1-pixel map
#: (output channels, dilation) per convolution; "M": 2x2 max-pool stride 2, "A": 2x2 avg-pool stride 1
VGG16_CONV4_3 = [(64, 1), (64, 1), "M", (128, 1), (128, 1), "M", (256, 1), (256, 1), (256, 1), "A",
                 (512, 2), (512, 2), (512, 2)]


def make_vgg16_conv4_3() -> nn.Sequential:
    """Upstream's test-time VGG-16 trunk; indices (hence state-dict keys) as upstream."""
    layers: list[nn.Module] = []
    cin = 3
    for spec in VGG16_CONV4_3:
        if spec == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        elif spec == "A":
            layers.append(nn.AvgPool2d(2, stride=1))
        else:
            cout, dilation = spec
            layers += [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            cin = cout
    return nn.Sequential(*layers[:-1])  # upstream's Sequential ends with conv4_3 (the ReLU is in forward)


class DenseFeatureExtraction(nn.Module):
    """Upstream's ``DenseFeatureExtractionModule`` (``model_test.py``)."""

    num_channels = 512

    def __init__(self, use_relu: bool = True):
        super().__init__()
        self.model = make_vgg16_conv4_3()
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)
        return F.relu(x) if self.use_relu else x


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a randomly initialised (seeded) D2-Net in the released ``d2_tf.pth`` layout.

    ``{'model': state_dict}`` with float32 tensors under upstream's key names. Weights are
    He-normal (fan in), biases uniform in [-0.05, 0.05], drawn from ``torch.manual_seed(seed)``.
    ``conf`` is accepted for the common signature; the architecture does not depend on it.
    The result is NOT a trained model: keypoints from it are only good for testing.
    """
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        net = DenseFeatureExtraction()
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.uniform_(m.bias, -0.05, 0.05)
    state = {f"dense_feature_extraction.{k}": v.detach().clone().float() for k, v in net.state_dict().items()}
    torch.save({"model": state}, path)


def _neighbours(fmap: torch.Tensor, c: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> dict:
    """Values of ``fmap [C, h, w]`` at ``(c, i + di, j + dj)`` for di, dj in {-1, 0, 1}
    (zero outside the map, as ``conv2d(padding=1)`` sees it), keyed by ``(di, dj)``."""
    padded = F.pad(fmap, (1, 1, 1, 1))
    return {(di, dj): padded[c, i + 1 + di, j + 1 + dj] for di in (-1, 0, 1) for dj in (-1, 0, 1)}


def _hessian(v: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's finite-difference second derivatives (``dii``, ``dij``, ``djj`` filters)."""
    dii = v[-1, 0] - 2 * v[0, 0] + v[1, 0]
    dij = 0.25 * v[-1, -1] - 0.25 * v[-1, 1] - 0.25 * v[1, -1] + 0.25 * v[1, 1]
    djj = v[0, -1] - 2 * v[0, 0] + v[0, 1]
    return dii, dij, djj


def _bilinear(fmap: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's ``interpolate_dense_features``: ``fmap [C, h, w]`` at ``pos [2, N]`` (i, j).

    Returns descriptors ``[C, M]`` and the indices of the ``M`` positions whose four
    corners (floor / ceil) lie inside the map.
    """
    _, h, w = fmap.shape
    i, j = pos[0], pos[1]
    i0, j0 = torch.floor(i).long(), torch.floor(j).long()
    i1, j1 = torch.ceil(i).long(), torch.ceil(j).long()
    ids = torch.nonzero((i0 >= 0) & (j0 >= 0) & (i1 < h) & (j1 < w), as_tuple=True)[0]
    i, j, i0, j0, i1, j1 = (t[ids] for t in (i, j, i0, j0, i1, j1))
    di, dj = i - i0.float(), j - j0.float()
    desc = (
        (1 - di) * (1 - dj) * fmap[:, i0, j0]
        + (1 - di) * dj * fmap[:, i0, j1]
        + di * (1 - dj) * fmap[:, i1, j0]
        + di * dj * fmap[:, i1, j1]
    )
    return desc, ids


def _target_size(h: int, w: int, max_edge, max_sum_edges) -> list[tuple[int, int]]:
    """The sizes ``extract_features.py`` resizes an ``h x w`` image to, in order (0 to 2)."""
    sizes = []
    if max_edge and max(h, w, 3) > max_edge:  # upstream takes max(image.shape), channels included
        f = max_edge / max(h, w, 3)
        h, w = int(h * f), int(w * f)  # scipy.misc.imresize truncates
        sizes.append((h, w))
    if max_sum_edges and h + w > max_sum_edges:
        f = max_sum_edges / (h + w)
        h, w = int(h * f), int(w * f)
        sizes.append((h, w))
    return sizes


def _bytescale(arr: np.ndarray) -> np.ndarray:
    """``scipy.misc.bytescale`` with its defaults: stretch to 0..255, round, ``uint8``."""
    if arr.dtype == np.uint8:
        return arr
    lo, hi = arr.min(), arr.max()
    scale = 255.0 / ((hi - lo) or 1)
    return (((arr - lo) * scale).clip(0, 255) + 0.5).astype(np.uint8)


def _imresize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """What ``scipy.misc.imresize(arr, factor)`` returns for a ``[H, W, 3]`` array, given
    the size it computes: PIL bilinear resize of the 8-bit image (a float array is first
    ``bytescale``d, as ``toimage`` does), as float64."""
    img = Image.fromarray(_bytescale(arr))
    return np.asarray(img.resize((w, h), Image.BILINEAR)).astype(np.float64)


class D2Net(LocalModel):
    """D2-Net multi-scale detector and descriptor; ``weights`` is ``d2_tf.pth``
    (or ``d2_tf_no_phototourism.pth``, ``d2_ots.pth``: same layout)."""

    default_conf: ClassVar[dict[str, Any]] = {
        "weights": None,
        "max_keypoints": None,  # upstream keeps every detection
        "scales": [0.5, 1.0, 2.0],  # extract_features.py --multiscale; [1] for single scale
        "preprocessing": "caffe",
        "max_edge": 1600,
        "max_sum_edges": 2800,
        "use_relu": True,
        "edge_threshold": 5.0,
    }
    descriptor_dim = 512
    #: upstream shrinks the image to max_edge (1600) / max_sum_edges (2800) itself
    size_bound = "max_edge"

    def __init__(self, conf=None):
        super().__init__(conf)
        c = self.conf
        mk = c["max_keypoints"]
        if mk is not None and (mk == 0 or mk < -1):
            raise ValueError(f"D2Net: max_keypoints must be positive, -1 or None (all), got {mk}")
        if not c["scales"] or any(not s > 0 for s in c["scales"]):
            raise ValueError(f"D2Net: scales must be a non-empty list of positive numbers, got {c['scales']}")
        if c["preprocessing"] not in ("caffe", "torch"):
            raise ValueError(f"D2Net: preprocessing must be 'caffe' or 'torch', got {c['preprocessing']!r}")
        for key in ("max_edge", "max_sum_edges"):
            if c[key] is not None and not c[key] > 0:
                raise ValueError(f"D2Net: {key} must be positive or None, got {c[key]}")
        if not c["edge_threshold"] > 0:
            raise ValueError(f"D2Net: edge_threshold must be positive, got {c['edge_threshold']}")
        self.dense_feature_extraction = DenseFeatureExtraction(use_relu=c["use_relu"])
        self.load_checkpoint(weights_file(c["weights"], "D2Net"))
        self.eval()

    def load_checkpoint(self, path) -> None:
        """Load upstream's ``{'model': state_dict, ...}`` file (a training checkpoint of
        ``train.py`` too; other entries are ignored) or a plain state dict; a mismatch
        raises ValueError naming ``path`` and the keys."""
        state, layout = read_state_dict(path, "D2Net checkpoint")
        load_into(self, state, str(path), "D2Net checkpoint", layout, "d2_tf.pth")

    def preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """``[3, H, W]`` RGB in [0, 1] -> (network input ``[1, 3, h, w]``, ``H / h``, ``W / w``)."""
        c = self.conf
        x = (image.float() * 255).round()  # upstream reads 8-bit images
        H, W = x.shape[-2:]
        sizes = _target_size(H, W, c["max_edge"], c["max_sum_edges"])
        if sizes:
            arr = x.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            for h, w in sizes:
                arr = _imresize(arr, h, w)
            x = torch.from_numpy(arr).permute(2, 0, 1).float().to(image.device)
        x = x[None]
        h, w = x.shape[-2:]
        # upstream computes in float64 (numpy mean) and casts the result to float32
        if c["preprocessing"] == "caffe":
            mean = torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
            x = (x.flip(1).double() - mean).float()
        else:
            mean = torch.tensor(TORCH_MEAN, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(TORCH_STD, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
            x = ((x / 255).double() - mean).div(std).float()
        return x, H / h, W / w

    def detect(self, fmap: torch.Tensor, banned: torch.Tensor | None):
        """Hard detections in ``fmap [C, h, w]`` not in ``banned [h, w]``: ``(c, i, j)`` in
        upstream's (raster) order and the per-pixel detection mask ``[h, w]``."""
        _, h, w = fmap.shape
        cand = fmap == fmap.max(dim=0, keepdim=True).values
        cand &= fmap == F.max_pool2d(fmap[None], 3, stride=1, padding=1)[0]
        if banned is not None:
            cand &= ~banned
        c, i, j = torch.nonzero(cand, as_tuple=True)
        v = _neighbours(fmap, c, i, j)
        dii, dij, djj = _hessian(v)
        det = dii * djj - dij * dij
        tr = dii + djj
        e = self.conf["edge_threshold"]
        keep = (tr * tr / det <= (e + 1) ** 2 / e) & (det > 0)
        c, i, j = c[keep], i[keep], j[keep]
        detected = torch.zeros(h, w, dtype=torch.bool, device=fmap.device)
        detected[i, j] = True
        return c, i, j, detected

    @staticmethod
    def localize(fmap: torch.Tensor, c, i, j) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's Newton step ``(step_i, step_j)`` at the detections."""
        v = _neighbours(fmap, c, i, j)
        dii, dij, djj = _hessian(v)
        det = dii * djj - dij * dij
        inv_00, inv_01, inv_11 = djj / det, -dij / det, dii / det
        di = -0.5 * v[-1, 0] + 0.5 * v[1, 0]
        dj = -0.5 * v[0, -1] + 0.5 * v[0, 1]
        step_i = -(inv_00 * di + inv_01 * dj)
        step_j = -(inv_01 * di + inv_11 * dj)
        return step_i, step_j

    @torch.inference_mode()
    def extract_multiscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upstream's ``process_multiscale`` on a preprocessed ``x [1, 3, h, w]``:
        (``keypoints [N, 3]`` as (i, j, 1 / scale) in pixels of ``x``, ``scores [N]``,
        ``descriptors [N, 512]``), in upstream's order."""
        _, _, h_init, w_init = x.shape
        kps, scores, descs = [], [], []
        previous, banned = None, None
        for idx, scale in enumerate(self.conf["scales"]):
            level = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
            h_level, w_level = level.shape[-2:]
            if min(h_level, w_level) < MIN_LEVEL_SIZE:
                continue  # upstream fails here (the average pooling gets a 1-pixel map)
            fmap = self.dense_feature_extraction(level)
            del level
            _, _, h, w = fmap.shape
            if previous is not None:
                fmap += F.interpolate(previous, size=[h, w], mode="bilinear", align_corners=True)
            if banned is not None:
                banned = F.interpolate(banned[None, None].float(), size=[h, w])[0, 0].bool()
            c, i, j, detected = self.detect(fmap[0], banned)
            banned = detected if banned is None else banned | detected

            step_i, step_j = self.localize(fmap[0], c, i, j)
            ok = (step_i.abs() < 0.5) & (step_j.abs() < 0.5)
            c, i, j = c[ok], i[ok], j[ok]
            pos = torch.stack([i.float() + step_i[ok], j.float() + step_j[ok]])
            desc, ids = _bilinear(fmap[0], pos)
            c, i, j, pos = c[ids], i[ids], j[ids], pos[:, ids]
            for _ in range(STRIDE_STEPS):
                pos = pos * 2 + 0.5
            pos[0, :] *= h_init / h_level
            pos[1, :] *= w_init / w_level
            kps.append(torch.cat([pos, torch.full_like(pos[:1], 1 / scale)]).t())
            descs.append(F.normalize(desc, dim=0).t())
            scores.append(fmap[0, c, i, j] / (idx + 1))
            previous = fmap
        if not kps:  # every level too small
            return x.new_zeros(0, 3), x.new_zeros(0), x.new_zeros(0, DenseFeatureExtraction.num_channels)
        return torch.cat(kps), torch.cat(scores), torch.cat(descs)

    def _forward(self, image):
        x, fact_i, fact_j = self.preprocess(image)
        kp, scores, desc = self.extract_multiscale(x)
        xy = torch.stack([kp[:, 1] * fact_j, kp[:, 0] * fact_i], dim=1)  # (i, j) -> (x, y)
        order = torch.argsort(scores, descending=True, stable=True)
        mk = self.conf["max_keypoints"]
        if mk is not None and mk > 0:
            order = order[:mk]
        return {"keypoints": xy[order].contiguous(), "descriptors": desc[order], "scores": scores[order]}
