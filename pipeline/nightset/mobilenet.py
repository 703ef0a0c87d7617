"""The filter stage's CNN classifier: ``mobilenet_v2`` trained on labelled photos.

- :func:`train`: trains torchvision ``mobilenet_v2(weights=None)`` (random init, a
  2-class head; nothing is downloaded) on a CSV of labelled images
  (:func:`pipeline.nightset.photos.read_labels`) and writes a checkpoint;
- :func:`load_checkpoint`: reads such a checkpoint back, refusing anything else;
- :class:`MobileNetClassifier`: a checkpoint as the ``mobilenet`` classifier of the
  filter stage (:mod:`pipeline.nightset.classify`), returning the probability of the
  checkpoint's positive class.

torch is imported on use: the statistics baselines run without it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from tqdm import tqdm

from ..conf import merge_conf
from ..io import atomic_path
from .photos import Photo, read_labels, read_many

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pipeline.nightset.mobilenet"
CHECKPOINT_VERSION = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# the positive labels a checkpoint may have for a role of the filter stage
_ROLE_POSITIVE = {"night": {"night", "1", "true"}, "outdoor": {"outdoor", "1", "true"}}


def build_mobilenet(width_mult: float = 1.0, num_classes: int = 2):
    """torchvision ``mobilenet_v2`` with random weights (never downloads) and a 2-class head."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)


def _to_batch(images: list[np.ndarray], size: int):
    """uint8 RGB arrays -> normalised float tensor [n, 3, size, size] (squashed to a square)."""
    import torch

    arr = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_checkpoint(path: str | os.PathLike):
    """Load a checkpoint written by :func:`train`: returns (model in eval mode, its conf).

    Refuses, naming the file, anything else: a missing file, a file that is not a
    torch checkpoint, a plain state dict or another program's checkpoint, another
    format version, or weights that do not fit the stored architecture.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mobilenet checkpoint not found: {path} (train one with the "
                                f"nightset train command; nothing is downloaded)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; each is "not a checkpoint"
        raise ValueError(f"mobilenet checkpoint {path}: cannot be read as a torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"mobilenet checkpoint {path}: not a {CHECKPOINT_FORMAT} checkpoint written by "
                         f"pipeline.nightset.mobilenet.train (found {keys})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"mobilenet checkpoint {path}: format version {ckpt.get('version')!r}, "
                         f"this code reads version {CHECKPOINT_VERSION}")
    conf = ckpt.get("conf") or {}
    if conf.get("arch") != "mobilenet_v2" or len(conf.get("classes", [])) != 2:
        raise ValueError(f"mobilenet checkpoint {path}: unexpected conf {conf!r}")
    model = build_mobilenet(float(conf.get("width_mult", 1.0)), 2)
    state = ckpt.get("state_dict")
    own = model.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"mobilenet checkpoint {path}: has no state_dict")  # noqa: TRY004 - a bad file
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"mobilenet checkpoint {path}: weights do not fit mobilenet_v2(width_mult="
                         f"{conf.get('width_mult', 1.0)}): missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, mis-shaped {sorted(shapes)[:3]}")
    model.load_state_dict(state)
    model.eval()
    return model, conf


class MobileNetClassifier:
    """A trained ``mobilenet`` checkpoint as a classifier.

    conf: ``checkpoint`` (path, required), ``device`` (``auto``), ``batch_size``,
    ``threshold``, ``positive`` (the label the checkpoint must call positive; the
    stage sets it from the role: ``night`` or ``outdoor``, also accepting ``1``/``true``).
    """

    default_conf: ClassVar[dict] = {"name": "mobilenet", "checkpoint": None, "device": "auto",
                                    "batch_size": 32, "threshold": 0.5, "positive": None}

    def __init__(self, conf: dict):
        from ..gpus import pick_device

        # check=False: ``threshold`` is a probability (0 passes every photo), not one of
        # conf_checks' thresholds that must be > 0
        self.conf = merge_conf(self.default_conf, conf, "mobilenet", check=False)
        if not self.conf["checkpoint"]:
            raise ValueError("mobilenet: conf needs 'checkpoint' (a file written by the train command)")
        self.model, self.ckpt_conf = load_checkpoint(self.conf["checkpoint"])
        pos = self.ckpt_conf["classes"][1]
        want = self.conf["positive"]
        allowed = _ROLE_POSITIVE.get(want, {want}) if want else None
        if allowed is not None and pos not in allowed:
            raise ValueError(f"mobilenet checkpoint {self.conf['checkpoint']}: its positive class is {pos!r} "
                             f"(classes {self.ckpt_conf['classes']}), but this classifier needs "
                             f"{sorted(allowed)} - wrong checkpoint for this role?")
        self.device = pick_device(str(self.conf["device"]))
        self.model.to(self.device)
        self.positive = pos

    @property
    def label(self) -> str:
        return f"mobilenet:{Path(self.conf['checkpoint']).name}"

    def predict(self, photos: list[Photo]) -> np.ndarray:
        import torch

        out = []
        size = int(self.ckpt_conf["image_size"])
        bs = int(self.conf["batch_size"])
        with torch.inference_mode():
            for i in range(0, len(photos), bs):
                x = _to_batch([p.image for p in photos[i:i + bs]], size).to(self.device)
                out.append(torch.softmax(self.model(x).float(), 1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _split(y: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val split of indices (at least one of each class in val when possible)."""
    tr, va = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(val_fraction * len(idx)))  # noqa: RUF046 - val_fraction may be a numpy scalar
        if val_fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return np.array(sorted(tr), np.int64), np.array(sorted(va), np.int64)


def train(images_csv, out_checkpoint, epochs: int = 10, lr: float = 1e-3, batch_size: int = 32,
          device: str = "auto", seed: int = 0, image_size: int = 224, val_fraction: float = 0.2,
          positive: str | None = None, width_mult: float = 1.0, weight_decay: float = 1e-4,
          workers: int = 2) -> dict:
    """Train ``mobilenet_v2`` (random init) on labelled images; save the best-validation checkpoint.

    ``images_csv``: columns ``file`` (absolute or relative to the CSV) and ``label``
    (two values; see :func:`pipeline.nightset.photos.read_labels`). The images are decoded once, squashed to
    ``image_size`` squares (plus 12% for random crops) and kept in memory
    (about 200 KB per image at 224). Stratified train/val split by ``seed``;
    augmentation: horizontal flips and random crops only (no colour jitter: colour
    and brightness are the signal). AdamW, cross-entropy. The checkpoint (written
    atomically) holds the weights, the conf (arch, width, image size, classes) and
    the history; after each epoch the BatchNorm statistics are recomputed over the
    training images (exact averages for the current weights), and the epoch with the
    lowest validation loss (or the last epoch without validation) is kept. Returns the
    summary (history, best epoch).
    """
    import torch
    from torch.nn import functional as F

    from ..gpus import pick_device

    t0 = time.perf_counter()
    paths, y, classes = read_labels(images_csv, positive)
    big = int(round(image_size * 1.12))  # noqa: RUF046 - image_size may be a numpy scalar
    photos, errors = read_many(paths, max(big * 2, 256), "train: decode", workers)
    ok = [i for i, ph in enumerate(photos) if ph is not None]
    for e in (e for e in errors if e):
        logger.warning("skipped: %s", e)
    if len(set(y[ok].tolist())) < 2:
        raise ValueError(f"{images_csv}: need readable images of both classes {classes}")
    cache = np.stack([cv2.resize(photos[i].image, (big, big), interpolation=cv2.INTER_AREA) for i in ok])
    del photos
    y = y[ok]
    rng = np.random.default_rng(seed)
    tr, va = _split(y, val_fraction, rng)
    torch.manual_seed(seed)
    dev = pick_device(str(device))
    model = build_mobilenet(width_mult).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    off = (big - image_size) // 2

    def batch(idx, augment):
        x = torch.from_numpy(cache[idx]).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
        if augment:
            crops = []
            for k in range(len(idx)):
                oy, ox = (int(v) for v in rng.integers(0, big - image_size + 1, 2))
                c = x[k:k + 1, :, oy:oy + image_size, ox:ox + image_size]
                crops.append(c.flip(3) if rng.random() < 0.5 else c)
            x = torch.cat(crops)
        else:
            x = x[:, :, off:off + image_size, off:off + image_size]
        return (x - mean) / std, torch.from_numpy(y[idx]).to(dev)

    def recalibrate_bn(idx):
        """Exact BatchNorm statistics of the current weights over the training images.

        The running averages lag far behind the weights of a randomly initialised
        network in its first epochs (eval-mode predictions then collapse to one
        class); one forward pass with cumulative averaging fixes that.
        """
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        model.train()
        with torch.no_grad():
            for i in range(0, len(idx), batch_size):
                if len(idx[i:i + batch_size]) >= 2:
                    model(batch(idx[i:i + batch_size], False)[0])
        for m, mom in zip(bns, saved):
            m.momentum = mom

    def evaluate(idx):
        model.eval()
        loss, correct = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(idx), batch_size):
                x, t = batch(idx[i:i + batch_size], False)
                logits = model(x).float()
                loss += float(F.cross_entropy(logits, t, reduction="sum"))
                correct += int((logits.argmax(1) == t).sum())
        return loss / len(idx), correct / len(idx)

    history, best, best_state = [], None, None
    bar = tqdm(range(epochs), desc="train mobilenet", unit="epoch")
    for epoch in bar:
        model.train()
        order = rng.permutation(tr)
        tot, n = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs 2+ samples
                continue
            x, t = batch(idx, True)
            loss = F.cross_entropy(model(x).float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            n += len(idx)
        sched.step()
        recalibrate_bn(tr)
        rec = {"epoch": epoch + 1, "train_loss": round(tot / max(n, 1), 5)}
        if len(va):
            rec["val_loss"], rec["val_accuracy"] = (round(v, 5) for v in evaluate(va))
        history.append(rec)
        bar.set_postfix({k: v for k, v in rec.items() if k != "epoch"})
        logger.info("epoch %s", rec)
        key = rec.get("val_loss", -epoch)
        if best is None or key <= best:
            best = key
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_epoch = epoch + 1
    conf = {"arch": "mobilenet_v2", "width_mult": float(width_mult), "image_size": int(image_size),
            "classes": classes, "normalize": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
    summary = {
        "checkpoint": str(out_checkpoint), "classes": classes, "n_train": len(tr), "n_val": len(va),
        "skipped": len(paths) - len(ok), "best_epoch": best_epoch, "history": history,
        "train_conf": {"images_csv": str(images_csv), "epochs": epochs, "lr": lr, "batch_size": batch_size,
                       "seed": seed, "val_fraction": val_fraction, "weight_decay": weight_decay,
                       "device": str(dev)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "conf": conf,
            "state_dict": best_state, "history": history, "train": summary["train_conf"],
            "best_epoch": best_epoch}
    with atomic_path(out_checkpoint) as tmp:
        torch.save(ckpt, tmp)
    logger.info("wrote %s (best epoch %d of %d)", out_checkpoint, best_epoch, epochs)
    return summary

