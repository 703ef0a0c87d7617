"""Models selected by name plus a conf dict (one module per model, imported on use).

Each kind of model (global descriptors, local features, matchers, scorers) has one
:class:`Registry` in its package's ``__init__``: a table name -> (module, class).
Adding a model is its module plus one line in that table; the config check, the
workflow and every stage find it through the registry (nothing else lists names).
"""

from __future__ import annotations

import importlib


class Registry:
    """Maps a model name to ``(module, class)``; builds models from confs with a ``name``.

    ``base``: the class every registered model must derive from (checked on use, so a
    wrong table line fails naming the module and class).
    """

    def __init__(self, kind: str, models: dict[str, tuple[str, str]], base: type = object):
        self.kind, self.base, self.models = kind, base, models

    def names(self) -> list[str]:
        return sorted(self.models)

    def register(self, name: str, module: str, cls: str) -> None:
        """Add a model (a plugin, or a test's toy); a name can be registered once."""
        if name in self.models and self.models[name] != (module, cls):
            raise ValueError(f"{self.kind} {name!r} is already registered as {self.models[name]}")
        self.models[name] = (module, cls)

    def get(self, name: str) -> type:
        if name not in self.models:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        module, cls_name = self.models[name]
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"{self.kind} {name!r} is registered as {module}.{cls_name}, which cannot be "
                              f"imported: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{self.kind} {name!r}: {module}.{cls_name} is not a {self.base.__name__}")
        return cls

    def build(self, conf: dict):
        """The model of ``conf``; ``trust: true`` in it lets its checkpoint load in full
        (:func:`pipeline.checkpoints.trusting`). Stores and hashes leave ``trust`` out: it
        says how to read a file, not what the model computes."""
        from .checkpoints import trusting

        if not isinstance(conf, dict) or "name" not in conf:
            raise ValueError(f"{self.kind} conf {conf!r} has no 'name'")
        trust = conf.get("trust", False)
        if not isinstance(trust, bool):
            raise ValueError(f"{self.kind} {conf['name']!r}: trust must be true or false, not {trust!r}")
        cls = self.get(conf["name"])
        from .assets import names_assets, resolve_conf

        if names_assets(conf):  # weights: auto (or an asset name): the registered file, fetched if needed
            conf = resolve_conf(conf, fetch_missing=True, fill=self.full_conf)
        with trusting(trust):
            return cls(conf)

    def full_conf(self, conf: dict, where: str | None = None) -> dict:
        """``conf`` with its model's defaults filled in (unknown or out-of-range options are errors)."""
        from .conf import merge_conf

        cls = self.get(conf["name"])
        return merge_conf({**cls.base_conf, **cls.default_conf}, conf, where or f"{self.kind} {conf['name']}")
