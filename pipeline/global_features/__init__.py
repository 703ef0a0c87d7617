"""Registry of global descriptor models, selected by name plus a conf dict.

Each model lives in its own module ``pipeline.global_features.<name>`` and defines
one subclass of :class:`~pipeline.global_features.base.GlobalModel` named in
``MODELS``. Adding a model means adding one module and one line here.
"""

from __future__ import annotations

from ..registry import Registry
from .base import GlobalModel

MODELS = {
    "cosplace": ("pipeline.global_features.cosplace", "CosPlace"),
    "vlad": ("pipeline.global_features.vlad", "VLAD"),
}
REGISTRY = Registry("global model", MODELS, GlobalModel)
get_model_class, build_model = REGISTRY.get, REGISTRY.build
