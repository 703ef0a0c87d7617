"""Base class for matchers and pair models.

Everything the re-ranking stage runs on a (query, candidate) pair is a matcher:

- correspondence matchers on local features (mutual nearest neighbours,
  SuperGlue, LightGlue) return ``matches``;
- detector-free matchers on images (LoFTR) return matched ``keypoints0`` /
  ``keypoints1`` positions;
- learned pair scorers (RRT on features, CVNet on images) return a
  ``pair_score`` vector.

``inputs`` says what the pipeline feeds in: ``"features"`` (the feature dicts of
an extractor) or ``"images"`` (float RGB ``[3, H, W]`` in [0, 1], resized per the
conf's ``resize``). ``prepare`` runs once per image (the result is cached by image
name, so a query's preparation serves all its candidates) and ``forward`` once per
pair; ``forward_many`` scores one query against several candidates and may batch.

``match_block(pairs)`` is what the match stage calls: a block of (query, candidate)
pairs, from one or several queries. Matchers that implement ``_forward_block`` (mutual
nearest neighbours, LightGlue, SuperGlue) run the whole block as one padded batch
with the padding masked out, so each pair gets the matches it gets on its own (the
scores agree to float rounding: padded matrix products sum in another order); the
others run it query by query through ``forward_many``. ``batch_size`` (matcher conf)
is the number of pairs per batch, or ``auto``: as many as fit a memory budget
(a share of the free device memory on a GPU, :data:`CPU_BUDGET` bytes on a CPU), from
:meth:`pair_bytes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..conf import merge_conf

KINDS = ("matches", "points", "pair_score")
#: bytes of temporaries a batch of pairs may take on a CPU (batch_size: auto)
CPU_BUDGET = 1 << 29
#: share of the free GPU memory a batch may take (batch_size: auto)
GPU_SHARE = 0.4
#: most pairs in one batch (batch_size: auto)
MAX_BATCH = 256


def batch_size_conf(value, name: str):
    """``auto`` or a positive integer, else a ValueError naming the matcher."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"matcher {name!r}: batch_size must be 'auto' or a positive integer, got {value!r}")


class Matcher(nn.Module):
    """Finds correspondences between (or scores) two images.

    For ``inputs = "features"``, ``forward(f0, f1)`` takes two feature dicts as the
    local extractors produce them, as torch tensors: ``keypoints [N, 2]`` (x, y
    pixels), ``descriptors [N, D]``, ``scores [N]``, ``image_size`` (``[2]``:
    width, height) and any optional keys (``levels``, ``scales``, ``global_*``).
    It returns one of

    - ``{"matches": [M, 2] int64 indices into f0 and f1, "scores": [M]}``,
    - ``{"keypoints0": [M, 2], "keypoints1": [M, 2], "scores": [M]}`` (positions in
      pixels of the two inputs; image-input matchers),
    - ``{"pair_score": [L]}`` (higher: more likely the same place).

    Match confidences are higher-is-better.
    """

    default_conf: dict[str, Any] = {}
    #: ``batch_size``: pairs per batch of :meth:`match_block` (``auto``: from the free memory)
    #: ``trust``: load the checkpoint in full even if it pickles more than weights
    #: (:mod:`pipeline.checkpoints`); not part of the match store's hash
    base_conf: dict[str, Any] = {"name": None, "batch_size": "auto", "trust": False}
    #: "features" (feature dicts of an extractor) or "images"
    inputs = "features"
    #: what forward returns: "matches", "points" or "pair_score"
    output = "matches"
    #: length of the pair_score vector
    score_dim = 1

    def __init__(self, conf: dict | None = None):
        super().__init__()
        base = dict(self.base_conf)
        if self.inputs == "images":
            base.setdefault("resize", None)
        self.conf = merge_conf({**base, **self.default_conf}, conf, type(self).__name__)
        if self.output not in KINDS:
            raise TypeError(f"{type(self).__name__}.output must be one of {KINDS}")
        batch_size_conf(self.conf["batch_size"], self.conf["name"] or type(self).__name__)

    def prepare(self, x):
        """Per-image work shared by all pairs the image is in (default: none)."""
        return x

    def _forward(self, p0, p1) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def empty(self, device=None) -> dict[str, torch.Tensor]:
        """The result for a pair that cannot be matched (no keypoints, unreadable image)."""
        if self.output == "pair_score":
            return {"pair_score": torch.full((self.score_dim,), float("-inf"))}
        if self.output == "points":
            return {"keypoints0": torch.zeros((0, 2)), "keypoints1": torch.zeros((0, 2)), "scores": torch.zeros(0)}
        return {"matches": torch.zeros((0, 2), dtype=torch.int64), "scores": torch.zeros(0)}

    def _normalise(self, out: dict) -> dict[str, torch.Tensor]:
        if self.output == "pair_score":
            return {"pair_score": out["pair_score"].float().reshape(-1)}
        if self.output == "points":
            return {"keypoints0": out["keypoints0"].float().reshape(-1, 2),
                    "keypoints1": out["keypoints1"].float().reshape(-1, 2),
                    "scores": out["scores"].float().reshape(-1)}
        return {"matches": out["matches"].long().reshape(-1, 2), "scores": out["scores"].float().reshape(-1)}

    @torch.inference_mode()
    def forward(self, p0, p1) -> dict[str, torch.Tensor]:
        if self.inputs == "features" and (len(p0["keypoints"]) == 0 or len(p1["keypoints"]) == 0):
            return self.empty()
        return self._normalise(self._forward(p0, p1))

    @torch.inference_mode()
    def forward_many(self, p0, candidates: list) -> list[dict[str, torch.Tensor]]:
        """``forward(p0, c)`` for each candidate (``None``: an unreadable image -> :meth:`empty`).

        Subclasses may override :meth:`_forward_many` to batch the candidates.
        """
        out: list[dict | None] = [None] * len(candidates)
        ok = [i for i, c in enumerate(candidates) if c is not None and p0 is not None]
        if hasattr(self, "_forward_many") and ok:
            results = self._forward_many(p0, [candidates[i] for i in ok])
            for i, r in zip(ok, results):
                out[i] = self._normalise(r)
        else:
            for i in ok:
                out[i] = self.forward(p0, candidates[i])
        return [r if r is not None else self.empty() for r in out]

    # ------------------------------------------------------------------ blocks of pairs

    #: whether :meth:`_forward_block` batches pairs of different queries (else per query)
    @property
    def batches_pairs(self) -> bool:
        return hasattr(self, "_forward_block")

    #: what ``batch_size: auto`` means on a CPU (None: from :data:`CPU_BUDGET`). Measured
    #: (benchmarks/match_throughput.py): on a CPU, batches of padded pairs are slower than
    #: pairs one at a time for mutual NN, LightGlue and SuperGlue alike (the forward is
    #: compute- or memory-bound there; padding and larger temporaries only cost).
    cpu_batch_size: int | None = 1

    def pair_bytes(self, n0: int, n1: int) -> int:
        """Bytes of device memory one pair of ``n0`` and ``n1`` keypoints takes in a batch
        (the largest temporaries; for ``batch_size: auto``)."""
        return 16 * (n0 + 1) * (n1 + 1) + 4096 * (n0 + n1)

    def batch_size(self, n0: int, n1: int, device) -> int:
        """Pairs per batch for pairs padded to ``n0`` x ``n1`` keypoints on ``device``."""
        return self.fit_batch(self.pair_bytes(n0, n1), device)

    def fit_batch(self, pair_bytes: int, device) -> int:
        """Pairs per batch when one pair takes ``pair_bytes`` of temporaries on ``device``:
        the conf's ``batch_size``, or for ``auto`` :attr:`cpu_batch_size` on a CPU and as
        many as fit a share (:data:`GPU_SHARE`) of the free memory on a GPU."""
        bs = self.conf["batch_size"]
        if bs != "auto":
            return int(bs)
        device = torch.device(device)
        if device.type == "cpu" and self.cpu_batch_size is not None:
            return self.cpu_batch_size
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free * GPU_SHARE
        else:
            budget = CPU_BUDGET
        return int(max(1, min(MAX_BATCH, budget // max(1, int(pair_bytes)))))

    def _usable(self, p0, p1) -> bool:
        if p0 is None or p1 is None:
            return False
        return self.inputs != "features" or (len(p0["keypoints"]) > 0 and len(p1["keypoints"]) > 0)

    @torch.inference_mode()
    def match_block(self, pairs: list[tuple[Any, Any]]) -> list[dict[str, torch.Tensor]]:
        """``forward(p0, p1)`` for every pair of prepared inputs (``None``: an unreadable
        image -> :meth:`empty`), batched as the matcher can (see the module doc)."""
        out: list[dict | None] = [None] * len(pairs)
        ok = [i for i, (p0, p1) in enumerate(pairs) if self._usable(p0, p1)]
        if self.batches_pairs:
            ok.sort(key=lambda i: (len(pairs[i][0]["keypoints"]), len(pairs[i][1]["keypoints"])))
            start = 0
            while start < len(ok):
                # sorted by size: a batch pads little; its size follows its largest pair
                n0 = max(len(pairs[i][0]["keypoints"]) for i in ok[start:start + MAX_BATCH])
                n1 = max(len(pairs[i][1]["keypoints"]) for i in ok[start:start + MAX_BATCH])
                chunk = ok[start:start + self.batch_size(n0, n1, self._device_of(pairs[ok[start]][0]))]
                if len(chunk) == 1:  # unpadded: exactly the pair-at-a-time result
                    out[chunk[0]] = self.forward(*pairs[chunk[0]])
                else:
                    for i, r in zip(chunk, self._forward_block([pairs[i] for i in chunk])):
                        out[i] = self._normalise(r)
                start += len(chunk)
        else:
            by_query: dict[int, list[int]] = {}
            for i in ok:
                by_query.setdefault(id(pairs[i][0]), []).append(i)
            for idx in by_query.values():
                for i, r in zip(idx, self.forward_many(pairs[idx[0]][0], [pairs[i][1] for i in idx])):
                    out[i] = r
        return [r if r is not None else self.empty() for r in out]

    @staticmethod
    def _device_of(p) -> torch.device:
        for v in (p.values() if isinstance(p, dict) else [p]):
            if torch.is_tensor(v):
                return v.device
        return torch.device("cpu")


def pad_features(feats: list[dict], keys=("keypoints", "descriptors", "scores")) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Stack feature dicts into padded ``[B, N, ...]`` tensors (zeros past each image's
    keypoints); returns ``(padded, valid [B, N] bool, counts [B])``."""
    counts = torch.tensor([len(f["keypoints"]) for f in feats])
    n = int(counts.max()) if len(feats) else 0
    dev = feats[0]["keypoints"].device
    valid = torch.arange(n)[None] < counts[:, None]
    out = {}
    for key in keys:
        rows = [f[key].float() for f in feats]
        x = rows[0].new_zeros((len(rows), n, *rows[0].shape[1:]))
        for b, r in enumerate(rows):
            x[b, : len(r)] = r
        out[key] = x
    return out, valid.to(dev), counts
