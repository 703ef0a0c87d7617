"""Qualitative figures, as the thesis shows them (Section 4.6.2, Figures 4.9-4.13).

Every figure is a PNG drawn with matplotlib's Agg canvas (no display, no global
pyplot state) and has the numbers it shows in a CSV of the same name beside it,
so that what a figure claims can be checked without looking at it:

- :func:`plot_keypoints` (Figure 4.9, and 4.10 for detector-free matchers): the
  keypoints detected on an image. CSV: ``x, y`` (pixels of the original image),
  plus ``score`` when given.
- :func:`plot_matches` (Figure 4.12): the matches of a query and a candidate,
  side by side, in two panels: all putative matches (top) and the RANSAC inliers
  among them (bottom). CSV: one row per putative match, ``xq, yq, xc, yc, inlier``.
- :func:`prediction_strip` (Figure 4.13): per query a row of three thumbnails, the
  query, the retrieval (baseline) top-1 and the re-ranked top-1, framed green when
  within the distance threshold of the query and red otherwise, with the distance
  in metres. CSV: ``query, baseline_top1, baseline_correct, baseline_dist_m,
  reranked_top1, reranked_correct, reranked_dist_m, selection``.
- :func:`qualitative_report` picks the queries and draws all of the above for
  one re-ranking method, and writes ``manifest.json`` (the files and their
  captions).

Coordinates: feature stores hold keypoints, and image-input matchers (kind ``points``)
positions, in pixels of the original image files; they are drawn as stored. RANSAC
runs on them with the scorer's settings (in the described image's pixels for a scorer
with ``frame: model``), so the inliers drawn are exactly those the scorer counts.

An unreadable image is drawn as a grey placeholder carrying the error; it never
stops a report.
"""

from __future__ import annotations

import csv
import json
import logging
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

from ..images import ImageReadError, read_image, target_size
from ..io import atomic_path, write_json

logger = logging.getLogger(__name__)

THUMB_SIDE = 320  # longer side of the prediction strip's thumbnails, px
MATCH_HEIGHT = (360, 480)  # height of the images in the match figure, px (smaller ones are enlarged)
KEYPOINT_SIDE = (640, 1024)  # longer side of the image in the keypoint figure, px
TITLE_PX = 30  # height of a title line, px
PLACEHOLDER_WH = (640, 480)  # size of the placeholder of an unreadable image of unknown size
GREEN, RED, GREY = "#1a9850", "#d73027", "#9e9e9e"
DPI = 100

SELECTION_RULE = (
    "queries whose top-1 the re-ranking changed come first, taken in turn from three groups "
    "(re-ranking corrected a wrong top-1; re-ranking made a correct top-1 wrong; the top-1 changed but "
    "stayed correct or stayed wrong), each group in the order of the re-ranked top-k file; queries "
    "whose top-1 did not change fill the remaining places in file order"
)
GROUPS = ("corrected", "worsened", "changed", "unchanged")

FIGURE_ORDER = ("keypoints", "matches", "predictions")  # the thesis's order
THESIS_FIGURE = {"keypoints": "4.9", "matches": "4.12", "predictions": "4.13"}

STRIP_COLUMNS = ("query", "baseline_top1", "baseline_correct", "baseline_dist_m",
                 "reranked_top1", "reranked_correct", "reranked_dist_m", "selection")


# --------------------------------------------------------------------------- helpers


def csv_path(out_png) -> Path:
    """The CSV written beside a figure: the PNG's path with ``.csv``."""
    return Path(out_png).with_suffix(".csv")


def _fmt(v):
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.3f}"
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_csv(path, header, rows) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([_fmt(v) for v in r])
    return path


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out_png


class _Loaded:
    """An image for drawing: ``array`` uint8 [h, w, 3] at ``scale`` x the original
    size ``size`` (w, h); ``error`` is set (and ``array`` grey) when unreadable."""

    def __init__(self, array, scale, size, error, name=""):
        self.array, self.scale, self.size, self.error, self.name = array, scale, size, error, name


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-9:
        return img
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))


def _load(path, max_side: int | None = None, height: int | None = None, size_hint=None,
          min_side: int | None = None) -> _Loaded:
    """Read and rescale an image (height ``height``, or longer side at most ``max_side``
    and at least ``min_side``); a grey placeholder of ``size_hint`` (w, h) or
    :data:`PLACEHOLDER_WH` if unreadable."""
    error = None
    try:
        img = read_image(path)
    except ImageReadError as e:
        error = str(e).replace(str(path), Path(path).name)
        logger.warning("drawing a placeholder: %s", e)
        w, h = (int(size_hint[0]), int(size_hint[1])) if size_hint is not None else PLACEHOLDER_WH
        img = np.full((max(1, h), max(1, w), 3), 200, np.uint8)
    h, w = img.shape[:2]
    scale = 1.0
    if height is not None:
        scale = height / h
    elif max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
    elif min_side is not None and max(h, w) < min_side:
        scale = min_side / max(h, w)
    return _Loaded(_resize(img, scale), scale, (w, h), error, Path(path).name)


def _placeholder_text(ax, loaded: _Loaded, x0: float = 0.0, width: float | None = None) -> None:
    """Write the read error over a placeholder (at horizontal offset ``x0`` in data pixels)."""
    if loaded.error is None:
        return
    h, w = loaded.array.shape[:2]
    width = w if width is None else width
    reason = loaded.error.replace(f"'{loaded.name}'", "").replace(f"{loaded.name}: ", "")
    lines = textwrap.wrap(reason, max(16, int(width / 7.5)))
    text = "\n".join(["unreadable image", _short(loaded.name, max(16, int(width / 7.5)))] + lines[:6]
                     + (["..."] if len(lines) > 6 else []))
    ax.text(x0 + width / 2, h / 2, text, ha="center", va="center", fontsize=7, color="black", clip_on=True,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})


def _short(name: str, n: int = 42) -> str:
    base = Path(str(name)).name
    return base if len(base) <= n else base[: n - 3] + "..."


# --------------------------------------------------------------------------- figures


def plot_keypoints(image_path, keypoints, out_png, title: str = "", scores=None, size_hint=None) -> dict:
    """Figure 4.9: ``keypoints [N, 2]`` (x, y in pixels of the original image) over the image.

    Writes ``out_png`` and, beside it, the CSV of the keypoints drawn (``x, y`` and
    ``score`` when ``scores`` is given). ``size_hint`` (w, h) sizes the placeholder
    of an unreadable image. Returns ``{"png", "csv", "n_keypoints", "error"}``.
    """
    kp = np.asarray(keypoints, np.float64).reshape(-1, 2)
    loaded = _load(image_path, max_side=KEYPOINT_SIDE[1], min_side=KEYPOINT_SIDE[0], size_hint=size_hint)
    h, w = loaded.array.shape[:2]
    total = h + TITLE_PX
    fig = _new_figure(w / DPI, total / DPI)
    ax = fig.add_axes([0, 0, 1, h / total])
    ax.imshow(loaded.array)
    _placeholder_text(ax, loaded)
    if len(kp):
        ax.scatter(kp[:, 0] * loaded.scale, kp[:, 1] * loaded.scale, s=6, c="#00ff66", edgecolors="black",
                   linewidths=0.3)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    fig.text(0.5, 1 - 4 / total, f"{title} ({len(kp)} keypoints)".strip(), fontsize=9, ha="center", va="top")
    png = _save(fig, out_png)
    if scores is not None:
        sc = np.asarray(scores, np.float64).reshape(-1)
        rows = [(x, y, s) for (x, y), s in zip(kp, sc)]
        header = ("x", "y", "score")
    else:
        rows, header = [(x, y) for x, y in kp], ("x", "y")
    out_csv = _write_csv(csv_path(out_png), header, rows)
    return {"png": png, "csv": out_csv, "n_keypoints": len(kp), "error": loaded.error}


def _side_by_side(lq: _Loaded, lc: _Loaded, gap: int = 10) -> tuple[np.ndarray, float]:
    """The two images on one canvas (white gap between); the candidate's x offset."""
    hq, wq = lq.array.shape[:2]
    hc, wc = lc.array.shape[:2]
    h = max(hq, hc)
    canvas = np.full((h, wq + gap + wc, 3), 255, np.uint8)
    canvas[:hq, :wq] = lq.array
    canvas[:hc, wq + gap :] = lc.array
    return canvas, float(wq + gap)


def plot_matches(img_q_path, img_c_path, kq, kc, matches, inliers_mask, out_png, title: str = "",
                 size_hints=(None, None)) -> dict:
    """Figure 4.12: matches before and after RANSAC.

    ``kq``/``kc`` are keypoints in pixels of the original query/candidate images;
    ``matches [M, 2]`` indexes them (``None``: ``kq``/``kc`` are already the ``[M, 2]``
    matched positions, row by row); ``inliers_mask [M]`` marks the RANSAC inliers.
    Two panels, the images side by side in each: all putative matches (top), the
    inliers (bottom). The CSV beside the PNG has one row per match: ``xq, yq, xc,
    yc, inlier``. Returns ``{"png", "csv", "n_matches", "n_inliers", "errors"}`` (errors:
    ``"query"``/``"candidate"`` -> read error, for unreadable images drawn as placeholders).
    """
    kq = np.asarray(kq, np.float64).reshape(-1, 2)
    kc = np.asarray(kc, np.float64).reshape(-1, 2)
    if matches is None:
        if len(kq) != len(kc):
            raise ValueError(f"paired positions need as many query as candidate points ({len(kq)} vs {len(kc)})")
        pq, pc = kq, kc
    else:
        m = np.asarray(matches, np.int64).reshape(-1, 2)
        pq, pc = kq[m[:, 0]], kc[m[:, 1]]
    inl = np.asarray(inliers_mask, bool).reshape(-1)
    if len(inl) != len(pq):
        raise ValueError(f"{len(inl)} inlier flags for {len(pq)} matches")
    lq0 = _load(img_q_path, size_hint=size_hints[0])
    lc0 = _load(img_c_path, size_hint=size_hints[1])
    height = int(np.clip(max(lq0.array.shape[0], lc0.array.shape[0]), *MATCH_HEIGHT))
    lq, lc = (_Loaded(_resize(x.array, height / x.array.shape[0]), height / x.array.shape[0], x.size, x.error, x.name)
              for x in (lq0, lc0))
    canvas, offset = _side_by_side(lq, lc)
    h, w = canvas.shape[:2]
    a = np.column_stack([pq * lq.scale, pc * lc.scale + [offset, 0.0]]) if len(pq) else np.zeros((0, 4))
    top = TITLE_PX if title else 0
    total = top + 2 * (h + TITLE_PX)
    fig = _new_figure(w / DPI, total / DPI)
    panels = [
        ("putative matches", a, np.ones(len(a), bool), "#ffcc00"),
        ("RANSAC inliers", a, inl, "#00e060"),
    ]
    for i, (label, segs, keep, color) in enumerate(panels):
        bottom = (1 - i) * (h + TITLE_PX)
        ax = fig.add_axes([0, bottom / total, 1, h / total])
        ax.imshow(canvas)
        _placeholder_text(ax, lq, 0.0, lq.array.shape[1])
        _placeholder_text(ax, lc, offset, lc.array.shape[1])
        s = segs[keep]
        if len(s):
            lines = s.reshape(-1, 2, 2)
            ax.add_collection(LineCollection(lines, colors=color, linewidths=0.8, alpha=0.85))
            ax.scatter(np.r_[s[:, 0], s[:, 2]], np.r_[s[:, 1], s[:, 3]], s=5, c=color, linewidths=0)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.axis("off")
        fig.text(0.5, (bottom + h + TITLE_PX / 2) / total, f"{label}: {int(keep.sum())}", fontsize=9,
                 ha="center", va="center")
    if title:
        fig.text(0.5, 1 - 4 / total, title, fontsize=10, ha="center", va="top")
    png = _save(fig, out_png)
    rows = [(q[0], q[1], c[0], c[1], bool(f)) for q, c, f in zip(pq, pc, inl)]
    out_csv = _write_csv(csv_path(out_png), ("xq", "yq", "xc", "yc", "inlier"), rows)
    errors = {side: e for side, e in (("query", lq.error), ("candidate", lc.error)) if e}
    return {"png": png, "csv": out_csv, "n_matches": len(pq), "n_inliers": int(inl.sum()), "errors": errors}


def _frame(ax, color, width=5):
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
    ax.set_xticks([])
    ax.set_yticks([])


def prediction_strip(rows: list[dict], out_png, root=None) -> dict:
    """Figure 4.13: per query, the query, the baseline top-1 and the re-ranked top-1.

    ``rows``: one dict per query with ``query``, ``baseline_top1``,
    ``baseline_correct``, ``baseline_dist_m``, ``reranked_top1``,
    ``reranked_correct``, ``reranked_dist_m`` and optionally ``selection`` (why the
    query was picked) and ``query_path`` / ``baseline_path`` / ``reranked_path``
    (image files; by default the names, under ``root`` when given). The top-1 images
    are framed green when correct, red when wrong, titled with the distance in
    metres. The CSV beside the PNG holds the rows (:data:`STRIP_COLUMNS`).
    Returns ``{"png", "csv", "errors"}`` (errors: image name -> read error).
    """
    if not rows:
        raise ValueError("prediction_strip: no rows to draw")

    def path_of(r, key, name_key):
        if r.get(key):
            return Path(r[key])
        return Path(root) / r[name_key] if root is not None else Path(r[name_key])

    n = len(rows)
    fig = _new_figure(9.6, 2.7 * n + 0.3)
    errors: dict[str, str] = {}
    for i, r in enumerate(rows):
        cells = [
            ("query", path_of(r, "query_path", "query"), r["query"], None, None),
            ("baseline top-1", path_of(r, "baseline_path", "baseline_top1"), r["baseline_top1"],
             r["baseline_correct"], r["baseline_dist_m"]),
            ("re-ranked top-1", path_of(r, "reranked_path", "reranked_top1"), r["reranked_top1"],
             r["reranked_correct"], r["reranked_dist_m"]),
        ]
        for j, (label, path, name, correct, dist) in enumerate(cells):
            ax = fig.add_subplot(n, 3, 3 * i + j + 1)
            loaded = _load(path, max_side=THUMB_SIDE)
            if loaded.error:
                errors[str(name)] = loaded.error
            ax.imshow(loaded.array)
            _placeholder_text(ax, loaded)
            if correct is None:
                _frame(ax, GREY, 1)
                text = f"query: {_short(name, 30)}"
                color = "black"
            else:
                color = GREEN if correct else RED
                _frame(ax, color)
                text = f"{label}: {'correct' if correct else 'wrong'}, {float(dist):.1f} m"
            ax.set_title(text, fontsize=8, color=color, pad=3)
    fig.tight_layout(pad=0.6, h_pad=1.0, w_pad=0.6)
    png = _save(fig, out_png)
    out_csv = _write_csv(csv_path(out_png), STRIP_COLUMNS, [[r.get(c, "") for c in STRIP_COLUMNS] for r in rows])
    return {"png": png, "csv": out_csv, "errors": errors}


# --------------------------------------------------------------------------- selection and geometry


def choose_queries(base_top1, reranked_top1, base_correct, reranked_correct, n: int) -> list[tuple[int, str]]:
    """Indices of ``n`` queries to show, with the group each came from (:data:`SELECTION_RULE`).

    Arguments are per query (same order): the two top-1 names and whether each is
    correct. Groups: ``corrected``, ``worsened``, ``changed`` (top-1 changed, same
    correctness), ``unchanged``; the first three are taken in turn, the last fills.
    """
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, (b, r, bc, rc) in enumerate(zip(base_top1, reranked_top1, base_correct, reranked_correct)):
        if b == r:
            groups["unchanged"].append(i)
        elif rc and not bc:
            groups["corrected"].append(i)
        elif bc and not rc:
            groups["worsened"].append(i)
        else:
            groups["changed"].append(i)
    out: list[tuple[int, str]] = []
    queues = [list(groups[g]) for g in GROUPS[:3]]
    while len(out) < n and any(queues):
        for g, q in zip(GROUPS[:3], queues):
            if q and len(out) < n:
                out.append((q.pop(0), g))
    out += [(i, "unchanged") for i in groups["unchanged"][: max(0, n - len(out))]]
    return out


def ransac_settings(scorer_conf: dict | None) -> tuple[dict, str]:
    """The RANSAC conf a match figure uses, and a note: the scorer's own when it is a
    RANSAC scorer, else the thesis's default (homography, 24 px)."""
    from ..scorers import build_scorer
    from ..scorers.ransac import RansacInliers

    scorer = build_scorer(scorer_conf or {"name": "ransac"})
    if scorer.needs == "pair_score":
        raise ValueError(f"scorer {scorer.conf['name']!r} scores pairs without matches: no RANSAC figure")
    if isinstance(scorer, RansacInliers):
        return dict(scorer.conf), f"the scorer's RANSAC ({scorer.conf['name']})"
    conf = {**RansacInliers().conf, "name": "ransac"}
    return conf, f"RANSAC with default settings (the scorer {scorer.conf['name']!r} does not use RANSAC)"


def ransac_inliers(kq, kc, matches, conf: dict, q: dict | None = None, c: dict | None = None) -> np.ndarray:
    """Boolean ``[M]``: the matches the RANSAC scorer of ``conf`` (ransac or
    multiscale_ransac) counts as inliers: its own :meth:`inlier_mask`, so a figure draws
    exactly what the scorer counts. For multi-scale RANSAC, the union over levels."""
    from ..scorers import build_scorer

    kq = np.asarray(kq, np.float64).reshape(-1, 2)
    kc = np.asarray(kc, np.float64).reshape(-1, 2)
    m = np.asarray(matches, np.int64).reshape(-1, 2)
    conf = {**conf, "name": conf.get("name") or ("multiscale_ransac" if "weights" in conf else "ransac")}
    return build_scorer(conf).inlier_mask(kq, kc, m, q or {}, c or {})


def _image_size(path) -> tuple[int, int] | None:
    from ..images import ImageReadError, image_size

    try:
        return image_size(path)[:2]  # upright, as the images are read
    except ImageReadError:
        return None


def _matcher_resize(matcher_conf: dict):
    from ..matchers import get_matcher_class

    if "resize" in matcher_conf:
        return matcher_conf["resize"]
    try:
        return get_matcher_class(matcher_conf["name"]).default_conf.get("resize")
    except (ValueError, KeyError, ImportError):
        return None


def _positions_lookup(index_dir):
    """Positions from the index tables (as :func:`pipeline.evaluate.index_positions`), also by bare file name."""
    if index_dir is None:
        return None
    from ..evaluate import index_positions

    pos = index_positions(index_dir)
    for name, p in list(pos.items()):
        pos.setdefault(Path(name).name, p)
    return pos


def _distances(names_q, names_c, positions) -> np.ndarray:
    """``[Q, k]`` metres, through :func:`pipeline.evaluate.candidate_distances`."""
    from ..evaluate import candidate_distances
    from ..topk import TopK

    c = np.asarray(names_c, dtype=object)
    sub = TopK(list(names_q), c, np.zeros(c.shape, np.int64), np.zeros(c.shape, np.float32))
    return candidate_distances(sub, positions)


# --------------------------------------------------------------------------- the report


def qualitative_report(root, retrieval_topk, reranked_topk, out_dir, threshold_m: float = 25.0, n_queries: int = 4,
                       features=None, matches=None, scorer_conf: dict | None = None, resolve=None,
                       index_dir=None) -> dict:
    """Draw the qualitative figures of one re-ranking method into ``out_dir``.

    - ``predictions.png/.csv`` (Figure 4.13): ``n_queries`` queries picked by
      :data:`SELECTION_RULE` (queries in both top-k files only), each with its
      baseline and re-ranked top-1, correct when within ``threshold_m`` metres
      (positions as :mod:`pipeline.evaluate` reads them: VG names, or the index
      tables of ``index_dir``).
    - The *figure query*: the first picked query with a true positive (within
      ``threshold_m``) among its re-ranked top-K (K: the re-ranking's ``rerank_k``,
      at most the matches file's K); its *figure candidate* is the first such
      positive. When no picked query has one, the first picked query and its
      re-ranked top-1 (a negative pair) are shown.
    - ``keypoints_query.png/.csv`` (Figure 4.9) when ``features`` (a feature store
      index JSON) is given: the figure query's stored keypoints. Without features,
      for a detector-free matcher (kind ``points``), the query's points matched
      with the figure candidate (Figure 4.10).
    - ``matches_ransac.png/.csv`` (Figure 4.12) when ``matches`` (the matches file
      of the retrieval top-k) is given: the figure pair's matches before and after
      RANSAC (``scorer_conf``'s, or the thesis's default for a non-RANSAC scorer).
      Pair-score matchers (RRT, CVNet) have no matches: skipped, with the reason.

    ``resolve`` maps top-k names to paths under ``root`` (default:
    :class:`pipeline.rerank.NameResolver` over ``index_dir``). Returns the manifest
    (also written to ``out_dir/manifest.json``): ``files`` maps each written file
    (relative to ``out_dir``) to a caption; ``figures`` lists the figures drawn, in
    the thesis's order, each a dict with ``name`` (``keypoints``, ``matches``,
    ``predictions``), ``thesis_figure``, ``png``, ``csv`` (relative paths),
    ``caption`` and its numbers (query, candidate, ranks, counts, RANSAC conf);
    ``skipped`` maps the figures not drawn to the reason; ``queries`` the shown
    queries and the group each was picked from; ``image_errors`` the unreadable
    images drawn as placeholders.
    """
    from ..rerank import Matches, NameResolver
    from ..topk import TopK, read_topk

    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = retrieval_topk if isinstance(retrieval_topk, TopK) else read_topk(retrieval_topk)
    rr = reranked_topk if isinstance(reranked_topk, TopK) else read_topk(reranked_topk)
    resolve = resolve or NameResolver(root, index_dir)
    positions = _positions_lookup(index_dir)
    M = None
    if matches is not None:  # checked before anything is drawn
        M = matches if isinstance(matches, Matches) else Matches(matches)
        _check_matches(M, base, resolve)

    base_row = {str(n): i for i, n in enumerate(base.query_names)}
    common = [(ri, base_row[str(n)]) for ri, n in enumerate(rr.query_names) if str(n) in base_row]
    if not common:
        raise ValueError("the retrieval and re-ranked top-k files share no query")
    if len(common) < len(rr):
        logger.warning("%d re-ranked queries are not in the retrieval top-k file", len(rr) - len(common))
    qnames = [str(rr.query_names[ri]) for ri, _ in common]
    b_top1 = [str(base.candidate_names[bi, 0]) for _, bi in common]
    r_top1 = [str(rr.candidate_names[ri, 0]) for ri, _ in common]
    b_dist = _distances(qnames, [[n] for n in b_top1], positions)[:, 0]
    r_dist = _distances(qnames, [[n] for n in r_top1], positions)[:, 0]
    b_ok, r_ok = b_dist <= threshold_m, r_dist <= threshold_m
    chosen = choose_queries(b_top1, r_top1, b_ok, r_ok, n_queries)

    manifest: dict = {
        "threshold_m": threshold_m, "retrieval_topk": str(retrieval_topk if not isinstance(retrieval_topk, TopK) else ""),
        "reranked_topk": str(reranked_topk if not isinstance(reranked_topk, TopK) else ""),
        "selection_rule": SELECTION_RULE, "queries": [], "files": {}, "figures": [], "skipped": {},
        "image_errors": {},
    }

    def record(key, result, caption, csv_caption, **extra):
        png = str(Path(result["png"]).relative_to(out_dir))
        csv_rel = str(Path(result["csv"]).relative_to(out_dir))
        manifest["files"][png] = caption
        manifest["files"][csv_rel] = f"the numbers of {png}: {csv_caption}"
        manifest["figures"].append({"name": key, "thesis_figure": THESIS_FIGURE[key], "png": png, "csv": csv_rel,
                                    "caption": caption, **extra})
        manifest["figures"].sort(key=lambda f: FIGURE_ORDER.index(f["name"]))

    # ---- Figure 4.13: the prediction strip
    rows = []
    for i, group in chosen:
        rows.append({
            "query": qnames[i], "baseline_top1": b_top1[i], "baseline_correct": bool(b_ok[i]),
            "baseline_dist_m": float(b_dist[i]), "reranked_top1": r_top1[i], "reranked_correct": bool(r_ok[i]),
            "reranked_dist_m": float(r_dist[i]), "selection": group,
            "query_path": root / resolve(qnames[i]), "baseline_path": root / resolve(b_top1[i]),
            "reranked_path": root / resolve(r_top1[i]),
        })
        manifest["queries"].append({"query": qnames[i], "selection": group})
    if rows:
        res = prediction_strip(rows, out_dir / "predictions.png")
        manifest["image_errors"].update(res["errors"])
        n_fixed = sum(1 for r in rows if r["reranked_correct"] and not r["baseline_correct"])
        record("predictions", res,
               f"Predictions of {len(rows)} queries (rows): the query, the retrieval top-1 and the re-ranked top-1; "
               f"green frame: within {threshold_m:g} m of the query, red: farther (distance in metres). "
               f"Re-ranking corrects {n_fixed} of them. Queries: {SELECTION_RULE}.",
               csv_caption="one row per query: top-1 names, correct flags, distances (m)",
               queries=[r["query"] for r in rows])
    else:
        manifest["skipped"]["predictions"] = "no query to show (n_queries is 0)"

    if features is None and matches is None:
        write_json(out_dir / "manifest.json", manifest)
        return manifest

    # ---- the figure query and candidate
    k_fig = int(rr.meta.get("rerank_k") or (M.k if M is not None else rr.k))
    if M is not None:
        k_fig = min(k_fig, M.k)
    k_fig = max(1, min(k_fig, rr.k))
    pick = None
    for i, _ in chosen:
        ri, bi = common[i]
        d = _distances([qnames[i]], [list(rr.candidate_names[ri, :k_fig])], positions)[0]
        hits = np.flatnonzero(d <= threshold_m)
        if len(hits):
            pick = (i, int(hits[0]), float(d[hits[0]]), True)
            break
    if pick is None and chosen:
        i = chosen[0][0]
        pick = (i, 0, float(r_dist[i]), False)
    if pick is None:
        manifest["skipped"]["keypoints"] = manifest["skipped"]["matches"] = "no query chosen"
        write_json(out_dir / "manifest.json", manifest)
        return manifest
    i, rank, dist, positive = pick
    ri, bi = common[i]
    qname, cname = qnames[i], str(rr.candidate_names[ri, rank])
    qpath, cpath = root / resolve(qname), root / resolve(cname)
    pair_info = {"query": qname, "candidate": cname, "reranked_rank": rank + 1, "distance_m": dist,
                 "positive": positive}
    ret_rank = None
    if M is not None:
        found = np.flatnonzero(base.candidate_names[bi, : M.k] == cname)
        ret_rank = int(found[0]) if len(found) else None
        pair_info["retrieval_rank"] = None if ret_rank is None else ret_rank + 1
    pair_words = (f"its first true positive (re-ranked rank {rank + 1}, {dist:.1f} m)" if positive else
                  f"its re-ranked top-1, a negative ({dist:.1f} m): no true positive among the re-ranked top-{k_fig} "
                  "of the shown queries")

    store, own_store = None, False
    q_feats = c_feats = None
    if features is not None:
        from ..local_store import FeatureStore

        own_store = not isinstance(features, FeatureStore)
        store = FeatureStore(features) if own_store else features
        q_feats, c_feats = _features_of(store, resolve(qname)), _features_of(store, resolve(cname))

    # ---- Figure 4.9: keypoints of the figure query
    kind = M.kind if M is not None else None
    if q_feats is not None:
        kp = np.asarray(q_feats["keypoints"], np.float64).reshape(-1, 2)  # stores hold original-image pixels
        res = plot_keypoints(qpath, kp, out_dir / "keypoints_query.png", title=f"query {_short(qname)}",
                             scores=q_feats.get("scores"), size_hint=q_feats.get("original_size"))
        if res["error"]:
            manifest["image_errors"][qname] = res["error"]
        record("keypoints", res,
               f"Keypoints detected on query {qname} ({res['n_keypoints']}), drawn at original-image pixels.",
               csv_caption="x, y (original-image pixels), detector score", query=qname,
               n_keypoints=res["n_keypoints"])
    elif kind == "points" and ret_rank is not None:
        pts = M.pair(bi, ret_rank)
        scale_q = _points_scale(qpath, M)
        res = plot_keypoints(qpath, pts[:, :2] * scale_q, out_dir / "keypoints_query.png",
                             title=f"query {_short(qname)}: points matched with a candidate")
        if res["error"]:
            manifest["image_errors"][qname] = res["error"]
        record("keypoints", res,
               f"Detector-free matcher {M.info['matcher'].get('name')!r}: the points of query {qname} it matched with "
               f"{cname} ({pair_words}); they depend on the pair.",
               csv_caption="x, y (original-image pixels)", query=qname, candidate=cname,
               n_keypoints=res["n_keypoints"])
    else:
        manifest["skipped"]["keypoints"] = (
            f"no local features of query {qname} (unreadable at extraction)" if features is not None else
            "no feature store given (and the matcher is not detector-free)")

    # ---- Figure 4.12: matches before and after RANSAC
    if M is None:
        manifest["skipped"]["matches"] = "no matches file given"
    elif kind == "pair_score":
        manifest["skipped"]["matches"] = (f"matcher {M.info['matcher'].get('name')!r} gives pair scores, "
                                          "not matches: nothing to draw")
    elif ret_rank is None:
        manifest["skipped"]["matches"] = f"{cname} is not among the matched top-{M.k} of {qname}"
    elif kind == "matches" and (q_feats is None or c_feats is None):
        manifest["skipped"]["matches"] = ("no feature store given: index matches need the keypoints"
                                          if features is None else
                                          f"no local features of {qname if q_feats is None else cname}")
    else:
        try:
            conf, ransac_note = ransac_settings(scorer_conf)
        except ValueError as e:
            manifest["skipped"]["matches"] = str(e)
        else:
            mconf, m = M.info["matcher"], M.pair(bi, ret_rank)
            title = f"{mconf.get('name')}: query vs {'positive' if positive else 'negative'} candidate"
            if kind == "points":  # stored positions, paired row by row (as score_topk scores them)
                pq, pc = m[:, :2].astype(np.float64), m[:, 2:].astype(np.float64)
                inl = ransac_inliers(pq, pc, np.repeat(np.arange(len(m))[:, None], 2, 1), conf)
                res = plot_matches(qpath, cpath, pq * _points_scale(qpath, M), pc * _points_scale(cpath, M),
                                   None, inl, out_dir / "matches_ransac.png", title)
            else:
                kq, kc = np.asarray(q_feats["keypoints"], np.float64), np.asarray(c_feats["keypoints"], np.float64)
                if conf.get("frame") == "model":  # the scorer fits in the described images' pixels
                    from ..local_store import described_keypoints

                    inl = ransac_inliers(described_keypoints(q_feats), described_keypoints(c_feats), m, conf,
                                         q_feats, c_feats)
                else:
                    inl = ransac_inliers(kq, kc, m, conf, q_feats, c_feats)
                res = plot_matches(qpath, cpath, kq, kc, m, inl,
                                   out_dir / "matches_ransac.png", title,
                                   size_hints=(q_feats.get("original_size"), c_feats.get("original_size")))
            for side, name in (("query", qname), ("candidate", cname)):
                if side in res["errors"]:
                    manifest["image_errors"][name] = res["errors"][side]
            ransac_desc = f"{conf['model']} {conf['method']}, " + (
                "per-level thresholds" if conf.get("thresholds") else f"{conf['threshold']:g} px")
            record("matches", res,
                   f"Matches of query {qname} with {pair_words}: top, all {res['n_matches']} putative matches of "
                   f"{mconf.get('name')!r}; bottom, the {res['n_inliers']} inliers of {ransac_note} ({ransac_desc}).",
                   csv_caption="one row per putative match: query and candidate positions (original-image pixels), "
                               "RANSAC inlier flag",
                   **pair_info, n_matches=res["n_matches"], n_inliers=res["n_inliers"], ransac=conf, matcher=mconf)
    if own_store:
        store.close()
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _check_matches(M, base, resolve) -> None:
    """The matches file must be the one made from the retrieval top-k (same queries, same order)."""
    import h5py

    if M.info.get("n_queries") != len(base):
        raise ValueError(f"{M.path}: made for {M.info.get('n_queries')} queries, the retrieval top-k has {len(base)}: "
                         "give the matches of the retrieval top-k that was re-ranked")
    with h5py.File(M.path, "r") as f:
        if "query_names" not in f:
            return
        stored = [x.decode() if isinstance(x, bytes) else str(x) for x in f["query_names"][:]]
    expected = [resolve(str(n)) for n in base.query_names]
    if stored != expected:
        bad = next(i for i, (a, b) in enumerate(zip(stored, expected)) if a != b)
        raise ValueError(f"{M.path}: query {bad} is {stored[bad]!r}, the retrieval top-k's is {expected[bad]!r}: "
                         "give the matches of the retrieval top-k that was re-ranked")


def _features_of(store, name: str) -> dict | None:
    """An image's features, None when the store has none (unreadable at extraction, or not extracted)."""
    if name not in store:
        if name not in store.errors:
            logger.warning("%s: no local features of %s", store.index_file, name)
        return None
    return store.get(name)


def _points_scale(path, M) -> np.ndarray:
    """Per-axis factors from a matches view's stored positions to the original image: 1,
    except for stores written before positions were stored in original-image pixels
    (they hold the matcher's resized input)."""
    if M.info.get("points_frame") == "original":
        return np.ones(2)
    matcher_conf = M.info["matcher"]
    size = _image_size(path)
    if size is None:
        return np.ones(2)
    tw, th = target_size(size[0], size[1], _matcher_resize(matcher_conf))
    return np.array([size[0] / tw, size[1] / th], np.float64)


def main(argv=None) -> dict:
    """``python -m pipeline.reports.qualitative``: the report of one re-ranking method."""
    import argparse

    p = argparse.ArgumentParser(description=qualitative_report.__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="dataset root")
    p.add_argument("--retrieval", required=True, help="retrieval top-k file")
    p.add_argument("--reranked", required=True, help="re-ranked top-k file")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threshold", type=float, default=25.0, help="metres (default 25)")
    p.add_argument("--n-queries", type=int, default=4)
    p.add_argument("--features", default=None, help="feature store index (JSON)")
    p.add_argument("--matches", default=None, help="matches file of the retrieval top-k")
    p.add_argument("--scorer-conf", type=json.loads, default=None, help="scorer conf (JSON)")
    p.add_argument("--index-dir", default=None, help="index tables (imported names, positions)")
    a = p.parse_args(argv)
    return qualitative_report(a.root, a.retrieval, a.reranked, a.out_dir, a.threshold, a.n_queries, a.features,
                              a.matches, a.scorer_conf, index_dir=a.index_dir)


if __name__ == "__main__":
    main()
