"""Loading upstream checkpoint files: every common layout, clear errors naming the file.

Released checkpoints come as a plain state dict, wrapped in ``{'state_dict': ...}``,
``{'model_state_dict': ...}``, ``{'model_state': ...}`` (pycls) or ``{'model': ...}``, and with DataParallel's
``module.`` prefixes. :func:`read_state_dict` finds the state dict and says which
layout it found; :func:`load_into` checks it against the model (missing, unexpected
and mis-shaped keys) before loading it strictly.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("model_state_dict", "model_state", "state_dict", "model")


def short(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


def read_file(path: str, what: str):
    """``torch.load`` on the CPU; retries without ``weights_only`` for files that pickle more than tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the file pickles more than tensors (e.g. an argparse.Namespace of a training run)
        logger.warning(
            "%s %s holds objects that weights_only=True refuses; retrying with weights_only=False "
            "- only do this for files you trust", what, path,
        )
    except Exception as err:
        raise ValueError(f"{what} {path}: cannot be read: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{what} {path}: cannot be read: {err}") from err


def unwrap(obj, path: str, what: str, wrapper_keys=WRAPPER_KEYS) -> tuple[dict, str]:
    """The state dict inside ``obj`` (a loaded checkpoint) and a description of its layout."""
    layout = []
    while True:
        if isinstance(obj, nn.Module):
            layout.append("nn.Module")
            obj = obj.state_dict()
            break
        if not isinstance(obj, Mapping):
            raise ValueError(f"{what} {path}: expected a state dict (mapping of tensors), got {type(obj).__name__}")
        wrapper = next((k for k in wrapper_keys if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if wrapper is None:
            break
        layout.append(f"{{'{wrapper}': ...}}")
        obj = obj[wrapper]
    state = dict(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what} {path}: not a state dict, non-tensor entries: {short(bad)}")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        layout.append("'module.' prefix (DataParallel)")
    return state, " -> ".join(layout) if layout else "plain state_dict"


def read_state_dict(path, what: str, missing_hint: str = "") -> tuple[dict, str]:
    """Read ``path`` and return its state dict and layout (FileNotFoundError if absent)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}{missing_hint}")
    state, layout = unwrap(read_file(path, what), path, what)
    logger.info("%s %s: layout %s, %d tensors", what, path, layout, len(state))
    return state, layout


def load_into(module: nn.Module, state: dict, path, what: str, layout: str, model_desc: str = "",
              optional: Callable[[str], bool] = lambda key: False) -> None:
    """Check ``state`` against ``module`` and load it strictly; mismatches raise naming ``path``.

    Keys for which ``optional(key)`` is true may be absent (the model keeps its value).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {short(wrong, 3)}")
    if problems:
        desc = f" ({model_desc})" if model_desc else ""
        raise ValueError(f"{what} {path} (layout {layout}) does not match the model{desc}: " + "; ".join(problems))
    state = {**{k: v for k, v in expected.items() if k not in state}, **state}
    module.load_state_dict(state, strict=True)
