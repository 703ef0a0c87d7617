"""SuperPoint (DeTone et al., CVPRW 2018) loading the Magic Leap ``superpoint_v1`` weights.

Architecture and parameter names follow Magic Leap's ``SuperPointNet`` (a VGG-style
encoder ``conv1a..conv4b`` with three 2x2 max-pools, a detector head ``convPa, convPb``
giving 64 cells + 1 "no keypoint" dustbin per 8x8 patch, and a descriptor head
``convDa, convDb`` giving a 256-d map at 1/8 resolution), so the upstream file loads
as is. Post-processing follows the SuperPoint of the SuperGlue repository (what the
thesis ran with SuperGlue), not the older ``SuperPointFrontend`` demo:

- heatmap: softmax over the 65 channels, dustbin dropped, cells rearranged to pixels
  (depth-to-space);
- non-maximum suppression by max-pooling (window ``2 * nms_radius + 1``) with two
  rounds of suppression/recovery; keypoints are the pixels above
  ``keypoint_threshold`` (0.005, the demo uses 0.015);
- keypoints closer than ``remove_borders`` pixels to the border of the
  ``8 * (H // 8)`` by ``8 * (W // 8)`` area covered by the heatmap are dropped;
- the ``max_keypoints`` highest scores are kept (``None`` or -1: all), sorted by
  decreasing score;
- descriptors are sampled bilinearly from the L2-normalised coarse map, with the
  SuperGlue mapping of pixel ``x`` to cell coordinate ``(x - 3.5) / 8`` (the centre
  of cell ``i`` is pixel ``8 i + 3.5``), then L2-normalised.

Input: our images are RGB; SuperPoint sees one grey channel. We use the ITU-R BT.601
luma weights ``0.299 R + 0.587 G + 0.114 B`` (OpenCV's ``cvtColor(RGB2GRAY)`` and the
JPEG Y channel that ``cv2.imread(..., IMREAD_GRAYSCALE)`` returns, as in upstream's
demos), computed in float on the [0, 1] image without rounding to 8 bits.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import load_into, read_file, unwrap
from .base import LocalModel, weights_file

#: RGB -> grey weights (ITU-R BT.601, as OpenCV's RGB2GRAY and the JPEG luma channel).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CELL = 8  # the encoder downsamples by 2**3


def rgb_to_gray(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB in [0, 1] to ``[1, 1, H, W]`` grey in [0, 1]."""
    r, g, b = GRAY_WEIGHTS
    gray = r * image[0] + g * image[1] + b * image[2]
    return gray[None, None]


def max_pool_nms(heatmap: torch.Tensor, radius: int) -> torch.Tensor:
    """Zero every score that is not a local maximum in a ``(2r+1)^2`` window.

    ``heatmap`` is ``[B, H, W]``. A first pass keeps the window maxima; then, twice,
    points that are not covered by a kept maximum's window may be recovered when they
    are maxima among the remaining (not yet suppressed) scores.
    """
    return heatmap * max_pool_nms_mask(heatmap, radius)


def max_pool_nms_mask(heatmap: torch.Tensor, radius: int) -> torch.Tensor:
    """The boolean mask of :func:`max_pool_nms` (``[B, H, W]`` or ``[B, C, H, W]``): SuperGlue's
    and ALIKED's upstream ``simple_nms``, which keeps ties and two rounds of recovered maxima."""
    if radius < 0:
        raise ValueError(f"nms_radius must be >= 0, got {radius}")
    size = 2 * radius + 1

    def window_max(x):
        return F.max_pool2d(x, kernel_size=size, stride=1, padding=radius)

    keep = heatmap == window_max(heatmap)
    for _ in range(2):
        covered = window_max(keep.float()) > 0
        rest = heatmap.masked_fill(covered, 0.0)
        keep = keep | ((rest == window_max(rest)) & ~covered)
    return keep


def sample_descriptors(keypoints: torch.Tensor, coarse: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Bilinear descriptors ``[N, D]`` at pixel positions ``keypoints [N, 2]`` (x, y).

    ``coarse`` is the ``[1, D, Hc, Wc]`` descriptor map. Pixel ``x`` maps to cell
    coordinate ``(x - cell/2 + 0.5) / cell``; the normalised coordinate for
    ``grid_sample(align_corners=True)`` spans the pixel range
    ``[cell/2 - 0.5, Wc*cell - cell/2 - 0.5]`` as SuperGlue's ``sample_descriptors`` does.
    """
    _, dim, hc, wc = coarse.shape
    offset = cell / 2 - 0.5
    span = torch.tensor([wc * cell - cell / 2 - 0.5, hc * cell - cell / 2 - 0.5]).to(keypoints)
    grid = (keypoints - offset) / span * 2 - 1
    desc = F.grid_sample(coarse, grid.view(1, 1, -1, 2), mode="bilinear", align_corners=True)
    return F.normalize(desc.reshape(dim, -1), p=2, dim=0).t()


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=1, padding=k // 2)


class SuperPoint(LocalModel):
    """SuperPoint detector and descriptor; ``weights`` is the ``superpoint_v1.pth`` file."""

    default_conf = {"weights": None, "nms_radius": 4, "keypoint_threshold": 0.005, "remove_borders": 4,
                    "resize_max": 1024}  # hloc's superpoint_aachen conf (outdoor localization)

    def __init__(self, conf=None):
        super().__init__(conf)
        mk = self.conf["max_keypoints"]
        if mk is not None and (mk == 0 or mk < -1):
            raise ValueError(f"SuperPoint: max_keypoints must be positive, -1 or None (all), got {mk}")
        c1, c2, c3, c4, c5 = 64, 64, 128, 128, 256
        # the names are upstream's parameter names
        self.conv1a, self.conv1b = _conv(1, c1, 3), _conv(c1, c1, 3)
        self.conv2a, self.conv2b = _conv(c1, c2, 3), _conv(c2, c2, 3)
        self.conv3a, self.conv3b = _conv(c2, c3, 3), _conv(c3, c3, 3)
        self.conv4a, self.conv4b = _conv(c3, c4, 3), _conv(c4, c4, 3)
        self.convPa, self.convPb = _conv(c4, c5, 3), _conv(c5, CELL * CELL + 1, 1)
        self.convDa, self.convDb = _conv(c4, c5, 3), _conv(c5, self.descriptor_dim, 1)
        self.load_checkpoint(weights_file(self.conf["weights"], "SuperPoint"))
        self.eval()

    @property
    def descriptor_dim(self) -> int:
        return 256

    def load_checkpoint(self, path) -> None:
        """Load a ``superpoint_v1`` state dict (plain, under ``'state_dict'``, or with
        ``'module.'`` prefixes); a mismatch raises ValueError naming ``path``."""
        path = str(path)
        state, layout = unwrap(read_file(path, "SuperPoint checkpoint"), path, "SuperPoint checkpoint")
        load_into(self, state, path, "SuperPoint checkpoint", layout, "superpoint_v1")

    def encode(self, gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grey ``[B, 1, H, W]`` -> (detector logits ``[B, 65, H/8, W/8]``,
        descriptor map ``[B, 256, H/8, W/8]``, not normalised)."""
        x = gray
        for i, (a, b) in enumerate(
            [(self.conv1a, self.conv1b), (self.conv2a, self.conv2b), (self.conv3a, self.conv3b), (self.conv4a, self.conv4b)]
        ):
            if i:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = F.relu(b(F.relu(a(x))))
        logits = self.convPb(F.relu(self.convPa(x)))
        desc = self.convDb(F.relu(self.convDa(x)))
        return logits, desc

    def _forward(self, image):
        c = self.conf
        logits, coarse = self.encode(rgb_to_gray(image))
        _, _, hc, wc = logits.shape
        h, w = hc * CELL, wc * CELL  # the area the heatmap covers

        # per-pixel probabilities: softmax over the 65 bins, dustbin dropped, depth-to-space
        prob = logits.softmax(dim=1)[:, :-1]
        heat = prob.reshape(1, CELL, CELL, hc, wc).permute(0, 3, 1, 4, 2).reshape(1, h, w)
        heat = max_pool_nms(heat, c["nms_radius"])[0]

        ys, xs = torch.nonzero(heat > c["keypoint_threshold"], as_tuple=True)
        scores = heat[ys, xs]
        b = c["remove_borders"]
        inside = (ys >= b) & (ys < h - b) & (xs >= b) & (xs < w - b)
        ys, xs, scores = ys[inside], xs[inside], scores[inside]

        order = torch.argsort(scores, descending=True, stable=True)
        mk = c["max_keypoints"]
        if mk is not None and mk > 0:
            order = order[:mk]
        keypoints = torch.stack([xs[order], ys[order]], dim=1).float()
        scores = scores[order]

        descriptors = sample_descriptors(keypoints, F.normalize(coarse, p=2, dim=1))
        return {"keypoints": keypoints, "descriptors": descriptors, "scores": scores}
