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
    # modern descriptors (when is re-ranking worth it after them?), each at its authors' resolution
    "megaloc": ("pipeline.global_features.megaloc", "MegaLoc"),
    "salad": ("pipeline.global_features.salad", "SALAD"),
    "boq": ("pipeline.global_features.boq", "BoQ"),
    "eigenplaces": ("pipeline.global_features.eigenplaces", "EigenPlaces"),
    "mixvpr": ("pipeline.global_features.mixvpr", "MixVPR"),
}
REGISTRY = Registry("global model", MODELS, GlobalModel)
get_model_class, build_model = REGISTRY.get, REGISTRY.build
