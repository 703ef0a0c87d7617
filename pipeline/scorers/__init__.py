"""Registry of scorers: (matches between a query and a candidate) -> a re-ranking score."""

from __future__ import annotations

from ..registry import Registry
from .base import Scorer

MODELS = {
    "ransac": ("pipeline.scorers.ransac", "RansacInliers"),
    "multiscale_ransac": ("pipeline.scorers.ransac", "MultiScaleRansac"),
    "rapid_spatial": ("pipeline.scorers.rss", "RapidSpatialScoring"),
    "match_count": ("pipeline.scorers.count", "MatchCount"),
    "pair_score": ("pipeline.scorers.pair", "PairScore"),
}
REGISTRY = Registry("scorer", MODELS, Scorer)
get_scorer_class, build_scorer = REGISTRY.get, REGISTRY.build
