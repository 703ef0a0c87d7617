"""Base class for global (image-level) descriptor models."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from ..conf import merge_conf

logger = logging.getLogger(__name__)


class GlobalModel(nn.Module):
    """A model mapping a batch of RGB images to L2-normalised global descriptors.

    Subclasses set ``default_conf`` and implement ``_forward``. Images come in as
    float tensors ``[B, 3, H, W]`` with values in ``[0, 1]``; each model does its own
    normalisation. Models that must be fitted on data (codebooks, whitening) set
    ``needs_fit = True`` and implement ``fit``/``state_for_fit``/``load_fit``.
    """

    default_conf: dict[str, Any] = {}
    needs_fit: bool = False
    #: common options every model accepts (used by the data loader)
    #: ``trust``: load the checkpoint in full even if it pickles more than weights
    #: (:mod:`pipeline.checkpoints`); not part of any store's hash
    base_conf: dict[str, Any] = {"name": None, "resize": None, "trust": False}

    def __init__(self, conf: dict | None = None):
        super().__init__()
        defaults = {**self.base_conf, **self.default_conf}
        self.conf = merge_conf(defaults, conf, type(self).__name__)
        tested, given = self.default_conf.get("resize"), self.conf["resize"]
        as_list = lambda r: list(r) if isinstance(r, (list, tuple)) else r  # noqa: E731 - [h, w] or a longer side
        if tested is not None and given is not None and as_list(given) != as_list(tested):
            # the commonest complaint in these models' trackers: recalls far below the paper's
            logger.warning("%s: images resized to %s, but its authors evaluate it at %s (the default): recalls "
                           "will not be the published ones", type(self).__name__, given, tested)

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @classmethod
    def descriptor_size(cls, conf: dict | None = None) -> int:
        """The descriptor size a model with ``conf`` gives, known without building it (the
        workflow plans the index's memory by it); an upper bound where the data decide."""
        return cls._descriptor_size(merge_conf({**cls.base_conf, **cls.default_conf}, conf, cls.__name__))

    @classmethod
    def _descriptor_size(cls, conf: dict) -> int:
        raise NotImplementedError(f"{cls.__name__} does not say its descriptor size")

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        desc = self._forward(images)
        return nn.functional.normalize(desc, p=2, dim=-1)

    # --- fitting (codebooks, PCA) -------------------------------------------------
    def fit(self, images: Iterable[torch.Tensor]) -> dict:
        """Fit on an iterable of single images ``[3, H, W]``; return the fitted state."""
        raise TypeError(f"{type(self).__name__} needs no fitting")

    def load_fit(self, state: dict) -> None:
        raise TypeError(f"{type(self).__name__} needs no fitting")
