"""A mock Flickr server for tests: ``flickr.photos.search`` (JSON) and image URLs.

    from tests.nightset_mock import mock_flickr, make_photos, make_images

    photos = make_photos(20, bbox=(-122.45, 37.75, -122.40, 37.80))
    with mock_flickr(photos, make_images(photos)) as (base_url, state):
        collect(bbox, build, api_key="test", base_url=base_url, rate=0, sleep=lambda s: None)
        assert max(state.image_served.values()) == 1

The server listens on 127.0.0.1 (a free port) in a daemon thread. ``base_url`` is the
REST endpoint (``http://127.0.0.1:PORT/services/rest/``); images are served at
``state.image_url(photo_id)`` (``/img/<id>.jpg``), which each listed photo gets as its
``url_l`` unless its dict sets ``url_l`` (``None``: no ``url_l`` at all).

Photos: dicts with at least ``id``, ``latitude``, ``longitude``; optional ``accuracy``,
``datetaken`` ("YYYY-MM-DD HH:MM:SS"), ``owner``, ``ownername``, ``title``, ``license``,
``url_*``. Searches return the photos inside the request's bbox (inclusive) and taken-date
range, in list order, Flickr's way: ``{"photos": {"page", "pages", "perpage", "total",
"photo": [...]}, "stat": "ok"}`` with coordinates and accuracy as strings. Like Flickr, only
the first ``max_results`` results of a search are served (later pages are empty) while
``total`` counts them all. A photo with ``"_force": True`` is returned by every search
whatever its bbox (as Flickr's geo index sometimes returns neighbours); keys starting
with ``_`` are never sent. With ``api_key`` set, other keys get Flickr's error 100.

Faults (``faults`` dict, read at each request, so a test may change ``state.faults``):

- ``"api"``: a list applied to the 1st, 2nd, ... API request (later ones are normal). Items:
  ``None`` (normal), an HTTP status (``500``), ``{"status": 429, "headers": {...},
  "body": "..."}``, ``{"stat": "fail", "code": 100, "message": "..."}`` (HTTP 200, Flickr
  error reply), ``"drop"`` (close the connection without a reply), ``"html"`` (200, not JSON).
- ``"images"``: ``{photo_id: [item, ...]}`` applied to the 1st, 2nd, ... request of that
  image; items as above plus ``"truncate"`` (full Content-Length, half the body, then
  close) and ``"corrupt"`` (200 with garbage bytes).
- ``"die_after_api"`` / ``"die_after_images"``: after N good API replies / served images the
  server "dies": every later request has its connection dropped, until ``state.revive()``
  (which also clears these two faults).

``state`` counts: ``api_requests`` (the query parameters of every API request),
``api_served`` (Counter of ``(bbox, min_taken_date, max_taken_date, page)`` answered with
photos), ``image_requests`` / ``image_served`` (Counters by photo id).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import math
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

REST_PATH = "/services/rest/"


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 64), dark: bool = False) -> bytes:
    """A small random JPEG (``size`` = height, width); ``dark`` for a night-looking one."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    im = Image.fromarray(img).resize((w, h), Image.NEAREST)
    if dark:
        im = Image.fromarray((np.asarray(im) * 0.2).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_photos(n: int, bbox=(-122.45, 37.75, -122.40, 37.80), start_id: int = 1000, seed: int = 0,
                accuracy: int = 16, datetaken: str = "2020-01-01 21:00:00") -> list[dict]:
    """``n`` photo dicts at random positions strictly inside ``bbox`` (min_lon, min_lat, max_lon, max_lat),
    ids ``start_id``.. as strings, one minute apart from ``datetaken``."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = bbox
    t0 = dt.datetime.strptime(datetaken, "%Y-%m-%d %H:%M:%S")
    out = []
    for i in range(n):
        out.append({
            "id": str(start_id + i),
            "latitude": round(float(y0 + (y1 - y0) * rng.uniform(0.02, 0.98)), 6),
            "longitude": round(float(x0 + (x1 - x0) * rng.uniform(0.02, 0.98)), 6),
            "accuracy": accuracy,
            "datetaken": (t0 + dt.timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M:%S"),
        })
    return out


def make_images(photos: list[dict], size: tuple[int, int] = (48, 64), dark: bool = False) -> dict[str, bytes]:
    """A distinct JPEG for each photo id."""
    return {str(p["id"]): jpeg_bytes(int(p["id"]) if str(p["id"]).isdigit() else i, size, dark)
            for i, p in enumerate(photos)}


def _parse_date(v: str | None):
    if v in (None, ""):
        return None
    v = str(v)
    if v.replace(".", "").isdigit():
        return dt.datetime.fromtimestamp(float(v), dt.timezone.utc).replace(tzinfo=None)
    return dt.datetime.fromisoformat(v)


@dataclass
class MockState:
    photos: list[dict]
    images: dict[str, bytes]
    faults: dict
    max_results: int = 4000
    api_key: str | None = None
    base: str = ""
    dead: bool = False
    api_requests: list[dict] = field(default_factory=list)
    api_served: Counter = field(default_factory=Counter)
    image_requests: Counter = field(default_factory=Counter)
    image_served: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def image_url(self, photo_id) -> str:
        return f"{self.base}/img/{photo_id}.jpg"

    def revive(self) -> None:
        """Bring a "dead" server back (and clear the die_after_* faults)."""
        with self.lock:
            self.dead = False
            self.faults.pop("die_after_api", None)
            self.faults.pop("die_after_images", None)

    # ---- search
    def search(self, q: dict) -> dict:
        try:
            x0, y0, x1, y1 = (float(v) for v in q["bbox"].split(","))
        except (KeyError, ValueError):
            return {"stat": "fail", "code": 3, "message": "Parameterless searches have been disabled"}
        lo, hi = _parse_date(q.get("min_taken_date")), _parse_date(q.get("max_taken_date"))
        per_page = min(500, max(1, int(q.get("per_page", 100))))
        page = max(1, int(q.get("page", 1)))
        hits = []
        for p in self.photos:
            lat, lon = float(p["latitude"]), float(p["longitude"])
            inside = x0 <= lon <= x1 and y0 <= lat <= y1
            taken = _parse_date(p.get("datetaken"))
            in_time = (lo is None or (taken and taken >= lo)) and (hi is None or (taken and taken <= hi))
            if (inside or p.get("_force")) and in_time:
                hits.append(p)
        total = len(hits)
        served = hits[: self.max_results]
        chunk = served[(page - 1) * per_page: page * per_page]
        return {"photos": {"page": page, "pages": math.ceil(total / per_page), "perpage": per_page,
                           "total": total, "photo": [self._record(p) for p in chunk]}, "stat": "ok"}

    def _record(self, p: dict) -> dict:
        pid = str(p["id"])
        r = {"id": pid, "owner": f"{int(pid) % 97 if pid.isdigit() else 1}@N00", "secret": "abc123",
             "server": "65535", "farm": 66, "title": f"photo {pid}", "ispublic": 1, "isfriend": 0,
             "isfamily": 0, "license": "4", "datetaken": "2020-01-01 21:00:00", "datetakengranularity": 0,
             "datetakenunknown": "0", "ownername": f"user {pid}", "accuracy": "16", "context": 0,
             "place_id": "", "woeid": "", "geo_is_public": 1, "url_l": self.image_url(pid),
             "height_l": 768, "width_l": 1024}
        for k, v in p.items():
            if not k.startswith("_"):
                r[k] = v
        for k in ("latitude", "longitude", "accuracy"):
            if r.get(k) is not None:
                r[k] = str(r[k])
        return {k: v for k, v in r.items() if v is not None}


class _Handler(BaseHTTPRequestHandler):
    server_version = "MockFlickr/1.0"
    state: MockState  # set on the subclass

    def log_message(self, *args):  # quiet
        pass

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _fault(self, item, kind: str) -> bool:
        """Apply a fault item; True if the request has been answered."""
        if item is None:
            return False
        if item == "drop":
            self._drop()
        elif item == "html":
            self._send(200, b"<html>Service temporarily unavailable</html>", "text/html")
        elif isinstance(item, int):
            self._send(item, f"error {item}".encode(), "text/plain")
        elif isinstance(item, dict) and item.get("stat") == "fail":
            body = {"stat": "fail", "code": item.get("code", 105), "message": item.get("message", "error")}
            self._send(200, json.dumps(body).encode())
        elif isinstance(item, dict):
            self._send(int(item.get("status", 500)), str(item.get("body", "")).encode(), "text/plain",
                       item.get("headers"))
        else:
            return False  # image-only items are handled by the caller
        return True

    def do_GET(self):
        st = self.state
        url = urlsplit(self.path)
        with st.lock:
            dead = st.dead
        if dead:
            return self._drop()
        if url.path.rstrip("/") == REST_PATH.rstrip("/"):
            return self._api({k: v[-1] for k, v in parse_qs(url.query).items()})
        if url.path.startswith("/img/") and url.path.endswith(".jpg"):
            return self._image(url.path[len("/img/"):-len(".jpg")])
        self._send(404, b"not found", "text/plain")

    def _api(self, q: dict):
        st = self.state
        with st.lock:
            n = len(st.api_requests)
            st.api_requests.append(q)
            faults = st.faults.get("api") or []
            item = faults[n] if n < len(faults) else None
        if self._fault(item, "api"):
            return
        if q.get("method") != "flickr.photos.search":
            return self._send(200, json.dumps({"stat": "fail", "code": 112,
                                               "message": f"Method \"{q.get('method')}\" not found"}).encode())
        if st.api_key is not None and q.get("api_key") != st.api_key:
            return self._send(200, json.dumps({"stat": "fail", "code": 100,
                                               "message": "Invalid API Key (Key has invalid format)"}).encode())
        if q.get("format") != "json" or q.get("nojsoncallback") != "1":
            return self._send(200, b"<rsp stat=\"ok\"></rsp>", "text/xml")
        reply = st.search(q)
        self._send(200, json.dumps(reply).encode())
        with st.lock:
            if reply.get("stat") == "ok":
                st.api_served[(q.get("bbox"), q.get("min_taken_date"), q.get("max_taken_date"),
                               int(q.get("page", 1)))] += 1
            limit = st.faults.get("die_after_api")
            if limit is not None and sum(st.api_served.values()) >= limit:
                st.dead = True

    def _image(self, pid: str):
        st = self.state
        with st.lock:
            n = st.image_requests[pid]
            st.image_requests[pid] += 1
            faults = (st.faults.get("images") or {}).get(pid) or []
            item = faults[n] if n < len(faults) else None
            data = st.images.get(pid)
        if self._fault(item, "image"):
            return
        if data is None:
            return self._send(404, b"not found", "text/plain")
        if item == "truncate":
            self._send(200, data[: len(data) // 2], "image/jpeg", length=len(data))
            return self._drop()
        if item == "corrupt":
            return self._send(200, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "image/jpeg")
        self._send(200, data, "image/jpeg")
        with st.lock:
            st.image_served[pid] += 1
            limit = st.faults.get("die_after_images")
            if limit is not None and sum(st.image_served.values()) >= limit:
                st.dead = True


@contextlib.contextmanager
def mock_flickr(photos: list[dict], images: dict[str, bytes], faults: dict | None = None, *,
                max_results: int = 4000, api_key: str | None = None) -> Iterator[tuple[str, MockState]]:
    """Serve a mock Flickr on 127.0.0.1 (free port) in a thread; yield ``(base_url, state)``."""
    state = MockState(list(photos), {str(k): v for k, v in images.items()}, faults if faults is not None else {},
                      max_results=max_results, api_key=api_key)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state.base + REST_PATH, state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
