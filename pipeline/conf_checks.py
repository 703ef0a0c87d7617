"""Types and ranges of the numeric options of every model, matcher and scorer conf.

:func:`pipeline.conf.merge_conf` (which every conf goes through, at
config check time and when a model is built) calls :func:`check_values`, so
``max_keypoints: -10`` or a negative RANSAC threshold fails up front, naming the option,
instead of keeping all but 10 keypoints or scoring nothing. The rules go by option name;
an option is checked only where a conf has it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

#: options that count something: integers >= 1
COUNTS = {
    "max_iters", "n_clusters", "fit_images", "fit_max_descriptors", "kmeans_iters", "num_pcs",
    "num_clusters", "sinkhorn_iterations", "max_sequence_len", "num_local_features", "num_global_features",
    "max_edge", "max_sum_edges", "max_size", "max_image_size", "fc_output_dim", "descriptor_dim", "nhead",
    "divisible_by", "window_size", "min_size", "num_encoder_layers", "dim_feedforward", "global_dim",
    "reduction_dim", "threshold_target",
}
#: integers >= 1, or null (off: VLAD's ``dim`` null keeps the whole VLAD, no PCA)
COUNTS_OR_NULL = {"dim"}
#: integers >= 0
NON_NEGATIVE_INTS = {"nms_radius", "remove_borders", "seed", "layer", "index"}
#: numbers > 0
POSITIVE = {"threshold", "power", "scale_f", "max_scale", "edge_threshold"}
#: numbers >= 0
NON_NEGATIVE = {"whiten_eps", "contrast_threshold", "keypoint_threshold", "detection_threshold", "min_scale",
                "min_threshold"}
#: numbers in [0, 1]
UNIT = {"match_threshold", "reliability_thr", "repeatability_thr", "nms_iou"}


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def check_values(conf: dict, where: str) -> None:
    """Raise ValueError naming ``where.<option>`` for a value of the wrong type or range."""
    for key, v in conf.items():
        problem = _problem(key, v)
        if problem:
            raise ValueError(f"{where}.{key} is {v!r}: {problem}")


def _problem(key: str, v) -> str | None:
    if key in COUNTS:
        return None if _int(v) and v >= 1 else "must be a whole number >= 1"
    if key in COUNTS_OR_NULL:
        return None if v is None or (_int(v) and v >= 1) else "must be a whole number >= 1 or null"
    if key in NON_NEGATIVE_INTS:
        return None if _int(v) and v >= 0 else "must be a whole number >= 0"
    if key in POSITIVE:
        return None if _number(v) and v > 0 else "must be a number > 0"
    if key in NON_NEGATIVE:
        return None if _number(v) and v >= 0 else "must be a number >= 0"
    if key in UNIT:
        return None if _number(v) and 0 <= v <= 1 else "must be a number between 0 and 1"
    if key == "max_keypoints":
        return None if v is None or v == -1 or (_int(v) and v >= 1) else \
            "must be a whole number >= 1, or -1 / null for all keypoints"
    if key == "min_matches":
        return None if v is None or (_int(v) and v >= 0) else "must be a whole number >= 0 or null"
    if key == "confidence":
        return None if _number(v) and 0 < v <= 1 else "must be a probability in (0, 1]"
    if key == "ratio":
        return None if v is None or (_number(v) and 0 < v <= 1) else "must be in (0, 1] or null"
    if key in ("filter_threshold",):
        return None if v is None or (_number(v) and 0 <= v <= 1) else "must be in [0, 1] or null"
    if key in ("depth_confidence", "width_confidence"):
        return None if v is None or v == -1 or (_number(v) and 0 <= v <= 1) else \
            "must be in [0, 1], -1 (off) or null (the default)"
    if key == "max_distance":
        return None if v is None or (_number(v) and v >= 0) else "must be a number >= 0 or null"
    if key == "cell_size":  # one per level, or one for all
        vals = v if isinstance(v, (list, tuple)) else [v]
        return None if vals and all(_number(x) and x > 0 for x in vals) else "must be a number > 0 or a list of them"
    if key == "thresholds":
        return None if v is None or (isinstance(v, (list, tuple)) and all(_number(x) and x > 0 for x in v)) else \
            "must be a list of numbers > 0 or null"
    if key == "resize":
        if v is None or (_int(v) and v >= 1):
            return None
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_int(x) and x >= 1 for x in v)
        return None if ok else "must be null, a longer side >= 1 or [height, width] >= 1"
    if key == "resize_max":
        return None if v is None or (_int(v) and v >= 1) else "must be null or a whole number >= 1"
    return None
