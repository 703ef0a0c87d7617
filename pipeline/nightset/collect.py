"""Collect geotagged photos of an area from Flickr (night query set, stage 1).

``collect(bbox, build)`` lists every public geotagged photo in ``bbox`` with the REST
method ``flickr.photos.search`` and downloads one image of each, writing

- ``<build>/collected/images/<photo_id>.jpg``: the images (each one checked to decode);
- ``<build>/collected/photos.csv``: one row per photo with a downloaded, readable image,
  columns ``photo_id, file, lat, lon, accuracy, datetaken, owner, title, url, license``
  (+ ``ownername``, for attribution), sorted by photo id;
- ``<build>/collected/skipped.csv``: photos listed but left out, with the reason;
- ``<build>/collected/summary.json``: the counts returned by :func:`collect`;
- ``<build>/collected/listing.jsonl``: the resume state (see below).

The listing uses the Flickr client of :mod:`pipeline.nightset.flickr` (rate limits,
retries, result cap and query splitting are described there): a query whose ``total``
exceeds the cap is split into four quadrants of its bbox (recursively), and a bbox too
small to split into two halves of its taken-date range. An image that cannot be
downloaded or does not decode is skipped and listed, never fatal; only ``abort_after``
failed downloads in a row (the network is down) stop the run.

Resuming: every fetched page (its photos) and every failed download is appended to
``listing.jsonl`` (fsync'd; a torn last line is dropped on reading) and images are
written atomically, so a killed run loses nothing. A second run re-fetches no listed
page, re-downloads no image and retries only downloads that failed for a transient
reason. The file's first line records the listing parameters; a run with other ones
(bbox, dates, per_page, cap) stops with an error rather than mixing two listings.
Filtering (bbox re-check, ``min_accuracy``) and ``max_photos`` may change between runs.

Only photos whose reported coordinates lie inside ``bbox`` are kept (Flickr's geo index
may return neighbours), and optionally those with ``accuracy >= min_accuracy`` (Flickr's
1 = world .. 16 = street).

This module holds the stage (:func:`collect`: listing with resume, downloads, the tables)
and its CLI.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from ..io import atomic_path, write_json
from .flickr import (
    ENV_KEY,
    FLICKR_REST,
    IMAGE_SIZES,
    MAX_PER_PAGE,
    MAX_RESULTS_PER_QUERY,
    FlickrClient,
    Query,
    _api_key,
    _float,
    _int,
    _page_photos,
    _Permanent,
    _Transient,
    parse_bbox,
    parse_taken,
    photo_url,
)

logger = logging.getLogger(__name__)

COLUMNS = ["photo_id", "file", "lat", "lon", "accuracy", "datetaken", "owner", "title", "url", "license", "ownername"]
SKIPPED_COLUMNS = ["photo_id", "reason", "url"]
STATE_NAME = "listing.jsonl"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# ----------------------------------------------------------------------------- state


class _State:
    """The append-only resume log ``listing.jsonl``: params, pages, splits, failed downloads."""

    def __init__(self, path: Path, params: dict):
        self.path = path
        self.queries: dict[str, dict] = {}  # key -> {"pages", "total", "done": set, "split": bool, "capped"}
        self.photos: dict[str, dict] = {}  # photo id -> record, in listing order
        self.failed: dict[str, dict] = {}  # photo id -> {"reason", "permanent", "url"}
        lines = self._read()
        if lines:
            old = lines[0].get("params") if lines[0].get("type") == "params" else None
            if old != params:
                raise ValueError(f"{path}: made by a run with other listing parameters ({old} vs {params}); "
                                 "use another build folder or delete that file to list again")
            for rec in lines[1:]:
                self._apply(rec)
            logger.info("%s: resuming: %d pages listed, %d photos known, %d failed downloads",
                        path, sum(len(q["done"]) for q in self.queries.values()), len(self.photos), len(self.failed))
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends, closed by close()
        if not lines:
            self.append({"type": "params", "params": params})

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        keep = raw[: raw.rfind(b"\n") + 1]  # a line without its newline is a torn write
        out = []
        for i, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: line {i} is not valid JSON ({e}); "
                                 "delete the file to list again") from None
        if len(keep) != len(raw):
            logger.warning("%s: dropping a torn last line (%d bytes)", self.path, len(raw) - len(keep))
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(keep)
        return out

    def _query(self, key: str) -> dict:
        return self.queries.setdefault(key, {"pages": None, "total": None, "done": set(), "split": False,
                                             "capped": False})

    def _apply(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind == "page":
            q = self._query(rec["query"])
            q["pages"], q["total"], q["capped"] = rec["pages"], rec["total"], rec.get("capped", False)
            q["done"].add(rec["page"])
            for p in rec["photos"]:
                self.photos.setdefault(str(p["id"]), p)
        elif kind == "split":
            q = self._query(rec["query"])
            q["split"], q["total"] = True, rec.get("total")
        elif kind == "failed":
            self.failed[str(rec["id"])] = {"reason": rec["reason"], "permanent": rec["permanent"],
                                           "url": rec.get("url", "")}

    def append(self, rec: dict) -> None:
        self._fh.write(json.dumps(rec, separators=(",", ":"), default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._apply(rec)

    def close(self) -> None:
        self._fh.close()


# ----------------------------------------------------------------------------- photos


def check_photo(photo: dict, bbox, min_accuracy: int | None = None) -> str | None:
    """Why ``photo`` is left out (None: kept): no position, outside bbox, low accuracy, bad id."""
    if not _SAFE_ID.match(str(photo.get("id", ""))):
        return "bad photo id"
    lat, lon = _float(photo.get("latitude")), _float(photo.get("longitude"))
    if lat is None or lon is None or (lat == 0 and lon == 0):
        return "no position"
    x0, y0, x1, y1 = bbox
    if not (x0 <= lon <= x1 and y0 <= lat <= y1):
        return "outside bbox"
    if min_accuracy is not None:
        acc = _int(photo.get("accuracy"))
        if acc is None or acc < min_accuracy:
            return f"accuracy below {min_accuracy}"
    return None


def _row(photo: dict, url: str) -> dict:
    pid = str(photo["id"])
    acc = _int(photo.get("accuracy"))
    return {"photo_id": pid, "file": f"images/{pid}.jpg", "lat": _float(photo["latitude"]),
            "lon": _float(photo["longitude"]), "accuracy": "" if acc is None else acc,
            "datetaken": photo.get("datetaken", "") or "", "owner": photo.get("owner", "") or "",
            "title": photo.get("title", "") or "", "url": url, "license": photo.get("license", "") or "",
            "ownername": photo.get("ownername", "") or ""}


def _id_order(pid: str):
    return (len(pid), pid)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _write_image(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- collect


def collect(bbox, out_dir, api_key=None, base_url=FLICKR_REST, per_page=250, max_photos=None,
            min_taken=None, max_taken=None, rate=1.0, retries=5, min_accuracy=None, session=None, *,
            max_results_per_query=MAX_RESULTS_PER_QUERY, image_rate=None, sizes=IMAGE_SIZES,
            abort_after=10, sleep=time.sleep, progress=True) -> dict:
    """List the geotagged Flickr photos in ``bbox`` and download their images.

    Args:
        bbox: ``"min_lon,min_lat,max_lon,max_lat"`` (WGS84 degrees) or 4 numbers.
        out_dir: the night-set build folder ``<build>``; writes ``<build>/collected/``.
        api_key: Flickr API key; default the environment variable ``FLICKR_API_KEY``.
        base_url: the REST endpoint (a mock server in tests).
        per_page: photos per listed page (1..500).
        max_photos: stop once this many images are in the folder (earlier runs included).
        min_taken, max_taken: taken-date range, ``YYYY-MM-DD[ HH:MM:SS]`` or unix time.
        rate: API requests per second (None or 0: no limit); ``image_rate``: the same
            for image downloads (default ``rate``).
        retries: tries after the first for each request.
        min_accuracy: keep photos with Flickr accuracy >= this (1..16); None keeps all.
        session: a ``requests.Session`` to use (proxies, adapters); one is made if None.
        max_results_per_query: Flickr's cap on the results of one search (4,000).
        sizes: ``url_*`` extras to download, preferred first.
        abort_after: stop (raise) after this many failed downloads in a row.
        sleep: the function used to wait (tests pass a no-op).
        progress: show a tqdm bar.

    Returns the summary (also written to ``<build>/collected/summary.json``).
    Raises ValueError for bad arguments or a missing key, FlickrError for an API error
    reply (or when retries run out), RuntimeError when downloads keep failing; a run that
    raised can be started again and resumes.
    """
    key = _api_key(api_key)
    box = parse_bbox(bbox)
    lo, hi = parse_taken(min_taken, "min_taken"), parse_taken(max_taken, "max_taken")
    if lo and hi and lo > hi:
        raise ValueError(f"min_taken {lo} is after max_taken {hi}")
    per_page = int(per_page)
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise ValueError(f"per_page {per_page}: Flickr allows 1..{MAX_PER_PAGE}")
    cap = int(max_results_per_query)
    if cap < per_page:
        raise ValueError(f"max_results_per_query {cap} is smaller than per_page {per_page}")
    if min_accuracy is not None and not 1 <= int(min_accuracy) <= 16:
        raise ValueError(f"min_accuracy {min_accuracy}: Flickr accuracy is 1 (world) .. 16 (street)")
    if max_photos is not None and int(max_photos) < 0:
        raise ValueError(f"max_photos {max_photos}: must be >= 0")
    min_accuracy = None if min_accuracy is None else int(min_accuracy)

    out = Path(out_dir) / "collected"
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for tmp in images.glob(".*.tmp-*"):  # left by a killed run (atomic_path's temporaries)
        tmp.unlink(missing_ok=True)
    params = {"bbox": list(box), "min_taken": lo, "max_taken": hi, "per_page": per_page, "cap": cap}
    state = _State(out / STATE_NAME, params)
    client = FlickrClient(key, base_url, session, rate, image_rate, retries, sleep)
    stats = {"pages_fetched": 0, "pages_reused": 0, "downloaded": 0, "splits": 0, "capped_queries": 0,
             "listing_complete": False}
    have = {p.stem for p in images.glob("*.jpg")}
    already = len(have)
    bar = tqdm(total=0, desc=f"collect {out.parent.name}", unit="img", mininterval=2, disable=not progress)
    consecutive = [0]

    def room() -> bool:
        return max_photos is None or len(have) < int(max_photos)

    def todo(photos) -> list[dict]:
        return [p for p in photos if str(p["id"]) not in have and check_photo(p, box, min_accuracy) is None
                and not state.failed.get(str(p["id"]), {}).get("permanent", False)]

    def download(photos: list[dict]) -> None:
        bar.total += len(photos)
        bar.refresh()
        for p in photos:
            if not room():
                return
            pid = str(p["id"])
            url = photo_url(p, sizes)
            if url is None:
                state.append({"type": "failed", "id": pid, "reason": "no image url", "permanent": True, "url": ""})
                bar.update()
                continue
            try:
                data = client.image(url)
            except (_Permanent, _Transient) as e:
                permanent = isinstance(e, _Permanent)
                reason = str(e) if permanent else f"download failed: {e}"
                logger.warning("photo %s: %s; skipped (%s)", pid, reason, url)
                state.append({"type": "failed", "id": pid, "reason": reason, "permanent": permanent, "url": url})
                bar.update()
                consecutive[0] = 0 if permanent else consecutive[0] + 1
                if abort_after and consecutive[0] >= abort_after:
                    raise RuntimeError(f"{consecutive[0]} downloads failed in a row (last: {url}: {e}); "
                                       "is the network down? Run again to resume") from None
                continue
            consecutive[0] = 0
            _write_image(images / f"{pid}.jpg", data)
            have.add(pid)
            stats["downloaded"] += 1
            bar.update()

    try:
        logger.info("collect: bbox %s, taken %s..%s -> %s", params["bbox"], lo or "-", hi or "-", out)
        download(todo(state.photos.values()))  # listed by an earlier run, not downloaded yet
        for page_photos in _walk(client, state, Query(box, lo, hi), per_page, cap, stats, room):
            download(todo(page_photos))
            bar.set_postfix(pages=stats["pages_fetched"] + stats["pages_reused"], refresh=False)
    finally:
        bar.close()
        state.close()
        client.close()
    return _finish(out, state, box, min_accuracy, sizes, have, stats, already, max_photos)


def _walk(client: FlickrClient, state: _State, root: Query, per_page: int, cap: int, stats: dict,
          room: Callable[[], bool]) -> Iterator[list[dict]]:
    """Fetch every page not yet listed (depth first over split queries); yield each page's photos."""
    stack = [root]
    max_pages = max(1, math.ceil(cap / per_page))
    while stack and room():
        q = stack.pop()
        rec = state.queries.get(q.key)
        if rec and rec["split"]:
            stack.extend(reversed(q.split()))
            continue
        if rec is None or rec["pages"] is None:
            reply = client.search(**q.params(), per_page=per_page, page=1)
            total, pages = _int(reply.get("total")) or 0, _int(reply.get("pages")) or 0
            if total > cap:
                children = q.split()
                if children:
                    logger.info("query %s: %d results > %d: split in %d", q.key, total, cap, len(children))
                    state.append({"type": "split", "query": q.key, "total": total})
                    stats["splits"] += 1
                    stack.extend(reversed(children))
                    continue
                logger.warning("query %s: %d results > %d and cannot be split further: only the first %d are "
                               "listed", q.key, total, cap, cap)
            photos = _page_photos(reply)
            state.append({"type": "page", "query": q.key, "page": 1, "pages": pages, "total": total,
                          "capped": total > cap, "photos": photos})
            stats["pages_fetched"] += 1
            yield photos
            if not photos:
                continue
            rec = state.queries[q.key]
        else:
            stats["pages_reused"] += len(rec["done"])
        stats["capped_queries"] += bool(rec["capped"])
        for page in range(2, min(rec["pages"], max_pages) + 1):
            if page in rec["done"]:
                continue
            if not room():
                return
            reply = client.search(**q.params(), per_page=per_page, page=page)
            photos = _page_photos(reply)
            state.append({"type": "page", "query": q.key, "page": page, "pages": rec["pages"],
                          "total": rec["total"], "capped": rec["capped"], "photos": photos})
            stats["pages_fetched"] += 1
            yield photos
            if not photos:  # past the end of the results (they shrank since page 1)
                break
    stats["listing_complete"] = not stack


def _finish(out: Path, state: _State, box, min_accuracy, sizes, have: set, stats: dict, already: int,
            max_photos) -> dict:
    rows, skipped, reasons = [], [], {}
    for pid, p in state.photos.items():
        why = check_photo(p, box, min_accuracy)
        if why is None and pid in have:
            rows.append(_row(p, photo_url(p, sizes) or ""))
            continue
        if why is None:
            fail = state.failed.get(pid)
            why = fail["reason"] if fail else "not downloaded (max_photos)"
        reasons[_reason_key(why)] = reasons.get(_reason_key(why), 0) + 1
        if why not in ("outside bbox", "no position") and not why.startswith("accuracy below"):
            skipped.append({"photo_id": pid, "reason": why, "url": photo_url(p, sizes) or ""})
    rows.sort(key=lambda r: _id_order(r["photo_id"]))
    skipped.sort(key=lambda r: _id_order(r["photo_id"]))
    _write_csv(out / "skipped.csv", skipped, SKIPPED_COLUMNS)
    _write_csv(out / "photos.csv", rows, COLUMNS)
    leaves = [q for q in state.queries.values() if not q["split"]]
    summary = {
        "bbox": list(box), "min_accuracy": min_accuracy, "max_photos": max_photos,
        "queries": len(leaves), **stats,
        "photos_listed": len(state.photos),
        "eligible": sum(check_photo(p, box, min_accuracy) is None for p in state.photos.values()),
        "already_downloaded": already, "rows": len(rows),
        "skipped": dict(sorted(reasons.items())), "failed": skipped,
        "complete": stats["listing_complete"] and not any(r["reason"] == "not downloaded (max_photos)" or
                                           r["reason"].startswith("download failed") for r in skipped),
        "csv": str(out / "photos.csv"),
    }
    write_json(out / "summary.json", summary)
    logger.info("collect: %d photos listed, %d in the table (%d downloaded now), skipped %s -> %s",
                summary["photos_listed"], len(rows), stats["downloaded"], summary["skipped"] or "none", out / "photos.csv")
    return summary


def _reason_key(reason: str) -> str:
    """Group reasons for counting: 'corrupt image (...)' -> 'corrupt image', 'download failed: ...' -> 'download failed'."""
    for prefix in ("corrupt image", "download failed"):
        if reason.startswith(prefix):
            return prefix
    return reason


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``nightset-collect`` options (shared by :func:`main` and ``pipeline.cli``)."""
    p.add_argument("--build", required=True, help="night-set build folder; writes <build>/collected/")
    p.add_argument("--bbox", required=True, nargs="+", metavar="BBOX",
                   help="the area, WGS84 degrees: 4 numbers, as --bbox=-122.52,37.70,-122.35,37.83 "
                        "or --bbox -122.52 37.70 -122.35 37.83")
    p.add_argument("--api-key", default=None, help=f"Flickr API key (default: ${ENV_KEY}; prefer the variable)")
    p.add_argument("--base-url", default=FLICKR_REST, help="REST endpoint (default %(default)s)")
    p.add_argument("--per-page", type=int, default=250, help="photos per page, 1..500 (default %(default)s)")
    p.add_argument("--max-photos", type=int, default=None, help="stop after this many images")
    p.add_argument("--min-taken", default=None, help="earliest taken date, YYYY-MM-DD[ HH:MM:SS] or unix time")
    p.add_argument("--max-taken", default=None, help="latest taken date")
    p.add_argument("--rate", type=float, default=1.0, help="API requests per second (default %(default)s; 0: no limit)")
    p.add_argument("--image-rate", type=float, default=None, help="image downloads per second (default: --rate)")
    p.add_argument("--retries", type=int, default=5, help="retries per request (default %(default)s)")
    p.add_argument("--min-accuracy", type=int, default=None, help="keep photos with Flickr accuracy >= N (1..16)")
    p.add_argument("--max-results-per-query", type=int, default=MAX_RESULTS_PER_QUERY,
                   help="Flickr's cap on one search's results; larger queries are split (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_args(a: argparse.Namespace) -> dict:
    """Run :func:`collect` from parsed :func:`add_arguments` options."""
    bbox = ",".join(a.bbox) if isinstance(a.bbox, (list, tuple)) else a.bbox
    return collect(bbox, a.build, api_key=a.api_key, base_url=a.base_url, per_page=a.per_page,
                   max_photos=a.max_photos, min_taken=a.min_taken, max_taken=a.max_taken, rate=a.rate,
                   retries=a.retries, min_accuracy=a.min_accuracy, max_results_per_query=a.max_results_per_query,
                   image_rate=a.image_rate, progress=not a.no_progress)


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="nightset-collect", description=__doc__.split("\n\n")[0]))
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from ..redact import install

    install()  # the request URLs urllib3 logs at DEBUG carry the api_key
    try:
        summary = run_args(a)
    except (ValueError, OSError, RuntimeError) as e:
        logger.error("%s", e)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "failed"}, indent=2, default=str))
    return 0


def _run(a):
    print(json.dumps({k: v for k, v in run_args(a).items() if k != "failed"}, indent=2, default=str))


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"nightset-collect": (add_arguments, _run)}


if __name__ == "__main__":
    raise SystemExit(main())
