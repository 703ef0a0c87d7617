"""Registry of matchers and pair models (a query and a candidate -> correspondences or a pair score)."""

from __future__ import annotations

from ..registry import Registry
from .base import Matcher

MODELS = {
    "mnn": ("pipeline.matchers.mnn", "MutualNearestNeighbor"),
    "lightglue": ("pipeline.matchers.lightglue", "LightGlue"),
    "lighterglue": ("pipeline.matchers.lighterglue", "LighterGlue"),
    "superglue": ("pipeline.matchers.superglue", "SuperGlue"),
    "loftr": ("pipeline.matchers.loftr", "LoFTR"),
    "rrt": ("pipeline.matchers.rrt", "RRT"),
    "cvnet": ("pipeline.matchers.cvnet", "CVNet"),
}
REGISTRY = Registry("matcher", MODELS, Matcher)
get_matcher_class, build_matcher = REGISTRY.get, REGISTRY.build
