"""Registry of local feature extractors, selected by name plus a conf dict.

One module per extractor, one subclass of :class:`LocalModel` each. The global
VLAD descriptor pools their descriptors; the re-ranking stage builds on them.
"""

from __future__ import annotations

from ..registry import Registry
from .base import LocalModel

MODELS = {
    "sift": ("pipeline.local_features.sift", "SIFT"),
    "aliked": ("pipeline.local_features.aliked", "ALIKED"),
    "disk": ("pipeline.local_features.disk", "DISK"),
    "r2d2": ("pipeline.local_features.r2d2", "R2D2"),
    "superpoint": ("pipeline.local_features.superpoint", "SuperPoint"),
    "xfeat": ("pipeline.local_features.xfeat", "XFeat"),
    "d2net": ("pipeline.local_features.d2net", "D2Net"),
    "delg": ("pipeline.local_features.delg", "DELG"),
    "delg_tf": ("pipeline.local_features.delg_tf", "DELGTF"),
    "patchnetvlad": ("pipeline.local_features.patchnetvlad", "PatchNetVLAD"),
    "transvpr": ("pipeline.local_features.transvpr", "TransVPR"),
}
REGISTRY = Registry("local feature", MODELS, LocalModel)
get_model_class, build_model = REGISTRY.get, REGISTRY.build
