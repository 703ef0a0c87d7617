"""The Flickr REST client of the collect stage: rate limiting, retries, searches, URLs.

:class:`FlickrClient` calls ``flickr.photos.search`` and downloads images (each checked to
decode); :class:`Query` is one search (a bbox and a taken-date range) and splits itself
when a search exceeds Flickr's result cap; :func:`photo_url` builds the image URL of a
listed photo; :func:`parse_bbox` and :func:`parse_taken` check the arguments in Flickr's
formats. The stage that uses them (listing with resume, downloads, photos.csv) and its
CLI are in :mod:`pipeline.nightset.collect`.

Flickr limits, as documented: a search returns at most the first 4,000 results of a
query (``max_results_per_query``), so a query whose ``total`` is larger is split into
four quadrants of its bbox (recursively), and a bbox too small to split (< ~10 m) into two
halves of its taken-date range; ``per_page`` is at most 500; an API key should stay under
3,600 queries an hour (``rate``, requests per second; 1/s by default). Flickr truncates
coordinates to 6 decimals, so split lines are rounded to 6 decimals.

Errors: HTTP 429 waits for ``Retry-After`` (or backs off exponentially); 5xx, dropped
connections, non-JSON replies, truncated downloads and Flickr errors 105 / "rate limit"
are retried ``retries`` times with exponential backoff. Any other ``stat: fail`` reply
raises :class:`FlickrError` naming the code and message. An image that cannot be
downloaded or does not decode raises ``_Permanent`` (or ``_Transient`` once the retries
are spent); the stage skips and lists it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import io
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import requests
from PIL import Image

logger = logging.getLogger(__name__)

FLICKR_REST = "https://www.flickr.com/services/rest/"  # the documented REST endpoint
STATIC_BASE = "https://live.staticflickr.com"  # photo source URLs, when no url_* extra is given
SEARCH_METHOD = "flickr.photos.search"
EXTRAS = "geo,date_taken,url_o,url_l,url_c,owner_name,license"
IMAGE_SIZES = ("url_l", "url_c", "url_o")  # preferred image size first: large (1024 px), 800 px, original
MAX_RESULTS_PER_QUERY = 4000  # Flickr returns at most the first 4,000 results of a search
MAX_PER_PAGE = 500
MIN_SPLIT_DEG = 1e-4  # smallest bbox side that is still split (~10 m)
MIN_SPLIT_SECONDS = 3600  # smallest taken-date range that is still split
DATE_FLOOR = "1800-01-01 00:00:00"  # taken-date range used to split a query that had none
ENV_KEY = "FLICKR_API_KEY"
_KEEP_FIELDS = ("id", "owner", "ownername", "title", "latitude", "longitude", "accuracy", "datetaken",
                "license", "server", "secret", "url_o", "url_l", "url_c")
_RETRYABLE_CODES = {105}  # "Service currently unavailable"
_DATE_FMT = "%Y-%m-%d %H:%M:%S"


class FlickrError(RuntimeError):
    """A ``stat: fail`` reply of the Flickr API (``code``, ``message``), or no usable reply
    after all retries (``code`` None)."""

    def __init__(self, code, message: str, method: str = SEARCH_METHOD):
        self.code, self.message = _int(code) if _int(code) is not None else code, message
        text = f"error {code}: {message}" if code is not None else message
        super().__init__(f"Flickr API {method}: {text}")


class _Transient(Exception):
    def __init__(self, msg: str, wait: float | None = None):
        super().__init__(msg)
        self.wait = wait


class _Permanent(Exception):
    pass


# ----------------------------------------------------------------------------- inputs


def parse_bbox(bbox) -> tuple[float, float, float, float]:
    """``"min_lon,min_lat,max_lon,max_lat"`` or 4 numbers -> a checked tuple."""
    vals = bbox.split(",") if isinstance(bbox, str) else list(bbox)
    try:
        b = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise ValueError(f"bbox {bbox!r}: expected 4 numbers min_lon,min_lat,max_lon,max_lat") from None
    if len(b) != 4 or not all(math.isfinite(v) for v in b):
        raise ValueError(f"bbox {bbox!r}: expected 4 numbers min_lon,min_lat,max_lon,max_lat")
    lo_x, lo_y, hi_x, hi_y = b
    if not (-180 <= lo_x < hi_x <= 180 and -90 <= lo_y < hi_y <= 90):
        raise ValueError(f"bbox {bbox!r}: need -180 <= min_lon < max_lon <= 180 and -90 <= min_lat < max_lat <= 90 "
                         "(order: min_lon,min_lat,max_lon,max_lat)")
    return tuple(round(v, 6) for v in b)


def parse_taken(value, name: str) -> str | None:
    """A taken date (``YYYY-MM-DD[ HH:MM:SS]`` or a unix timestamp) -> MySQL datetime text."""
    if value is None or value == "":
        return None
    s = str(value).strip()
    try:
        if re.fullmatch(r"-?\d+(\.\d+)?", s) and len(s) > 8:
            d = dt.datetime.fromtimestamp(float(s), dt.timezone.utc).replace(tzinfo=None)
        else:
            d = dt.datetime.fromisoformat(s.replace("T", " "))
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"{name} {value!r}: expected YYYY-MM-DD, 'YYYY-MM-DD HH:MM:SS' or a unix timestamp") from None
    return d.replace(tzinfo=None, microsecond=0).strftime(_DATE_FMT)


def _api_key(api_key: str | None) -> str:
    key = api_key or os.environ.get(ENV_KEY, "")
    if not key.strip():
        raise ValueError(f"no Flickr API key: set the environment variable {ENV_KEY} (or pass api_key / --api-key); "
                         "get a key at https://www.flickr.com/services/apps/create/")
    return key.strip()


# ----------------------------------------------------------------------------- HTTP


class RateLimiter:
    """At most ``rate`` calls of :meth:`wait` per second (``rate`` None or <= 0: no limit)."""

    def __init__(self, rate: float | None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self.sleep, self.clock = sleep, clock
        self.next = -math.inf

    def wait(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        t = max(now, self.next)
        if t > now:
            self.sleep(t - now)
        self.next = t + self.interval


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_seconds(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff: base * 2**attempt, at most ``cap``."""
    return min(cap, base * 2.0 ** attempt)


class FlickrClient:
    """Rate-limited, retrying access to the REST API and to image URLs."""

    def __init__(self, api_key: str, base_url: str = FLICKR_REST, session: requests.Session | None = None,
                 rate: float | None = 1.0, image_rate: float | None = None, retries: int = 5,
                 sleep: Callable[[float], None] = time.sleep, timeout=(15, 60), max_wait: float = 600.0):
        self.api_key, self.base_url = api_key, base_url
        self.session = session if session is not None else requests.Session()
        self._own_session = session is None
        if self._own_session:
            self.session.headers["User-Agent"] = "vg-rerank-pipeline nightset-collect (python-requests)"
        self.retries, self.sleep, self.timeout, self.max_wait = max(0, int(retries)), sleep, timeout, max_wait
        self.api_limiter = RateLimiter(rate, sleep)
        self.image_limiter = RateLimiter(rate if image_rate is None else image_rate, sleep)

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def _redact(self, text) -> str:
        return str(text).replace(self.api_key, "***") if self.api_key else str(text)

    def _get(self, url: str, params: dict | None, limiter: RateLimiter) -> requests.Response:
        """One GET; 429 / 5xx / connection errors -> _Transient, other non-200 -> _Permanent."""
        limiter.wait()
        try:
            r = self.session.get(url, params=params, timeout=self.timeout)
            if r.status_code == 200:
                _ = r.content  # read the body now, so a dropped connection is a transient error here
                return r
        except requests.RequestException as e:
            raise _Transient(f"{type(e).__name__}: {self._redact(e)}") from None
        wait = retry_after_seconds(r.headers.get("Retry-After"))
        r.close()
        if r.status_code == 429 or r.status_code >= 500:
            raise _Transient(f"HTTP {r.status_code}", wait)
        raise _Permanent(f"HTTP {r.status_code}")

    def _pause(self, attempt: int, err: _Transient, what: str) -> None:
        wait = min(self.max_wait, err.wait if err.wait is not None else backoff_seconds(attempt))
        logger.warning("%s: %s; retry %d/%d in %.1f s", what, err, attempt + 1, self.retries, wait)
        self.sleep(wait)

    def search(self, **params) -> dict:
        """One ``flickr.photos.search`` call -> the reply's ``photos`` object."""
        query = {"method": SEARCH_METHOD, "api_key": self.api_key, "format": "json", "nojsoncallback": 1, **params}
        what = f"{SEARCH_METHOD} bbox={params.get('bbox')} page={params.get('page')}"
        for attempt in range(self.retries + 1):
            try:
                try:
                    r = self._get(self.base_url, query, self.api_limiter)
                except _Permanent as e:
                    raise FlickrError(None, f"the endpoint {self.base_url} answered {e}") from None
                try:
                    reply = r.json()
                except ValueError:
                    raise _Transient(f"reply is not JSON: {r.text[:80]!r}") from None
                if not isinstance(reply, dict):
                    raise _Transient(f"unexpected reply {str(reply)[:80]!r}")
                if reply.get("stat") == "ok" and isinstance(reply.get("photos"), dict):
                    return reply["photos"]
                code, message = reply.get("code"), str(reply.get("message", reply))[:300]
                if _int(code) in _RETRYABLE_CODES or "rate limit" in message.lower():
                    raise _Transient(f"Flickr error {code}: {message}")
                raise FlickrError(code, self._redact(message))
            except _Transient as e:
                if attempt == self.retries:
                    raise FlickrError(None, f"bbox={params.get('bbox')} page={params.get('page')}: gave up after "
                                            f"{self.retries + 1} tries, last: {e}; run again to resume") from None
                self._pause(attempt, e, what)
        raise AssertionError("unreachable")

    def image(self, url: str) -> bytes:
        """Download and check one image -> its JPEG bytes; raises _Permanent / _Transient."""
        corrupt = 0
        for attempt in range(self.retries + 1):
            try:
                r = self._get(url, None, self.image_limiter)
                data = r.content
                expected = _int(r.headers.get("Content-Length"))
                if expected is not None and len(data) < expected:
                    raise _Transient(f"truncated download ({len(data)} of {expected} bytes)")
                try:
                    return _checked_jpeg(data)
                except _Permanent:
                    corrupt += 1  # a truncated body without Content-Length looks the same: retry once
                    if corrupt > 1 or attempt == self.retries:
                        raise
                    raise _Transient("image does not decode") from None
            except _Transient as e:
                if attempt == self.retries:
                    raise
                self._pause(attempt, e, f"image {url}")
        raise AssertionError("unreachable")


def _checked_jpeg(data: bytes) -> bytes:
    """``data`` if it is a decodable JPEG, else re-encoded as JPEG; _Permanent if it does not decode."""
    if not data:
        raise _Permanent("corrupt image (empty)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "JPEG":
                return data
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=95)
            return buf.getvalue()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise _Permanent(f"corrupt image ({type(e).__name__}: {str(e)[:80]})") from None


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(float(v))
        except (TypeError, ValueError, OverflowError):
            return None


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ----------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    """One search: a bbox and an optional taken-date range (MySQL datetimes, inclusive)."""

    bbox: tuple[float, float, float, float]
    min_taken: str | None = None
    max_taken: str | None = None

    @property
    def bbox_param(self) -> str:
        return ",".join(f"{v:.6f}" for v in self.bbox)

    @property
    def key(self) -> str:
        return f"{self.bbox_param}|{self.min_taken or ''}|{self.max_taken or ''}"

    def params(self) -> dict:
        p = {"bbox": self.bbox_param, "has_geo": 1, "extras": EXTRAS}
        if self.min_taken:
            p["min_taken_date"] = self.min_taken
        if self.max_taken:
            p["max_taken_date"] = self.max_taken
        return p

    def split(self) -> list[Query]:
        """Quadrants of the bbox (halves along a side too small to split), else halves of the
        taken-date range; [] when neither can be split further."""
        x0, y0, x1, y1 = self.bbox
        xs = [x0, x1] if x1 - x0 < 2 * MIN_SPLIT_DEG else [x0, round((x0 + x1) / 2, 6), x1]
        ys = [y0, y1] if y1 - y0 < 2 * MIN_SPLIT_DEG else [y0, round((y0 + y1) / 2, 6), y1]
        if len(xs) + len(ys) > 4:
            return [Query((xs[i], ys[j], xs[i + 1], ys[j + 1]), self.min_taken, self.max_taken)
                    for j in range(len(ys) - 1) for i in range(len(xs) - 1)]
        lo = dt.datetime.strptime(self.min_taken or DATE_FLOOR, _DATE_FMT)
        hi = (dt.datetime.strptime(self.max_taken, _DATE_FMT) if self.max_taken
              else dt.datetime.now().replace(microsecond=0) + dt.timedelta(days=1))
        if (hi - lo).total_seconds() < 2 * MIN_SPLIT_SECONDS:
            return []
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        return [Query(self.bbox, lo.strftime(_DATE_FMT), mid.strftime(_DATE_FMT)),
                Query(self.bbox, (mid + dt.timedelta(seconds=1)).strftime(_DATE_FMT), hi.strftime(_DATE_FMT))]


# ----------------------------------------------------------------------------- replies


def photo_url(photo: dict, sizes: Sequence[str] = IMAGE_SIZES) -> str | None:
    """The image URL to download: the first available ``url_*`` extra, else the 1024 px
    photo source URL built from server/secret."""
    for s in sizes:
        if photo.get(s):
            return str(photo[s])
    if photo.get("server") and photo.get("secret"):
        return f"{STATIC_BASE}/{photo['server']}/{photo['id']}_{photo['secret']}_b.jpg"
    return None


def _page_photos(reply: dict) -> list[dict]:
    photos = reply.get("photo") or []
    if not isinstance(photos, list):
        raise FlickrError(None, f"unexpected reply: 'photos.photo' is {type(photos).__name__}, not a list")
    return [{k: p[k] for k in _KEEP_FIELDS if k in p} for p in photos if isinstance(p, dict) and "id" in p]
