"""Loading upstream checkpoint files: every common layout, clear errors naming the file.

Released checkpoints come as a plain state dict, wrapped in ``{'state_dict': ...}``,
``{'model_state_dict': ...}``, ``{'model_state': ...}`` (pycls) or ``{'model': ...}``, and with DataParallel's
``module.`` prefixes. :func:`read_state_dict` finds the state dict and says which
layout it found; :func:`load_into` checks it against the model (missing, unexpected
and mis-shaped keys) before loading it strictly.

Safety: a checkpoint is a pickle, and unpickling can run any code. Files are always read
with ``torch.load(weights_only=True)``: tensors, containers, numbers and strings, plus the
few other types official releases pickle beside their weights (:data:`SAFE_GLOBALS`:
numpy scalars and dtypes of a ``best_score``, an ``argparse.Namespace`` of training
arguments). A file that pickles anything else is refused with
:class:`UnsafeCheckpointError` naming the file and the types, before anything in it runs.
The only way past is ``trust: true`` in that model's conf (set through
:func:`trusting` by the model registry), which loads the file with
``weights_only=False`` and logs a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import os
import pickle
from collections.abc import Callable, Mapping

import numpy as np

import torch
from torch import nn

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("model_state_dict", "model_state", "state_dict", "model")


def short(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


def _numpy_globals() -> list:
    """numpy's scalar and dtype reconstructors (``np.float64(0.9)``, ``np.dtype('f8')``), as
    numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) pickle them."""
    out: list = [np.dtype, np.ndarray]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = __import__(mod, fromlist=["scalar", "_reconstruct"])
        except ImportError:
            continue
        out += [(m.scalar, f"{mod}.scalar"), (m._reconstruct, f"{mod}._reconstruct")]
    out += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return out


#: what an official checkpoint may pickle besides tensors, containers, numbers and strings
#: (``torch.serialization.safe_globals``): numpy scalars, dtypes and arrays (of numbers:
#: an object array's items go through the same allowlist) and argparse.Namespace
SAFE_GLOBALS = [argparse.Namespace, *_numpy_globals()]

_TRUST = contextvars.ContextVar("trust_checkpoints", default=False)


class UnsafeCheckpointError(ValueError):
    """A checkpoint pickles types outside :data:`SAFE_GLOBALS`; refused unless trusted."""


@contextlib.contextmanager
def trusting(trust: bool):
    """Checkpoints read inside are loaded in full (``weights_only=False``) when ``trust`` is
    true: a model conf's ``trust: true`` (the model registry sets this around building)."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def _unsafe_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint (legacy format): the error message has it
        return []


SAFETENSORS_MAGIC_END = b"{"


def is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != SAFETENSORS_MAGIC_END:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(100_000_000, os.path.getsize(path) - 8)


def read_safetensors(path: str, what: str) -> dict:
    """A ``.safetensors`` file (MegaLoc's release): tensors only, nothing is unpickled."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - a dependency in pyproject.toml
        raise ImportError(f"{what} {path} is a safetensors file: pip install safetensors") from err
    try:
        return load_file(path, device="cpu")
    except Exception as err:
        raise ValueError(f"{what} {path}: cannot be read as safetensors: {err}") from err


def read_file(path: str, what: str):
    """``torch.load`` on the CPU, never unpickling more than :data:`SAFE_GLOBALS` unless the
    model's conf says ``trust: true``. A safetensors file (by its header, whatever its name)
    is read with ``safetensors`` instead: it holds tensors only."""
    if is_safetensors(path):
        return read_safetensors(path, what)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path) or [str(err).split("GLOBAL ")[-1].split(" ")[0]]
        if not _TRUST.get():
            raise UnsafeCheckpointError(
                f"{what} {path}: refused: it pickles {', '.join(unsafe)}, which loading could use to run code. "
                "Official releases hold tensors only; if you know where this file comes from and trust it, "
                "set 'trust: true' in this model's conf"
            ) from None
        logger.warning(
            "TRUSTED CHECKPOINT: %s %s pickles %s; loading it in full (weights_only=False) because the conf "
            "says trust: true - this runs whatever code the file holds", what, path, ", ".join(unsafe),
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
