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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..global_features.base import merge_conf

KINDS = ("matches", "points", "pair_score")


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
    base_conf: dict[str, Any] = {"name": None}
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
