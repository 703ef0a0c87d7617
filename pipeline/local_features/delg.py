"""DELG (Cao et al., ECCV 2020) in the PyTorch implementation of feymanpriv/DELG.

The official DELG weights are TensorFlow SavedModels, which this project cannot read.
We load the checkpoints of the widely used PyTorch reimplementation
https://github.com/feymanpriv/DELG (``r50-delg`` / ``r101-delg``, pycls ``.pyth`` files:
``{'epoch', 'model_state', 'optimizer_state', 'cfg'}``) with upstream's parameter names,
so a released file loads without renaming.

Architecture (upstream ``tools/delg_utils.DelgExtraction``, config
``configs/resnet_delg_8gpu.yaml``):

- ``globalmodel``: a pycls ResNet-50 (or -101), stride on the 3x3 convolutions
  (``STRIDE_1X1: False``), stages ``s1..s4`` with blocks ``b<i>`` (``proj``/``bn`` shortcut,
  ``f.a``, ``f.b``, ``f.c`` with their ``*_bn``), and a global head ``head``: GeM pooling
  with a learnt exponent ``head.pool.p`` on the ``s4`` map, then ``head.fc``, a linear
  "whitening" layer 2048 -> ``global_dim`` (upstream's ``REDUCTION_DIM``, 512);
- ``localmodel``: the attention module on the ``s3`` (conv4, stride 16, 1024-d) map:
  ``conv1`` (1x1, 1024 -> 512) and ``bn``; the local descriptors are the L2-normalised
  BatchNorm output (512-d); the attention score is ``softplus(conv2(relu(.)))``.

Unlike the paper's TensorFlow model, this implementation has *no* autoencoder: its
local descriptors are 512-d, not 128-d, and its global descriptor is ``global_dim``-d
(512 in upstream's config, 2048 in the paper). The training heads of the ``.pyth``
files (``desc_cls``: ArcFace, ``att_cls``: attention classifier) are not used at test
time and are skipped when loading, as upstream's extractor skips them.

Test time, as upstream's ``tools/extractor.py`` runs it (input: our RGB image, in [0, 1]):

- the image is turned to BGR (upstream reads it with ``cv2.imread``) and, per scale
  ``s`` in ``scales`` (7 scales, 1/4 to 2), resized bilinearly (``cv2.INTER_LINEAR``,
  here ``interpolate(align_corners=False)`` without antialiasing) to
  ``round(H s) x round(W s)``, then normalised with the ImageNet mean / std in BGR order;
- local features at each scale: the feature-map cells whose attention exceeds
  ``score_threshold`` (260). Upstream halves the threshold until at least 1000 cells
  pass or it falls below 0.1 (``threshold_target`` / ``min_threshold``; set
  ``threshold_target: None`` for the paper's single fixed threshold);
- a cell ``(row, col)`` of the stride-16 map is a receptive-field box
  ``[16 row - 145, 16 col - 145, 16 row + 145, 16 col + 145] / s`` (receptive field 291,
  padding 145); the keypoint is its centre, ``(16 col / s, 16 row / s)`` in pixels of
  the input image; ``scales`` holds ``s`` (the image scale the feature was found at;
  DELF files store ``1 / s`` instead);
- over all scales, the ``max_keypoints`` (1000) highest attention scores are kept, then
  greedy non-maximum suppression of boxes overlapping more than ``nms_iou`` (0.98,
  which in practice removes only duplicates); features come out sorted by decreasing
  attention;
- global descriptor (the paper's and upstream's DOLG evaluator's protocol): at scales
  ``global_scales`` (1/sqrt2, 1, sqrt2), each ``head`` output L2-normalised, averaged,
  L2-normalised again; returned as ``global_descriptor``.

Deviations from upstream's code, none of which changes a result it computes correctly:
upstream pads its kept indices with zeros (duplicates of feature 0) when NMS removes a
feature, and fails (``len`` of a 0-d tensor) when exactly one cell passes the threshold
at a scale (and cv2 on an image resized to 0 px); here none of this happens. Upstream
builds the ``s4`` map and global head at every scale; here only at ``global_scales``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms

from ..checkpoints import load_into, read_file, unwrap
from ..pycls_resnet import STAGE_DEPTHS
from ..pycls_resnet import ResNet as PyclsResNet
from .base import LocalModel, weights_file

#: upstream's per-channel mean / std in BGR order (``tools/extractor.py``)
BGR_MEAN = (0.406, 0.456, 0.485)
BGR_STD = (0.225, 0.224, 0.229)
#: receptive field, stride and padding of the conv4 (``s3``) map, upstream's RF/STRIDE/PADDING
RF, STRIDE, PADDING = 291.0, 16.0, 145.0
BN_EPS = 1e-5  # pycls cfg.BN.EPS
LOCAL_DIM = 512  # upstream SpatialAttention2d(1024): conv1 1024 -> 512
#: keys of the training-only heads in upstream's ``Delg`` (skipped, as upstream's extractor does)
TRAINING_HEADS = ("desc_cls.weight", "desc_cls.t", "att_cls.fc.weight", "att_cls.fc.bias")


class ResNet(PyclsResNet):
    """Upstream's ``globalmodel``: pycls ResNet trunk plus the GeM + whitening head."""

    def __init__(self, depth: int = 50, global_dim: int = 512):
        super().__init__(depth, global_dim, what="DELG")


class SpatialAttention(nn.Module):
    """Upstream's ``localmodel`` (``SpatialAttention2d(1024)``)."""

    def __init__(self, in_c: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, LOCAL_DIM, 1)
        self.bn = nn.BatchNorm2d(LOCAL_DIM, eps=BN_EPS)
        self.conv2 = nn.Conv2d(LOCAL_DIM, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[1, 1024, h, w]`` -> L2-normalised descriptors ``[1, 512, h, w]``, attention ``[1, 1, h, w]``."""
        x = self.bn(self.conv1(x))
        att = F.softplus(self.conv2(F.relu(x)))
        return F.normalize(x, p=2, dim=1), att


class DelgNet(nn.Module):
    """The network with upstream's state-dict names (``globalmodel.*``, ``localmodel.*``)."""

    def __init__(self, depth: int = 50, global_dim: int = 512):
        super().__init__()
        self.globalmodel = ResNet(depth, global_dim)
        self.localmodel = SpatialAttention(1024)


def select_threshold(att: torch.Tensor, threshold: float, target: int | None, min_threshold: float) -> torch.Tensor:
    """Mask of the attention scores above the threshold upstream settles on.

    Upstream (``delg_utils.GetDelgFeature``) tries ``threshold``, and, while fewer than
    ``target`` scores pass, halves it, stopping once the halved value is below
    ``min_threshold``. ``target=None``: the single threshold of the paper's code.
    """
    while True:
        keep = att > threshold
        if target is None or int(keep.sum()) >= max(target, 1) or threshold * 0.5 < min_threshold:
            return keep
        threshold *= 0.5


class DELG(LocalModel):
    """DELG local (attention-selected, 512-d) and global features; ``weights`` is a feymanpriv ``.pyth``."""

    default_conf = {  # noqa: RUF012 (the convention of every model here)
        "weights": None,
        "depth": 50,
        "global_dim": 512,
        "scales": [0.25, 0.3535, 0.5, 0.7071, 1.0, 1.4142, 2.0],
        "global_scales": [0.7071, 1.0, 1.4142],
        "score_threshold": 260.0,
        "threshold_target": 1000,
        "min_threshold": 0.1,
        "nms_iou": 0.98,
        "max_keypoints": 1000,
        # the feymanpriv port describes the image as given (up to 2x); the authors' TF
        # release caps the longer side at 1024 (max_image_size), and so does this default
        "resize_max": 1024,
    }
    descriptor_dim = LOCAL_DIM

    def __init__(self, conf=None):
        super().__init__(conf)
        c = self.conf
        mk = c["max_keypoints"]
        if mk is not None and (mk == 0 or mk < -1):
            raise ValueError(f"DELG: max_keypoints must be positive, -1 or None (all), got {mk}")
        if not c["scales"] or any(s <= 0 for s in [*c["scales"], *c["global_scales"]]):
            raise ValueError(f"DELG: scales must be positive and not empty, got {c['scales']}, {c['global_scales']}")
        self.net = DelgNet(c["depth"], c["global_dim"])
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(BGR_STD).view(1, 3, 1, 1), persistent=False)
        self.layout = load_delg_weights(self.net, weights_file(c["weights"], "DELG"))
        self.eval()

    def scale_features(self, image: torch.Tensor, scale: float, local: bool, glob: bool) -> dict:
        """Features of the BGR ``image [1, 3, H, W]`` (in [0, 1]) resized by ``scale``."""
        H, W = image.shape[-2:]
        size = (max(1, round(H * scale)), max(1, round(W * scale)))  # Python rounding, as upstream
        x = image if size == (H, W) else F.interpolate(image, size, mode="bilinear", align_corners=False)
        conv4 = self.net.globalmodel.conv4((x - self.mean) / self.std)
        out = {}
        if glob:
            out["global"] = F.normalize(self.net.globalmodel.global_descriptor(conv4), dim=-1)[0]
        if local:
            desc, att = self.net.localmodel(conv4)
            att = att[0, 0]
            w = att.shape[1]
            c = self.conf
            keep = select_threshold(att.flatten(), c["score_threshold"], c["threshold_target"], c["min_threshold"])
            idx = torch.nonzero(keep).flatten()
            rows, cols = (idx // w).float(), (idx % w).float()
            # receptive-field boxes (ymin, xmin, ymax, xmax) in input pixels, as upstream
            boxes = torch.stack([STRIDE * rows - PADDING, STRIDE * cols - PADDING,
                                 STRIDE * rows - PADDING + RF - 1, STRIDE * cols - PADDING + RF - 1], 1) / scale
            out.update(boxes=boxes, scores=att.flatten()[idx], descriptors=desc[0].flatten(1)[:, idx].t(),
                       scales=torch.full((len(idx),), scale, device=att.device))
        return out

    def multiscale(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """All local features over ``scales`` (boxes, scores, descriptors, scales), before
        the top-k / NMS, and the global descriptor."""
        c = self.conf
        img = image[None].float().flip(1)  # RGB -> BGR
        todo = [(s, True) for s in c["scales"]]
        todo += [(s, False) for s in c["global_scales"] if not any(math.isclose(s, t) for t in c["scales"])]
        locs, gsum = [], None
        for s, local in todo:
            glob = any(math.isclose(s, g) for g in c["global_scales"])
            f = self.scale_features(img, s, local, glob)
            if glob:
                gsum = f["global"] if gsum is None else gsum + f["global"]
            if local:
                locs.append(f)
        out = {k: torch.cat([f[k] for f in locs]) for k in ("boxes", "scores", "descriptors", "scales")}
        if gsum is not None:
            out["global_descriptor"] = F.normalize(gsum / len(c["global_scales"]), dim=0)
        return out

    def _forward(self, image):
        f = self.multiscale(image)
        order = torch.argsort(f["scores"], descending=True, stable=True)
        mk = self.conf["max_keypoints"]
        if mk is not None and mk > 0:
            order = order[:mk]  # upstream keeps the top_k scores, then runs NMS among them
        keep = order[nms(f["boxes"][order], f["scores"][order], self.conf["nms_iou"])]
        boxes = f["boxes"][keep]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (y, x)
        out = {
            "keypoints": centres.flip(1).contiguous(),
            "descriptors": f["descriptors"][keep],
            "scores": f["scores"][keep],
            "scales": f["scales"][keep],
        }
        if "global_descriptor" in f:
            out["global_descriptor"] = f["global_descriptor"]
        return out


def load_delg_weights(net: DelgNet, path) -> str:
    """Load a feymanpriv/DELG checkpoint (``{'model_state': ...}``, or a plain state dict)
    into ``net``; return the layout found. The training heads ``desc_cls.*`` / ``att_cls.*``
    are skipped; any other missing, unexpected or mis-shaped key raises ValueError naming
    the file. BatchNorm ``num_batches_tracked`` counters may be absent."""
    path = str(path)
    what = "DELG checkpoint"
    state, layout = unwrap(read_file(path, what), path, what, wrapper_keys=("model_state",))
    skipped = [k for k in TRAINING_HEADS if k in state]
    state = {k: v for k, v in state.items() if k not in TRAINING_HEADS}
    if skipped:
        layout += f"; training heads skipped ({', '.join(skipped)})"
    depth = {v: k for k, v in STAGE_DEPTHS.items()}.get(tuple(len(s) for s in (
        net.globalmodel.s1, net.globalmodel.s2, net.globalmodel.s3, net.globalmodel.s4)))
    desc = f"ResNet-{depth}, global_dim={net.globalmodel.head.fc.out_features}"
    load_into(net, state, path, what, layout, desc, optional=lambda k: k.endswith("num_batches_tracked"))
    return layout


def upstream_init(net: DelgNet) -> None:
    """pycls ``init_weights`` with upstream's config (``ZERO_INIT_FINAL_GAMMA: True``):
    convolutions N(0, sqrt(2 / fan_out)), BatchNorm weight 1 (0 for each block's last
    BatchNorm ``f.c_bn``), bias 0, linear layers N(0, 0.01) with zero bias; GeM ``p`` = 3."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.0 if name.endswith("f.c_bn") else 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Save a seeded random DELG in upstream's pycls checkpoint layout.

    ``{'epoch': 0, 'model_state': ..., 'optimizer_state': ..., 'cfg': ...}`` as
    ``core/checkpoint.save_checkpoint`` writes it, with the full training model's keys
    (``globalmodel.*``, ``localmodel.*`` and the training heads ``desc_cls.weight``,
    ``desc_cls.t``, ``att_cls.fc.*``), float32. Weights follow upstream's own
    initialisation (:func:`upstream_init`) drawn after ``torch.manual_seed(seed)``.
    ``conf`` may set ``depth``, ``global_dim`` and ``num_classes`` (training
    heads only; default 1000, upstream trained with 96264 GLDv2 classes). NOT a trained
    model: keypoints from it are only good for testing.
    """
    c = {"depth": 50, "global_dim": 512, "num_classes": 1000, **(conf or {})}
    torch.manual_seed(seed)
    net = DelgNet(c["depth"], c["global_dim"])
    upstream_init(net)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    n = int(c["num_classes"])
    state["desc_cls.weight"] = torch.empty(n, c["global_dim"]).uniform_(-0.1, 0.1)
    state["desc_cls.t"] = torch.zeros(1)
    state["att_cls.fc.weight"] = torch.randn(n, LOCAL_DIM) * 0.001
    state["att_cls.fc.bias"] = torch.zeros(n)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    cfg = (f"MODEL:\n  TYPE: resnet\n  DEPTH: {c['depth']}\n  NUM_CLASSES: {n}\n  HEADS:\n"
           f"    REDUCTION_DIM: {c['global_dim']}\nRANDOM_INIT_SEED: {seed}\n")
    torch.save({"epoch": 0, "model_state": state, "optimizer_state": optimizer.state_dict(), "cfg": cfg}, path)
