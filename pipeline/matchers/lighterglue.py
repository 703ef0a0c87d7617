"""LighterGlue: the LightGlue variant trained for XFeat (upstream ``xfeat-lighterglue.pt``)."""

from __future__ import annotations

from .lightglue import LightGlue


class LighterGlue(LightGlue):
    default_conf = {**LightGlue.default_conf, "features": "xfeat"}
