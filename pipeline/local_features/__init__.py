"""Registry of local feature extractors, selected by name plus a conf dict.

One module per extractor, one subclass of :class:`LocalModel` each. Issue-3 work
(caches, matchers, scorers) builds on this registry; the global VLAD descriptor
uses it to pool local descriptors.
"""

from __future__ import annotations

import importlib

from .base import LocalModel

MODELS = {
    "sift": ("pipeline.local_features.sift", "SIFT"),
    "aliked": ("pipeline.local_features.aliked", "ALIKED"),
    "disk": ("pipeline.local_features.disk", "DISK"),
}


def get_model_class(name: str) -> type[LocalModel]:
    if name not in MODELS:
        raise ValueError(f"unknown local feature {name!r}; known: {sorted(MODELS)}")
    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)


def build_model(conf: dict) -> LocalModel:
    if "name" not in conf:
        raise ValueError(f"local feature conf {conf!r} has no 'name'")
    return get_model_class(conf["name"])(conf)
