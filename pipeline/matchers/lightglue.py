"""LightGlue (kornia's implementation) loading the upstream LightGlue release files."""

from __future__ import annotations

import logging

import torch

from ..local_features.base import weights_file
from .base import Matcher

logger = logging.getLogger(__name__)


def _rename_upstream(state: dict, n_layers: int) -> dict:
    """Upstream key names -> kornia's (what kornia's own loader does after downloading)."""
    state = {k[len("matcher."):] if k.startswith("matcher.") else k: v for k, v in state.items()}
    for i in range(n_layers):
        for old, new in ((f"self_attn.{i}.", f"transformers.{i}.self_attn."), (f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")):
            state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    return state


class LightGlue(Matcher):
    default_conf = {
        "features": "disk",  # disk | aliked | superpoint | sift | xfeat (the LighterGlue variant)
        "weights": None,
        "filter_threshold": None,  # None: the features' default (0.1)
        "depth_confidence": None,  # None: the features' default; -1 disables early stopping
        "width_confidence": None,  # None: the features' default; -1 disables point pruning
    }

    def __init__(self, conf=None):
        super().__init__(conf)
        import kornia.feature as KF

        c = self.conf
        if c["features"] not in KF.LightGlue.features:
            raise ValueError(f"LightGlue: unknown features {c['features']!r}; known {sorted(KF.LightGlue.features)}")
        opts = {**KF.LightGlue.features[c["features"]]}
        for key in ("filter_threshold", "depth_confidence", "width_confidence"):
            if c[key] is not None:
                opts[key] = c[key]
        opts["weights"] = None
        # features=None: kornia builds the network without downloading anything
        self.net = KF.LightGlue(features=None, **opts)
        path = weights_file(c["weights"], f"LightGlue ({c['features']})")
        state = _rename_upstream(torch.load(path, map_location="cpu", weights_only=True), self.net.conf.n_layers)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        params = dict(self.net.named_parameters())
        bad = [k for k in missing if k in params]
        if bad:
            raise ValueError(f"{path}: not a LightGlue checkpoint for {c['features']} (missing weights {bad[:5]})")
        if unexpected:  # the release files carry unused entries (log_assignment.*.r); kornia ignores them too
            logger.debug("%s: ignored %d unused entries, e.g. %s", path, len(unexpected), unexpected[:3])
        self.eval()

    def _forward(self, f0, f1):
        def side(f):
            return {
                "keypoints": f["keypoints"].float()[None],
                "descriptors": f["descriptors"].float()[None],
                "image_size": torch.as_tensor(f["image_size"], dtype=torch.float32).reshape(1, 2),
            }

        out = self.net({"image0": side(f0), "image1": side(f1)})
        return {"matches": out["matches"][0], "scores": out["scores"][0]}
