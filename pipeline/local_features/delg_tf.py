"""DELG (Cao et al., ECCV 2020) as the authors' TensorFlow code defines and runs it.

A PyTorch port of ``tensorflow/models`` ``research/delf``: the Keras model
``delf.python.training.model.delg_model.Delg`` (on ``delf_model.Delf`` and ``resnet50``),
exported by ``export_local_and_global_model.py`` and run by ``delf/python/examples/
extractor.py`` (``MakeExtractor``, as ``delg/extract_features.py`` and RRT's
``delg_scripts`` call it) with the settings of ``delg/r50delg_gld_config.pbtxt``. Unlike
:mod:`pipeline.local_features.delg` (feymanpriv's PyTorch DELG: no autoencoder, 512-d
local descriptors) this gives the paper's 128-d local and 2048-d global descriptors, the
features RRT was trained on.

Architecture (variable names are the Keras attribute paths, see :func:`tf_variable_paths`):

- ``backbone``: Keras ResNet-50, channels last, every convolution with a bias, BatchNorm
  epsilon 1e-3 (Keras' default), ``conv1`` 7x7/2 with TensorFlow ``'same'`` padding
  (asymmetric on even sizes), 3x3/2 max-pool without padding, blocks ``l2a..l2c``,
  ``l3a..l3d``, ``l4a..l4f``, ``l5a..l5c`` (``conv2a``/``bn2a``, ``conv2b``/``bn2b``,
  ``conv2c``/``bn2c``, ``conv_shortcut``/``bn_shortcut``; the stride is on the first 1x1
  convolution); ``block3_strides``: the conv4 output is subsampled by 2 (a 1x1/2
  max-pool) and ``l5a`` has stride 1, so ``block3`` (1024-d) and conv5 are at stride 32;
  global head: GeM pooling (fixed power 3, clamp 1e-6) over conv5, then
  ``embedding_layer`` (dense 2048 -> 2048, the "FC whitening");
- ``attention`` on ``block3``: ``conv1`` 1x1 1024 -> 512, ``bn_conv1``, ReLU, ``conv2``
  1x1 512 -> 1, softplus = the attention score (upstream's current
  ``global_and_local_forward_pass``: ``attention(block3, targets=dim_expanded_features)``;
  the first autoencoder version, Dec 2020, scored the reconstructed features instead);
- ``autoencoder`` on ``block3``: ``conv1`` 1x1 1024 -> 128 (no activation) gives the local
  descriptors; ``conv2`` (128 -> 1024, ReLU) only reconstructs for training and is loaded
  but not run.

Test time (``ExtractLocalAndGlobalFeatures`` + ``MakeExtractor``), input our RGB image in [0, 1]:

- the image is taken as the uint8 RGB array upstream reads (``x * 255`` rounded); if its
  longer side exceeds ``max_image_size`` (1024) it is first resized with PIL (bilinear,
  as ``utils.ResizeImage``; done on the CPU) and keypoints are mapped back to the input
  image (``locations / scale_factors``);
- pixels become ``(x - 128) / 128``; for each scale ``s`` in ``image_scales``
  (0.25, 0.35355338, 0.5, 0.70710677, 1, 1.4142135, 2) the image is resized bilinearly
  without antialiasing (``tf.image.resize``: half-pixel centres, as
  ``interpolate(align_corners=False)``) to ``round(H s) x round(W s)`` (float32 product,
  round half to even);
- local features: every ``block3`` cell whose attention is ``>= score_threshold`` (175);
  its receptive box ``[32 r - 145, 32 c - 145, 32 r + 145, 32 c + 145] / s`` (RF 291,
  stride 16 x 2, padding 145, ``CalculateReceptiveBoxes``); over all scales, non-maximum
  suppression at IoU ``nms_iou`` (the export default 1.0, which suppresses nothing: TF
  removes boxes with IoU *above* the threshold) keeping at most ``max_keypoints`` (1000)
  in order of decreasing attention (ties: earlier feature first); the keypoint is the box
  centre, the descriptor the L2-normalised 128-d autoencoder output, ``scores`` the
  attention, ``scales`` the image scale ``s`` (DELF files store ``1 / s``);
- global descriptor: the ``embedding_layer`` output at the scales ``global_scales_ind``
  (3, 4, 5: 1/sqrt2, 1, sqrt2), each L2-normalised, summed, L2-normalised (no PCA, as in
  the config); returned as ``global_descriptor`` [2048].

Weights: a TensorFlow tensor bundle (see :mod:`.tf_bundle`), read without TensorFlow:
the SavedModel folder written by ``export_local_and_global_model.py`` (keys
``_model/variables/<i>``, resolved through its object graph), its ``variables/`` folder
or prefix, a training checkpoint (``model/backbone/...``, with optimizer slots and the
training heads ``cosine_weights``, ``scale_factor``, ``attn_classification`` skipped) or a
``save_weights`` file (``backbone/...``). TF kernels ``[kh, kw, in, out]`` become
``[out, in, kh, kw]``, dense kernels are transposed, BatchNorm ``gamma/beta/moving_mean/
moving_variance`` become ``weight/bias/running_mean/running_var`` (epsilon stays 1e-3).

Caveat on the released ``r50delg_gld_20200814``: it predates the TF2 joint exporter and
the Keras autoencoder (its config does not set ``is_tf2_exported``, so ``MakeExtractor``
prunes it as a TF1 graph); its variable names were not available to check here. If they
are not the Keras names above, loading it fails with the list of unexpected variables
(``python -m pipeline.local_features.tf_bundle PATH`` lists them).

Deviations, none changing a result upstream computes: only the scales in
``global_scales_ind`` run conv5 and the global head (upstream runs it at every scale and
drops the others); a scale whose resized image has a side below 5 px is skipped (TF's
valid max-pool fails there); an image below 10 px gives no local features and a zero
global descriptor (upstream returns empty arrays for both).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms

from ..checkpoints import load_into, short
from . import tf_bundle
from .base import LocalModel

#: receptive field and padding of ``block3`` (``export_model_utils``); stride 16 x 2 (block3_strides)
RF, STRIDE, PADDING = 291.0, 32.0, 145.0
BN_EPS = 1e-3  # Keras BatchNormalization default
GEM_POWER, GEM_EPS = 3.0, 1e-6
LOCAL_DIM, GLOBAL_DIM = 128, 2048
MIN_SIDE = 10  # extractor._MIN_HEIGHT / _MIN_WIDTH
#: variables of the training-only heads / bookkeeping (skipped when loading)
TRAINING_ONLY = ("cosine_weights", "scale_factor", "attn_classification/", "desc_classification/")
#: object paths under which the Keras model sits in the bundles upstream writes
MODEL_ROOTS = ("_model/", "model/", "")
#: Keras variable order per layer kind (``layer.weights``: trainable, then non-trainable)
_LEAVES = {nn.Conv2d: (("weight", "kernel"), ("bias", "bias")),
           nn.Linear: (("weight", "kernel"), ("bias", "bias")),
           nn.BatchNorm2d: (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                            ("running_var", "moving_variance"))}


class Conv(nn.Conv2d):
    """Keras ``Conv2D`` (with bias) and its ``'same'`` / ``'valid'`` padding."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, same: bool = False, keras_name: str = ""):
        super().__init__(c_in, c_out, k, stride=stride, padding=0, bias=True)
        self.same = same and (k > 1 or stride > 1)
        self.keras_name = keras_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            pads = []
            for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]  # TF puts the odd pixel after
            x = F.pad(x, pads)
        return super().forward(x)


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, c: int, keras_name: str = ""):
        super().__init__(c, eps=BN_EPS)
        self.keras_name = keras_name


class Block(nn.Module):
    """``resnet50._ConvBlock`` (``shortcut``: projection) or ``_IdentityBlock``."""

    def __init__(self, c_in: int, filters: tuple[int, int, int], stage: int, block: str, stride: int = 1,
                 shortcut: bool = False):
        super().__init__()
        f1, f2, f3 = filters
        conv, bn = f"res{stage}{block}_branch", f"bn{stage}{block}_branch"
        self.conv2a = Conv(c_in, f1, 1, stride, keras_name=conv + "2a")
        self.bn2a = BatchNorm(f1, bn + "2a")
        self.conv2b = Conv(f1, f2, 3, 1, same=True, keras_name=conv + "2b")
        self.bn2b = BatchNorm(f2, bn + "2b")
        self.conv2c = Conv(f2, f3, 1, keras_name=conv + "2c")
        self.bn2c = BatchNorm(f3, bn + "2c")
        self.shortcut = shortcut
        if shortcut:
            self.conv_shortcut = Conv(c_in, f3, 1, stride, keras_name=conv + "1")
            self.bn_shortcut = BatchNorm(f3, bn + "1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn2a(self.conv2a(x)))
        y = F.relu(self.bn2b(self.conv2b(y)))
        y = self.bn2c(self.conv2c(y))
        return F.relu(y + (self.bn_shortcut(self.conv_shortcut(x)) if self.shortcut else x))


class Backbone(nn.Module):
    """``resnet50.ResNet50(include_top=False, pooling='gem', block3_strides=True,
    average_pooling=False, embedding_layer=True)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv(3, 64, 7, 2, same=True, keras_name="conv1")
        self.bn_conv1 = BatchNorm(64, "bn_conv1")
        stages = ((2, "abc", (64, 64, 256), 1), (3, "abcd", (128, 128, 512), 2),
                  (4, "abcdef", (256, 256, 1024), 2), (5, "abc", (512, 512, 2048), 1))
        c_in = 64
        for stage, blocks, filters, stride in stages:
            for i, b in enumerate(blocks):
                self.add_module(f"l{stage}{b}", Block(c_in, filters, stage, b, stride if i == 0 else 1, shortcut=i == 0))
                c_in = filters[2]
        self.embedding_layer = nn.Linear(2048, GLOBAL_DIM)
        self.embedding_layer.keras_name = "embedding_layer"

    def blocks(self, stage: int) -> list[Block]:
        return [m for n, m in self.named_children() if n.startswith(f"l{stage}")]

    def block3(self, x: torch.Tensor) -> torch.Tensor:
        """``intermediates_dict['block3']``: conv4, subsampled to stride 32."""
        x = F.relu(self.bn_conv1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2)  # Keras MaxPooling2D((3, 3), (2, 2)), 'valid'
        for stage in (2, 3, 4):
            for blk in self.blocks(stage):
                x = blk(x)
        return x[..., ::2, ::2]  # subsampling_layer: MaxPooling2D((1, 1), strides=(2, 2))

    def global_descriptor(self, block3: torch.Tensor) -> torch.Tensor:
        """The raw (un-normalised) 2048-d ``build_call`` output from ``block3``."""
        x = block3
        for blk in self.blocks(5):
            x = blk(x)
        x = x.clamp(min=GEM_EPS).pow(GEM_POWER).mean(dim=(2, 3)).pow(1.0 / GEM_POWER)
        return self.embedding_layer(x)


class Attention(nn.Module):
    """``delf_model.AttentionModel`` (kernel size 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv(1024, 512, 1, keras_name="attn_conv1")
        self.bn_conv1 = BatchNorm(512, "bn_conv1")
        self.conv2 = Conv(512, 1, 1, keras_name="attn_conv2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.bn_conv1(self.conv1(x)))))


class Autoencoder(nn.Module):
    """``delf_model.AutoencoderModel(128, 1024)``; ``conv1`` gives the local descriptors."""

    def __init__(self):
        super().__init__()
        self.conv1 = Conv(1024, LOCAL_DIM, 1, keras_name="autoenc_conv1")
        self.conv2 = Conv(LOCAL_DIM, 1024, 1, keras_name="autoenc_conv2")  # training only


class DelgNet(nn.Module):
    """``delg_model.Delg(block3_strides=True, use_dim_reduction=True)``, attribute names
    (and so variable paths) as upstream's."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.attention = Attention()
        self.autoencoder = Autoencoder()


def tf_variables(net: nn.Module) -> list[tuple[str, str, str]]:
    """``(tf_path, torch_key, keras full name)`` of every TF variable, in Keras'
    ``model.variables`` order (the ``_model/variables/<i>`` index of a SavedModel). The
    full name (informative only) is the one Keras gives when the model ``DELG`` is built
    by calling it (the blocks, named ``''``, reset the name scope)."""
    out = []
    for name, mod in net.named_modules():
        leaves = next((v for k, v in _LEAVES.items() if isinstance(mod, k)), None)
        if leaves is None:
            continue
        parts = name.split(".")
        scope = "" if len(parts) > 2 else "DELG/" if parts[0] == "backbone" else f"DELG/{parts[0]}/"
        for torch_leaf, tf_leaf in leaves:
            out.append((f"{name.replace('.', '/')}/{tf_leaf}", f"{name}.{torch_leaf}",
                        f"{scope}{mod.keras_name}/{tf_leaf}"))
    return out


def tf_variable_paths(net: nn.Module | None = None) -> list[str]:
    return [p for p, _, _ in tf_variables(net or DelgNet())]


def tf_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The TF shape of a parameter (conv OIHW -> HWIO, dense transposed)."""
    s = tuple(t.shape)
    return (s[2], s[3], s[1], s[0]) if len(s) == 4 else s[::-1] if len(s) == 2 else s


def to_torch(value: np.ndarray) -> torch.Tensor:
    v = np.asarray(value, dtype=np.float32)
    if v.ndim == 4:
        v = v.transpose(3, 2, 0, 1)
    elif v.ndim == 2:
        v = v.T
    return torch.from_numpy(np.ascontiguousarray(v))


def _skipped(key: str, root: str) -> bool:
    rel = key.removeprefix(root)
    return (key in ("save_counter" + tf_bundle.VARIABLE_SUFFIX,) or key.startswith("optimizer/")
            or ".OPTIMIZER_SLOT" in key or rel.startswith(TRAINING_ONLY))


def read_tf_weights(net: DelgNet, path) -> tuple[dict[str, torch.Tensor], str, str]:
    """Read a DELG variables bundle for ``net``: ``(torch state dict, layout, prefix)``.

    Variables are found through the bundle's object graph (Keras object paths such as
    ``backbone/l2a/conv2a/kernel`` under ``_model/``, ``model/`` or the root), or, without
    one, by key (``<root>backbone/.../.ATTRIBUTES/VARIABLE_VALUE``, or ``_model/variables/<i>``
    in Keras order). Missing, unexpected (other than optimizer state and training heads)
    or mis-shaped variables raise ValueError naming the bundle and the variables."""
    if not path:
        raise ValueError("DELG-TF: no 'weights' path configured (weights are never downloaded): set it to "
                         "the SavedModel folder of a DELG model (holding variables/variables.index)")
    prefix = tf_bundle.resolve_prefix(path)
    what = f"DELG-TF weights {prefix}"
    try:
        bundle = tf_bundle.TensorBundle(prefix)
    except tf_bundle.BundleError as err:
        raise ValueError(f"{what}: not a readable TensorFlow variables bundle: {err}") from None
    variables = tf_variables(net)
    paths = [p for p, _, _ in variables]
    graph = bundle.object_graph
    keys: dict[str, str | None] = {}
    if graph is not None:
        root = next((r for r in MODEL_ROOTS if tf_bundle.resolve_path(graph, r + paths[0]) is not None), None)
        if root is not None:
            keys = {p: tf_bundle.resolve_path(graph, root + p) for p in paths}
            layout = f"TF2 object graph, model at '{root or '/'}'"
    if not keys:
        names = set(bundle.entries)
        root = next((r for r in MODEL_ROOTS if r + paths[0] + tf_bundle.VARIABLE_SUFFIX in names), None)
        if root is not None:
            keys = {p: root + p + tf_bundle.VARIABLE_SUFFIX for p in paths}
            layout = f"variable keys under '{root or '/'}'"
        else:
            root = "_model/"
            keys = {p: f"_model/variables/{i}{tf_bundle.VARIABLE_SUFFIX}" for i, p in enumerate(paths)}
            layout = "SavedModel '_model/variables/<i>' keys in Keras order (no object graph)"
    missing = [f"{p} ({k})" if k else p for p, k in keys.items() if k is None or k not in bundle.entries]
    used = {k for k in keys.values() if k}
    skipped = [k for k in bundle.variable_keys() if k not in used and _skipped(k, root)]
    unexpected = [k for k in bundle.variable_keys() if k not in used and k not in skipped]
    expected = net.state_dict()
    wrong = []
    for p, torch_key, _ in variables:
        k = keys.get(p)
        if k in bundle.entries:
            have, want = tuple(bundle.entries[k].shape), tf_shape(expected[torch_key])
            if have != want:
                wrong.append(f"{p} ({k}): file {list(have)} vs model {list(want)}")
    problems = []
    if missing:
        problems.append(f"missing variables ({len(missing)}): {short(missing)}")
        if len(missing) == len(paths):
            problems.append("none of DELG's Keras variables is there (a TF1-exported archive such as "
                            "r50delg_gld_20200814 may name them differently; list them with "
                            "`python -m pipeline.local_features.tf_bundle PATH`)")
    if unexpected:
        problems.append(f"unexpected variables ({len(unexpected)}): {short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {short(wrong, 3)}")
    if problems:
        raise ValueError(f"{what} (layout: {layout}) do not match DELG (ResNet-50, 128-d autoencoder, "
                         f"2048-d embedding): " + "; ".join(problems))
    state = {}
    for p, torch_key, _ in variables:
        try:
            state[torch_key] = to_torch(bundle.get(keys[p]))
        except (tf_bundle.BundleError, FileNotFoundError) as err:
            raise ValueError(f"{what}: {err}") from None
    if skipped:
        layout += f"; skipped {len(skipped)} optimizer/training-head variables"
    return state, layout, prefix


def load_delg_tf_weights(net: DelgNet, path) -> str:
    """Load a DELG variables bundle into ``net`` (see :func:`read_tf_weights`); return the layout."""
    state, layout, prefix = read_tf_weights(net, path)
    load_into(net, state, prefix, "DELG-TF weights", layout, optional=lambda k: k.endswith("num_batches_tracked"))
    return layout


def select_features(boxes: torch.Tensor, scores: torch.Tensor, iou: float, max_features: int | None) -> torch.Tensor:
    """Indices kept by ``box_list_ops.non_max_suppression`` (``tf.image.non_max_suppression``
    with ``max_output_size = min(max_features, N)``): greedy by decreasing score (ties:
    lower index first), a box is dropped when its IoU with a kept one is *above* ``iou``
    (so 1.0 drops nothing), at most ``max_features`` (None / -1: all)."""
    order = torch.argsort(scores, descending=True, stable=True)
    if iou < 1.0 and len(order):
        order = order[nms(boxes[order], scores[order], iou)]
    if max_features is not None and max_features > 0:
        order = order[:max_features]
    return order


class DELGTF(LocalModel):
    """DELG of the authors' TensorFlow code: 128-d local descriptors (attention-selected,
    autoencoder-reduced) and a 2048-d global descriptor. ``weights``: a SavedModel folder
    (or variables prefix) holding the Keras DELG variables."""

    default_conf = {  # noqa: RUF012 (the convention of every model here)
        "weights": None,
        "image_scales": [0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0],
        "global_scales_ind": [3, 4, 5],
        "score_threshold": 175.0,
        "max_keypoints": 1000,
        "nms_iou": 1.0,
        "max_image_size": 1024,
        "min_image_size": -1,
    }
    descriptor_dim = LOCAL_DIM
    #: the TF release shrinks the longer side to max_image_size (1024) itself
    size_bound = "max_image_size"

    def __init__(self, conf=None):
        super().__init__(conf)
        c = self.conf
        scales = [float(s) for s in c["image_scales"]]
        if not scales or min(scales) <= 0:
            raise ValueError(f"DELG-TF: image_scales must be positive and not empty, got {c['image_scales']}")
        bad = [i for i in c["global_scales_ind"] if not 0 <= int(i) < len(scales)]
        if bad or not c["global_scales_ind"]:
            raise ValueError(f"DELG-TF: global_scales_ind must index image_scales, got {c['global_scales_ind']}")
        mk = c["max_keypoints"]
        if mk is not None and (mk == 0 or mk < -1):
            raise ValueError(f"DELG-TF: max_keypoints must be positive, -1 or None (all), got {mk}")
        if not 0.0 <= float(c["nms_iou"]) <= 1.0:
            raise ValueError(f"DELG-TF: nms_iou must be in [0, 1] (as box_list_ops requires), got {c['nms_iou']}")
        self.net = DelgNet()
        self.layout = load_delg_tf_weights(self.net, c["weights"])
        self.eval()

    # ------------------------------------------------------------------ preprocessing
    def to_uint8(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
        """The uint8 image (as float ``[1, 3, h, w]``) upstream feeds the model, after
        ``utils.ResizeImage``; and its ``scale_factors`` (height, width)."""
        img = (image[None].float() * 255.0).round().clamp(0, 255)
        H, W = img.shape[-2:]
        c = self.conf
        largest = max(H, W)
        max_size, min_size = c["max_image_size"], c["min_image_size"]
        if max_size is not None and max_size >= 0 and largest > max_size:
            factor = max_size / largest
        elif min_size is not None and min_size >= 0 and largest < min_size:
            factor = min_size / largest
        else:
            return img, (1.0, 1.0)
        w, h = round(W * factor), round(H * factor)  # Python rounding, as utils.ResizeImage
        pil = Image.fromarray(img[0].permute(1, 2, 0).to("cpu", torch.uint8).numpy()).resize((w, h), Image.BILINEAR)
        img = torch.from_numpy(np.asarray(pil, dtype=np.float32)).permute(2, 0, 1)[None].to(image.device)
        return img, (h / H, w / W)

    # ------------------------------------------------------------------ extraction
    def extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """All local features over the scales (boxes ``(ymin, xmin, ymax, xmax)`` in the
        model's input image, descriptors, scores, scales) before NMS, the per-scale
        global descriptors ``[S, 2048]`` and ``scale_factors``."""
        c = self.conf
        img, factors = self.to_uint8(image)
        dev = img.device
        out = {"scale_factors": torch.tensor(factors, dtype=torch.float64)}
        H, W = img.shape[-2:]
        if H < MIN_SIDE or W < MIN_SIDE:
            return out
        x = (img - 128.0) / 128.0
        scales = np.asarray(c["image_scales"], dtype=np.float32)
        global_ind = {int(i) for i in c["global_scales_ind"]}
        boxes, desc, scores, feat_scales, glob = [], [], [], [], []
        for i, s in enumerate(scales):
            size = tuple(int(v) for v in np.rint(np.array([H, W], dtype=np.float32) * s))
            if min(size) < 5:
                continue
            xs = x if size == (H, W) else F.interpolate(x, size, mode="bilinear", align_corners=False)
            block3 = self.net.backbone.block3(xs)
            if i in global_ind:
                glob.append(self.net.backbone.global_descriptor(block3)[0])
            prob = self.net.attention(block3)[0, 0].flatten()
            keep = torch.nonzero(prob >= float(c["score_threshold"])).flatten()
            w = block3.shape[-1]
            rows, cols = (keep // w).float(), (keep % w).float()
            pts = torch.stack([rows, cols, rows, cols], 1)
            bias = torch.tensor([-PADDING, -PADDING, -PADDING + RF - 1, -PADDING + RF - 1], device=dev)
            boxes.append((STRIDE * pts + bias) / torch.tensor(s, device=dev))
            desc.append(self.net.autoencoder.conv1(block3)[0].flatten(1)[:, keep].t())
            scores.append(prob[keep])
            feat_scales.append(torch.full((len(keep),), float(s), device=dev))
        if glob:
            out["global_per_scale"] = torch.stack(glob)
        if boxes:
            out.update(boxes=torch.cat(boxes), descriptors=torch.cat(desc), scores=torch.cat(scores),
                       scales=torch.cat(feat_scales))
        return out

    def _forward(self, image):
        f = self.extract(image)
        dev = image.device
        g = f.get("global_per_scale")
        glob = (F.normalize(F.normalize(g, dim=1, eps=1e-6).sum(0), dim=0, eps=1e-6) if g is not None
                else torch.zeros(GLOBAL_DIM, device=dev))
        if "boxes" not in f:  # image below 10 px (upstream: no features), or every scale below 5 px
            return {"keypoints": torch.zeros((0, 2), device=dev), "descriptors": torch.zeros((0, LOCAL_DIM), device=dev),
                    "scores": torch.zeros(0, device=dev), "scales": torch.zeros(0, device=dev),
                    "global_descriptor": glob}
        order = select_features(f["boxes"], f["scores"], float(self.conf["nms_iou"]), self.conf["max_keypoints"])
        boxes = f["boxes"][order]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0  # CalculateKeypointCenters: (y, x)
        factors = f["scale_factors"]
        if bool((factors != 1).any()):
            centres = (centres.double() / factors.to(dev)).float()
        out = {
            "keypoints": centres.flip(1).contiguous(),
            "descriptors": F.normalize(f["descriptors"][order], dim=1, eps=1e-6),
            "scores": f["scores"][order],
            "scales": f["scales"][order],
        }
        out["global_descriptor"] = glob
        return out


# ---------------------------------------------------------------------- writing bundles
def seeded_tf_values(shapes: dict[str, tuple[int, ...]], seed: int, gain: float = 0.7) -> dict[str, np.ndarray]:
    """Framework-independent seeded values for TF variables (path -> shape), visited in
    sorted path order with one ``numpy.random.default_rng(seed)``: kernels
    N(0, gain sqrt(2 / fan_in)) (fan_in: all but the last dimension), biases N(0, 0.05),
    BatchNorm gamma U(0.5, 1.5), beta N(0, 0.1), moving_mean N(0, 0.1),
    moving_variance U(0.5, 1.5); float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for path in sorted(shapes):
        shape = tuple(shapes[path])
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            v = rng.normal(0.0, gain * math.sqrt(2.0 / int(np.prod(shape[:-1]))), shape)
        elif leaf in ("gamma", "moving_variance"):
            v = rng.uniform(0.5, 1.5, shape)
        elif leaf in ("beta", "moving_mean"):
            v = rng.normal(0.0, 0.1, shape)
        else:
            v = rng.normal(0.0, 0.05, shape)
        out[path] = v.astype(np.float32)
    return out


def savedmodel_tensors(net: DelgNet, values: dict[str, np.ndarray]) -> dict[str, np.ndarray | bytes]:
    """The variables of a SavedModel of ``export_local_and_global_model._ExtractModule``:
    ``_model/variables/<i>/.ATTRIBUTES/VARIABLE_VALUE`` in Keras order, then an object
    graph (root -> ``_model`` -> ``variables/<i>`` and the attribute paths
    ``backbone/...`` to the same variable nodes) as the last tensor, as TF orders them."""
    variables = tf_variables(net)
    keys = {p: f"_model/variables/{i}{tf_bundle.VARIABLE_SUFFIX}" for i, (p, _, _) in enumerate(variables)}
    nodes = [{"children": [("_model", 1)], "attributes": []}, {"children": [], "attributes": []},
             {"children": [], "attributes": []}]  # root, _model, _model/variables
    nodes[1]["children"].append(("variables", 2))
    var_node = {}
    for i, (p, _, full_name) in enumerate(variables):
        var_node[p] = len(nodes)
        nodes[2]["children"].append((str(i), len(nodes)))
        nodes.append({"children": [], "attributes": [("VARIABLE_VALUE", full_name, keys[p])]})
    for p, _, _ in variables:
        parent = 1
        parts = p.split("/")
        for part in parts[:-1]:
            child = next((i for n, i in nodes[parent]["children"] if n == part), None)
            if child is None:
                child = len(nodes)
                nodes.append({"children": [], "attributes": []})
                nodes[parent]["children"].append((part, child))
            parent = child
        nodes[parent]["children"].append((parts[-1], var_node[p]))
    tensors: dict[str, np.ndarray | bytes] = {keys[p]: values[p] for p, _, _ in variables}
    tensors[tf_bundle.OBJECT_GRAPH_KEY] = tf_bundle.encode_object_graph(nodes)
    return tensors


def write_savedmodel_variables(folder, values: dict[str, np.ndarray], net: DelgNet | None = None) -> str:
    """Write TF-layout ``values`` (path -> array) as ``folder/variables/variables.*``; return the prefix."""
    prefix = os.path.join(os.fspath(folder), "variables", "variables")
    tf_bundle.write_bundle(prefix, savedmodel_tensors(net or DelgNet(), values))
    return prefix


def write_random_checkpoint(path, seed: int = 0, conf: dict | None = None) -> None:
    """Write a seeded random DELG as the variables of a SavedModel folder ``path``
    (``path/variables/variables.index`` + ``.data-00000-of-00001``, the tensor-bundle
    layout, keys and order that ``export_local_and_global_model.py`` gives: see
    :func:`savedmodel_tensors`). ``saved_model.pb`` (the TF graph) is not written: the
    loader here reads only the variables.

    Values: :func:`seeded_tf_values` (float32), except the attention's last bias
    ``attention/conv2/bias``, set to ``score_threshold`` (``conf``, default 175) so that
    about half the cells pass the official threshold. ``conf`` may also set ``gain``.
    NOT a trained model: its features are only good for testing.
    """
    c = {"score_threshold": DELGTF.default_conf["score_threshold"], "gain": 0.7, **(conf or {})}
    net = DelgNet()
    shapes = {p: tf_shape(net.state_dict()[k]) for p, k, _ in tf_variables(net)}
    values = seeded_tf_values(shapes, seed, float(c["gain"]))
    values["attention/conv2/bias"] = np.full((1,), float(c["score_threshold"]), dtype=np.float32)
    write_savedmodel_variables(path, values, net)
