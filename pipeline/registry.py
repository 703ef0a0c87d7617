"""Models selected by name plus a conf dict (one module per model, imported on use)."""

from __future__ import annotations

import importlib


class Registry:
    """Maps a model name to ``(module, class)``; builds models from confs with a ``name``."""

    def __init__(self, kind: str, models: dict[str, tuple[str, str]]):
        self.kind, self.models = kind, models

    def get(self, name: str) -> type:
        if name not in self.models:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self.models)}")
        module, cls = self.models[name]
        return getattr(importlib.import_module(module), cls)

    def build(self, conf: dict):
        """The model of ``conf``; ``trust: true`` in it lets its checkpoint load in full
        (:func:`pipeline.checkpoints.trusting`). Stores and hashes leave ``trust`` out: it
        says how to read a file, not what the model computes."""
        from .checkpoints import trusting

        if "name" not in conf:
            raise ValueError(f"{self.kind} conf {conf!r} has no 'name'")
        trust = conf.get("trust", False)
        if not isinstance(trust, bool):
            raise ValueError(f"{self.kind} {conf['name']!r}: trust must be true or false, not {trust!r}")
        with trusting(trust):
            return self.get(conf["name"])(conf)
