"""Relabel's local HTTP server and its page (HTML/JS, embedded).

:func:`serve` loads the inputs and binds a :class:`RelabelServer` over a
:class:`~pipeline.nightset.relabel_log.Relabeller` (the review state and the decision
log, in :mod:`pipeline.nightset.relabel_log`). Endpoints: ``/`` the page, ``/api/state``,
``/api/query/<index>``, ``POST /api/decision`` (JSON only), ``/photo/<file>`` and
``/db/<name>``.

Images are served only from the two configured folders and only under names listed in
the query table (``file``) or the database table (``name``); anything else, ``..``
included, is refused. Bound to a loopback address, the server answers only requests
naming it in ``Host`` (no DNS rebinding).
"""

from __future__ import annotations

import json
import logging
import mimetypes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .relabel_log import (
    CONFIRM_M,
    DecisionError,
    RelabelError,
    Relabeller,
    _safe_rel,
    load_database,
    load_queries,
)

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


# ----------------------------------------------------------------------------- HTTP


class RelabelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, relabeller: Relabeller):
        self.relabeller = relabeller
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: RelabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: the decisions are logged by the relabeller
        logger.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str):
        self.close_connection = True  # a request body may be left unread
        self._json(status, {"ok": False, "error": message})

    def _host_ok(self) -> bool:
        """Bound to a loopback address, answer only requests naming it (no DNS rebinding)."""
        host, port = self.server.server_address[:2]
        if host not in ("127.0.0.1", "::1", "localhost"):
            return True
        allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        if self.headers.get("Host", "") in allowed:
            return True
        self._error(421, f"Host {self.headers.get('Host')!r} not served (use {self.server.url})")
        return False

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        rel: Relabeller = self.server.relabeller
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        path, qs = url.path, parse_qs(url.query)
        try:
            if path in ("/", "/index.html"):
                return self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
            if path == "/api/state":
                with rel._lock:
                    return self._json(200, rel.state(int(qs.get("after", ["-1"])[0])))
            if path.startswith("/api/query/"):
                k = int(qs["k"][0]) if "k" in qs else None
                return self._json(200, rel.query(int(path[len("/api/query/"):]), k))
            for kind in ("photo", "db"):
                prefix = f"/{kind}/"
                if path.startswith(prefix):
                    name = unquote(path[len(prefix):])
                    if not _safe_rel(name):
                        return self._error(403, f"refused path {name!r}")
                    f = rel.file_for(kind, name)
                    if f is None:
                        return self._error(404, f"{kind} {name!r} is not in the tables")
                    try:
                        data = f.read_bytes()
                    except OSError as e:
                        return self._error(404, f"{name}: cannot read ({e.strerror})")
                    ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                    return self._send(200, data, ctype, cache="max-age=600")
            return self._error(404, f"no such page {path!r}")
        except (DecisionError, ValueError) as e:
            return self._error(400, str(e))

    def do_POST(self):
        rel: Relabeller = self.server.relabeller
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/decision":
            return self._error(404, f"no such endpoint {self.path!r}")
        # JSON only: another web site cannot send that cross-origin without a CORS preflight,
        # which this server never grants
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            return self._error(415, "Content-Type must be application/json")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "Content-Length required")
        if not 0 < n <= MAX_BODY:
            return self._error(413 if n > MAX_BODY else 400, f"body of {n} bytes (1 to {MAX_BODY} accepted)")
        raw = self.rfile.read(n)
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(400, f"the body is not valid JSON ({e})")
        try:
            result = rel.decide(payload)
        except DecisionError as e:
            return self._error(400, str(e))
        except (OSError, RelabelError) as e:  # the log could not be written: the decision is not saved
            logger.error("decision not saved: %s", e)
            return self._error(500, f"decision NOT saved: {e}")
        return self._json(200, result)


def serve(queries_csv, photos_dir, db_root, db_table, build_dir, host: str = "127.0.0.1", port: int = 0,
          n_candidates: int = 6, positions_csv=None, confirm_m: float = CONFIRM_M) -> RelabelServer:
    """Load the inputs, replay the log, bind the server (not yet serving: call
    ``serve_forever()``, e.g. in a thread; ``shutdown()`` and ``server_close()`` stop it).
    ``port=0`` picks a free port; the URL is ``server.url``."""
    queries = load_queries(queries_csv, positions_csv)
    db, zone = load_database(db_table)
    rel = Relabeller(queries, photos_dir, db, zone, db_root, build_dir, n_candidates, confirm_m)
    server = RelabelServer((host, int(port)), rel)
    return server


# ----------------------------------------------------------------------------- page
# Embedded (not a package-data file) so an installed package always has it.

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Relabel night photos</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{margin:0;font:14px system-ui,sans-serif;background:#15171a;color:#ddd}
 header{display:flex;gap:1.5em;align-items:center;padding:.5em 1em;background:#22252a;flex-wrap:wrap}
 header b{color:#fff} button{font:inherit;padding:.3em .8em;cursor:pointer;border-radius:4px;border:1px solid #555;
 background:#333;color:#eee} button:hover{background:#444} input{font:inherit;width:9em;background:#111;color:#eee;
 border:1px solid #555;padding:.25em} main{display:flex;gap:1em;padding:1em}
 #left{flex:0 0 42%} #query-img{width:100%;max-height:70vh;object-fit:contain;display:block;background:#000}
 #grid{flex:1;display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.6em;align-content:start}
 .candidate{background:#22252a;border:2px solid transparent;border-radius:4px;padding:4px;cursor:pointer}
 .candidate:hover{border-color:#6af} .candidate.chosen{border-color:#4c4} .candidate img{width:100%;display:block}
 .candidate .dist{display:flex;justify-content:space-between;font-size:13px;padding-top:2px}
 .key{color:#fc6;font-weight:bold} #message{min-height:1.3em;padding:0 1em;color:#f88} #message.ok{color:#8c8}
 #message.warn{color:#fc6} .status{padding:.1em .5em;border-radius:3px;background:#444}
 #done{padding:2em;display:none} .help{color:#999;font-size:12px} a{color:#8bf}
</style></head>
<body>
<header>
 <span id="progress">…</span><span id="position"></span>
 <span>Flickr id <b id="photo-id"></b> <span id="query-status" class="status"></span></span>
 <span id="query-label"></span>
 <span><button id="prev-btn" title="←">◀</button> <button id="next-btn" title="→">▶</button>
 <button id="next-unreviewed-btn" title="n">next unreviewed</button></span>
</header>
<div id="message"></div>
<main id="review">
 <div id="left">
  <img id="query-img" alt="query photo">
  <p><button id="skip-btn">skip <span class="key">s</span></button>
     <button id="reject-btn">reject <span class="key">x</span></button></p>
  <form id="enter-form"><label>lat <input id="lat" placeholder="37.7749" autocomplete="off"></label>
   <label>lon <input id="lon" placeholder="-122.4194" autocomplete="off"></label>
   <button id="enter-btn" type="submit">set position <span class="key">↵</span></button></form>
  <p class="help">click the database image showing the same place (or press its number) to move the label
   there; <span class="key">e</span> coordinates (a pasted "lat, lon" is split), <span class="key">m</span> more
   candidates, <span class="key">n</span> next unreviewed, <span class="key">←→</span> browse.
   <a id="map-link" target="_blank" rel="noopener">map</a></p>
 </div>
 <div id="grid"></div>
</main>
<div id="done"><h2>Every photo has been reviewed.</h2><p id="done-counts"></p>
 <p>Browse with ◀ ▶ to change a decision; labels.csv is up to date.</p></div>
<script>
"use strict";
let cur = null, total = 0, k = 0;
const $ = id => document.getElementById(id);
function msg(text, cls) { const m = $("message"); m.textContent = text || ""; m.className = cls || ""; }
async function api(url, body) {
  const opt = body ? {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)} : {};
  const r = await fetch(url, opt);
  let data; try { data = await r.json(); } catch (e) { data = {error: "bad reply (" + r.status + ")"}; }
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}
function fmt(x) { return x === null || x === undefined ? "–" : x.toFixed(6); }
function progress(s) {
  total = s.total;
  $("progress").textContent = s.reviewed + " of " + s.total + " reviewed";
  $("progress").dataset.reviewed = s.reviewed;
}
function showDone(s) {
  cur = null; document.body.dataset.photo = "";
  $("review").style.display = "none"; $("done").style.display = "block";
  $("done-counts").textContent = Object.entries(s.counts).map(([a, n]) => a + ": " + n).join(", ");
  progress(s); document.body.dataset.ready = "1";
}
async function show(i, kk) {
  document.body.dataset.ready = "0";
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  k = kk || 0;
  const q = await api("/api/query/" + i + (k ? "?k=" + k : ""));
  cur = q; k = q.candidates.length;
  $("review").style.display = "flex"; $("done").style.display = "none";
  progress(q.state);
  $("position").textContent = "#" + (q.index + 1) + " / " + q.state.total;
  $("photo-id").textContent = q.photo_id; document.body.dataset.photo = q.photo_id;
  $("query-status").textContent = q.status + (q.db_name ? " → " + q.db_name.split("/").pop() : "");
  $("query-status").dataset.status = q.status;
  $("query-label").textContent = fmt(q.lat) + ", " + fmt(q.lon);
  $("map-link").href = q.lat === null ? "#" : "https://www.openstreetmap.org/?mlat=" + q.lat + "&mlon=" + q.lon + "#map=19/" + q.lat + "/" + q.lon;
  $("query-img").src = q.url; $("query-img").title = q.file;
  $("lat").value = ""; $("lon").value = "";
  const g = $("grid"); g.textContent = "";
  if (!q.candidates.length) g.textContent = "no position: enter coordinates";
  q.candidates.forEach((c, j) => {
    const d = document.createElement("div");
    d.className = "candidate" + (c.name === q.db_name ? " chosen" : "");
    d.dataset.name = c.name; d.dataset.rank = c.rank; d.title = c.name;
    const img = document.createElement("img"); img.src = c.url; img.alt = c.name; img.loading = "eager";
    const cap = document.createElement("div"); cap.className = "dist";
    const key = document.createElement("span"); key.className = "key"; key.textContent = j < 9 ? String(j + 1) : "";
    const m = document.createElement("span"); m.className = "metres"; m.textContent = c.distance_m.toFixed(1) + " m";
    cap.append(key, m); d.append(img, cap);
    d.addEventListener("click", () => decide({action: "pick", db_name: c.name}));
    g.append(d);
  });
  history.replaceState(null, "", "#" + q.index);
  document.body.dataset.ready = "1";
}
async function goNext(after) {
  const s = await api("/api/state?after=" + after);
  if (s.next_unreviewed === null) showDone(s); else await show(s.next_unreviewed);
}
async function decide(d) {
  if (!cur) return;
  d.photo_id = cur.photo_id;
  try {
    const r = await api("/api/decision", d);
    msg(cur.photo_id + ": " + r.entry.action + (r.entry.db_name ? " → " + r.entry.db_name.split("/").pop() : "") +
        (r.warning ? " — " + r.warning : ""), r.warning ? "warn" : "ok");
    if (r.next === null) showDone(r.state); else await show(r.next);
  } catch (e) { msg(e.message, "error"); }
}
function enterCoords() {
  let lat = $("lat").value.trim(), lon = $("lon").value.trim();
  if (lat.includes(",") && !lon) { [lat, lon] = lat.split(",", 2).map(s => s.trim()); }
  decide({action: "enter", lat: lat, lon: lon});
}
$("enter-form").addEventListener("submit", e => { e.preventDefault(); enterCoords(); });
$("skip-btn").onclick = () => decide({action: "skip"});
$("reject-btn").onclick = () => decide({action: "reject"});
$("prev-btn").onclick = () => show(cur ? (cur.index - 1 + total) % total : total - 1).catch(e => msg(e.message, "error"));
$("next-btn").onclick = () => show(cur ? (cur.index + 1) % total : 0).catch(e => msg(e.message, "error"));
$("next-unreviewed-btn").onclick = () => goNext(cur ? cur.index : -1).catch(e => msg(e.message, "error"));
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") { if (e.key === "Escape") e.target.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= 9 && cur && cur.candidates[n - 1]) decide({action: "pick", db_name: cur.candidates[n - 1].name});
  else if (e.key === "s") decide({action: "skip"});
  else if (e.key === "x") decide({action: "reject"});
  else if (e.key === "e") { e.preventDefault(); $("lat").focus(); }
  else if (e.key === "m" && cur) show(cur.index, k * 2);
  else if (e.key === "n") $("next-unreviewed-btn").click();
  else if (e.key === "ArrowLeft") $("prev-btn").click();
  else if (e.key === "ArrowRight") $("next-btn").click();
});
(async () => {
  try {
    const h = parseInt(location.hash.slice(1), 10);
    const s = await api("/api/state");
    total = s.total;
    if (h >= 0 && h < s.total) await show(h); else await goNext(-1);
  } catch (e) { msg(e.message, "error"); }
})();
</script>
</body></html>
"""
