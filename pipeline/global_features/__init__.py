"""Registry of global descriptor models, selected by name plus a conf dict.

Each model lives in its own module ``pipeline.global_features.<name>`` and defines
one subclass of :class:`~pipeline.global_features.base.GlobalModel` named in
``MODELS``. Adding a model means adding one module and one line here.
"""

from __future__ import annotations

import importlib

from .base import GlobalModel

MODELS = {
    "cosplace": ("pipeline.global_features.cosplace", "CosPlace"),
    "vlad": ("pipeline.global_features.vlad", "VLAD"),
}


def get_model_class(name: str) -> type[GlobalModel]:
    if name not in MODELS:
        raise ValueError(f"unknown global model {name!r}; known models: {sorted(MODELS)}")
    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)


def build_model(conf: dict) -> GlobalModel:
    """Build the model named by ``conf['name']`` with the rest of ``conf``."""
    if "name" not in conf:
        raise ValueError(f"global model conf {conf!r} has no 'name'")
    return get_model_class(conf["name"])(conf)
