"""Relabel tool: the HTTP API, the log replay, and the page end to end in headless Chromium."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pandas as pd
import pytest
import utm

from pipeline.datasets.index import index_dataset, read_table
from pipeline.nightset import relabel, relabel_log, relabel_server

from .conftest import make_dataset, textured_image

E0, N0 = 550000.0, 4180000.0  # make_dataset's first database image; the others every 10 m east


def latlon(east, north):
    return tuple(float(x) for x in utm.to_latlon(east, north, 10, "S"))


# photo_id -> (database image it shows, labelled position (east, north): wrong on purpose)
PHOTOS = {
    "p1": (2, (E0 + 48, N0 + 6)),   # db2 is the 6th nearest candidate (28.6 m)
    "p2": (9, (E0 + 10, N0 - 4)),   # coordinates will be entered
    "p3": (4, (E0 + 40, N0 + 1)),   # rejected
    "p4": (7, (E0 + 70, N0 + 30)),  # skipped
    "p5": (3, (E0 + 31, N0 + 1)),   # left unreviewed; db3 is 1 m away (a pick confirms)
    "p6": (1, (E0 + 10, N0)),       # keep=False in dedup.csv: not reviewed
}


@pytest.fixture
def setup(tmp_path):
    """A toy database (indexed) and a build folder with collected photos and dedup.csv."""
    root = make_dataset(tmp_path / "ds", n_db=12, n_q=1)
    index_dataset(root, tmp_path / "index", workers=2)
    build = tmp_path / "build"
    images = build / "collected" / "images"
    images.mkdir(parents=True)
    rows, dedup = [], []
    for pid, (i, (e, n)) in PHOTOS.items():
        img = (textured_image(i, (96, 128)).astype(np.float32) * 0.5).astype(np.uint8)
        cv2.imwrite(str(images / f"{pid}.jpg"), img[..., ::-1])
        lat, lon = latlon(e, n)
        rows.append({"photo_id": pid, "file": f"images/{pid}.jpg", "lat": lat, "lon": lon, "accuracy": 16})
        dedup.append({"photo_id": pid, "file": f"images/{pid}.jpg", "keep": pid != "p6", "duplicate_of": ""})
    pd.DataFrame(rows).to_csv(build / "collected" / "photos.csv", index=False)
    pd.DataFrame(dedup).to_csv(build / "dedup.csv", index=False)
    (build / "collected" / "secret.txt").write_text("SECRET-IN-PHOTOS")
    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE")
    db = read_table(tmp_path / "index" / "database.csv")
    return {"root": root, "table": tmp_path / "index" / "database.csv", "build": build, "db": db,
            "tmp": tmp_path}


def start(setup, **kw):
    b = setup["build"]
    server = relabel_server.serve(b / "dedup.csv", b / "collected", setup["root"], setup["table"], b,
                                  positions_csv=b / "collected" / "photos.csv", **kw)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(setup):
    s = start(setup)
    yield s
    stop(s)


def request(server, method, path, body=None, headers=None):
    """Raw HTTP (the path is sent exactly as given, no normalisation)."""
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    c.request(method, path, body=data, headers=headers or ({"Content-Type": "application/json"} if data else {}))
    r = c.getresponse()
    out = r.status, r.getheader("Content-Type"), r.read()
    c.close()
    return out


def post(server, body):
    status, _, data = request(server, "POST", "/api/decision", body)
    return status, json.loads(data)


def db_name(setup, i):
    return setup["db"].name.iloc[i]


def log_lines(setup):
    return [json.loads(x) for x in (setup["build"] / "relabel" / "log.jsonl").read_text().splitlines()]


def labels(setup):
    return pd.read_csv(setup["build"] / "relabel" / "labels.csv", dtype={"photo_id": str}).set_index("photo_id")


# ----------------------------------------------------------------------------- plain HTTP


def test_page_state_and_candidates(server, setup):
    status, ctype, body = request(server, "GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"<script>" in body
    assert server.url.startswith("http://127.0.0.1:")
    s = json.loads(request(server, "GET", "/api/state")[2])
    assert s["total"] == 5 and s["reviewed"] == 0 and s["next_unreviewed"] == 0  # p6 (keep=False) left out
    q = json.loads(request(server, "GET", "/api/query/0")[2])
    assert q["photo_id"] == "p1" and q["status"] == "unreviewed"
    d = [c["distance_m"] for c in q["candidates"]]
    assert len(d) == 6 and d == sorted(d)
    assert d[0] == pytest.approx(np.hypot(2, 6), abs=0.05)  # UTM metres to db5
    assert q["candidates"][5]["name"] == db_name(setup, 2)
    assert json.loads(request(server, "GET", "/api/query/0?k=20")[2])["candidates"].__len__() == 12
    status, ctype, body = request(server, "GET", q["url"])
    assert status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, ctype, body = request(server, "GET", q["candidates"][0]["url"])
    assert status == 200 and body == (setup["root"] / q["candidates"][0]["name"]).read_bytes()
    assert request(server, "GET", "/api/query/9")[0] == 400


def test_decisions_are_logged_and_replayed(server, setup):
    s, r = post(server, {"photo_id": "p5", "action": "pick", "db_name": db_name(setup, 3)})
    assert s == 200 and r["entry"]["action"] == "confirmed"  # nearest, 1 m away: label kept
    assert r["label"]["lat"] == pytest.approx(latlon(E0 + 31, N0 + 1)[0])
    s, r = post(server, {"photo_id": "p1", "action": "pick", "db_name": db_name(setup, 2)})
    assert s == 200 and r["entry"]["action"] == "moved" and r["entry"]["moved_m"] == pytest.approx(28.6, abs=0.1)
    assert r["next"] == 1  # p2, the next unreviewed after p1
    s, r = post(server, {"photo_id": "p2", "action": "enter", "lat": "37.7", "lon": -122.4})
    assert s == 200 and r["entry"]["action"] == "entered" and r["warning"]  # far from the database: warned
    s, r = post(server, {"photo_id": "p3", "action": "reject"})
    assert s == 200 and r["state"]["reviewed"] == 4 and r["next"] == 3
    # a later decision overrides an earlier one; a pick far away moves the label there
    s, r = post(server, {"photo_id": "p3", "action": "pick", "db_name": db_name(setup, 11)})
    assert s == 200 and r["entry"]["action"] == "moved"
    s, r = post(server, {"photo_id": "p4", "action": "skip"})
    assert s == 200 and r["next"] is None and r["state"]["counts"]["unreviewed"] == 0
    lines = log_lines(setup)
    assert [x["action"] for x in lines] == ["confirmed", "moved", "entered", "rejected", "moved", "skipped"]
    assert set(lines[0]) >= {"timestamp", "photo_id", "action", "old_lat", "old_lon", "new_lat", "new_lon", "db_name"}
    lab = labels(setup)
    assert list(lab.index) == ["p1", "p2", "p3", "p4", "p5"]
    assert lab.status.to_dict() == {"p1": "moved", "p2": "entered", "p3": "moved", "p4": "skipped", "p5": "confirmed"}
    db = setup["db"].set_index("name")
    assert (lab.loc["p1", "lat"], lab.loc["p1", "lon"]) == pytest.approx(tuple(db.loc[db_name(setup, 2), ["lat", "lon"]]))
    assert lab.loc["p1", "db_name"] == db_name(setup, 2)
    assert (lab.loc["p2", "lat"], lab.loc["p2", "lon"]) == (37.7, -122.4)
    assert lab.loc["p4", "lat"] == pytest.approx(latlon(E0 + 70, N0 + 30)[0])  # skipped: unchanged
    assert lab.loc["p1", "orig_lat"] == pytest.approx(latlon(E0 + 48, N0 + 6)[0])
    # labels.csv is exactly the replay of the log
    q = relabel_log.load_queries(setup["build"] / "dedup.csv", setup["build"] / "collected" / "photos.csv")
    decisions = relabel_log.replay(setup["build"] / "relabel" / "log.jsonl")
    again = relabel_log.labels_table(q, decisions).set_index("photo_id")
    pd.testing.assert_frame_equal(again[["lat", "lon", "status"]], lab[["lat", "lon", "status"]], check_exact=False)


@pytest.mark.parametrize("body, message", [
    ({"photo_id": "p2", "action": "enter", "lat": "abc", "lon": "1"}, "not a number"),
    ({"photo_id": "p2", "action": "enter", "lat": 95, "lon": 1}, "latitude 95 out of range"),
    ({"photo_id": "p2", "action": "enter", "lat": 37, "lon": 200}, "longitude 200 out of range"),
    ({"photo_id": "p2", "action": "enter", "lat": 37}, "longitude is missing"),
    ({"photo_id": "p2", "action": "enter", "lat": "NaN", "lon": 1}, "not a finite number"),
    ({"photo_id": "p2", "action": "enter", "lat": 88, "lon": 1}, "UTM range"),
    ({"photo_id": "nope", "action": "skip"}, "unknown photo_id"),
    ({"photo_id": "p2", "action": "pick", "db_name": "database/../x.jpg"}, "not an image of the database"),
    ({"photo_id": "p2", "action": "fly"}, "not one of"),
    (b"{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
])
def test_bad_decisions_are_refused(server, setup, body, message):
    status, r = post(server, body)
    assert status == 400 and message in r["error"], r
    assert not (setup["build"] / "relabel" / "log.jsonl").exists()  # nothing logged
    assert labels(setup).status.eq("unreviewed").all()


@pytest.mark.parametrize("path", [
    "/photo/../secret.txt", "/photo/../../secret.txt", "/photo/%2e%2e/%2e%2e/secret.txt",
    "/photo/images/..%2F..%2Fsecret.txt", "/photo/secret.txt", "/photo//etc/passwd", "/photo/%2Fetc%2Fpasswd",
    "/db/../../secret.txt", "/db/database/../../secret.txt", "/db/..%2F..%2Fsecret.txt", "/db/summary.json",
    "/photo/images/p1.jpg%00.txt", "/photo/images\\..\\..\\secret.txt",
])
def test_path_traversal_is_refused(server, path):
    status, _, body = request(server, "GET", path)
    assert status in (403, 404), (path, status)
    assert b"SECRET" not in body and b"root:" not in body


def test_cross_site_requests_are_refused(server, setup):
    body = json.dumps({"photo_id": "p1", "action": "reject"}).encode()
    status, _, data = request(server, "POST", "/api/decision", body, {"Content-Type": "text/plain"})
    assert status == 415 and b"application/json" in data  # a form/no-preflight POST from another site
    port = server.server_address[1]
    status, _, _ = request(server, "POST", "/api/decision", body,
                           {"Content-Type": "application/json", "Host": f"evil.example:{port}"})
    assert status == 421  # DNS rebinding
    assert request(server, "GET", "/api/state", headers={"Host": f"localhost:{port}"})[0] == 200
    assert not (setup["build"] / "relabel" / "log.jsonl").exists()


def test_truncated_log_line_is_ignored_and_cut_off(setup, caplog):
    log = setup["build"] / "relabel" / "log.jsonl"
    log.parent.mkdir(parents=True)
    good = [{"timestamp": "t", "photo_id": "p1", "action": "rejected", "new_lat": 1.0, "new_lon": 2.0, "db_name": ""},
            {"timestamp": "t", "photo_id": "p1", "action": "entered", "new_lat": 37.5, "new_lon": -122.0, "db_name": ""},
            {"timestamp": "t", "photo_id": "p3", "action": "skipped", "new_lat": 3.0, "new_lon": 4.0, "db_name": ""}]
    text = "".join(json.dumps(e) + "\n" for e in good)
    log.write_text(text + '{"timestamp": "t", "photo_id": "p2", "act')  # crash in the middle of an append
    with caplog.at_level(logging.WARNING):
        d = relabel_log.replay(log)
    assert "incomplete" in caplog.text and "line 4" in caplog.text
    assert d.set_index("photo_id").status.to_dict() == {"p1": "entered", "p3": "skipped"}  # later overrides
    assert d.set_index("photo_id").n_decisions.to_dict() == {"p1": 2, "p3": 1}
    server = start(setup)  # restart: resumes from the log, cuts the fragment off
    try:
        assert log.read_text() == text
        lab = labels(setup)
        assert lab.status.to_dict() == {"p1": "entered", "p2": "unreviewed", "p3": "skipped", "p4": "unreviewed",
                                        "p5": "unreviewed"}
        assert json.loads(request(server, "GET", "/api/state")[2])["next_unreviewed"] == 1
        assert post(server, {"photo_id": "p2", "action": "reject"})[0] == 200
    finally:
        stop(server)
    assert [json.loads(x)["photo_id"] for x in log.read_text().splitlines()] == ["p1", "p1", "p3", "p2"]
    log.write_text(text.replace('"p3"', '"p3', 1) + text)  # a bad line in the middle is an error
    with pytest.raises(relabel_log.RelabelError, match=r"log.jsonl: line 3"):
        relabel_log.replay(log)


def test_bad_inputs_name_the_file(setup, tmp_path):
    b = setup["build"]
    with pytest.raises(relabel_log.RelabelError, match="dedup.csv: no lat/lon"):
        relabel_log.load_queries(b / "dedup.csv")
    bad = tmp_path / "q.csv"
    pd.DataFrame({"photo_id": ["a"], "lat": [1.0], "lon": [2.0]}).to_csv(bad, index=False)
    with pytest.raises(relabel_log.RelabelError, match=r"q.csv: missing columns \['file'\]"):
        relabel_log.load_queries(bad)
    pd.DataFrame({"photo_id": ["a"], "file": ["a.jpg"], "lat": [100.0], "lon": [2.0]}).to_csv(bad, index=False)
    with pytest.raises(relabel_log.RelabelError, match="q.csv: 1 positions out of range"):
        relabel_log.load_queries(bad)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        relabel_log.load_queries(tmp_path / "missing.csv")
    q = relabel_log.load_queries(b / "dedup.csv", b / "collected" / "photos.csv")
    assert list(q.photo_id) == ["p1", "p2", "p3", "p4", "p5"] and q.lat.notna().all()


def test_main_replay_only(setup, capsys, caplog):
    b = setup["build"]
    base = ["--queries", str(b / "dedup.csv"), "--positions", str(b / "collected" / "photos.csv"),
            "--photos", str(b / "collected"), "--db-root", str(setup["root"]), "--build", str(b)]
    assert relabel.main(base + ["--db-table", str(setup["table"]), "--replay-only"]) == 0
    assert json.loads(capsys.readouterr().out) == {"unreviewed": 5}
    assert pd.read_csv(b / "relabel" / "labels.csv").columns.tolist() == relabel_log.LABEL_COLUMNS
    assert relabel.main(base + ["--db-table", str(setup["tmp"] / "nope.csv")]) == 1
    assert "nope.csv: index table not found" in caplog.text


# ----------------------------------------------------------------------------- browser

def find_browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium-headless-shell" if os.access("/usr/bin/chromium-headless-shell", os.X_OK) else None


class WebSocket:
    """A minimal RFC 6455 client (text frames, masked; enough for the DevTools protocol)."""

    def __init__(self, url: str, timeout: float = 30):
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str):
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self):
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page, flat session)."""

    def __init__(self, binary: str, tmp: Path):
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={tmp}", "--no-first-run", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # its own process group: close() ends the browser's children too
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stderr], daemon=True).start()
        deadline, url, seen = time.monotonic() + 30, None, []
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise RuntimeError(f"Chromium did not print its DevTools URL: {''.join(seen)[-2000:]}") from None
            seen.append(line)
            if "DevTools listening on " in line:
                url = line.split("DevTools listening on ", 1)[1].strip()
        self.ws = WebSocket(url)
        self.next_id, self.events = 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def call(self, method: str, params: dict | None = None, session: bool = False):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 15):
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            try:  # a page being navigated has no document yet
                value = self.eval(expression)
            except RuntimeError as e:
                value, error = None, e
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {expression} ({error}); page: "
                           f"{self.eval('document.body && document.body.innerText')!r:.500}")

    def goto(self, url: str):
        self.call("Page.navigate", {"url": url}, session=True)

    def key(self, key: str):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": key, "text": key if kind == "keyDown" else "",
                                                 "code": f"Key{key.upper()}"}, session=True)

    def errors(self) -> list:
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")]

    def close(self):
        if getattr(self, "ws", None):
            self.ws.close()
        # the binary may be a wrapper whose browser outlives it: signal the whole group
        import signal

        def group(sig):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

        group(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            group(signal.SIGKILL)
            self.proc.wait(10)
        group(signal.SIGKILL)  # stragglers of the group (zygote, renderers)


SHOWN = "!!document.body && document.body.dataset.ready === '1' && document.body.dataset.photo"
IMAGES_OK = """(() => { const imgs = [document.getElementById('query-img'), ...document.querySelectorAll('.candidate img')];
  return imgs.length > 1 && imgs.every(i => i.complete) && imgs.every(i => i.naturalWidth > 0) ? imgs.length : 0; })()"""


def test_review_in_headless_chromium(setup, tmp_path):
    binary = find_browser()
    if binary is None:
        pytest.skip("no Chromium binary found (chromium-headless-shell / chromium; CI installs chromium-headless-shell)")
    server = start(setup)
    browser = Browser(binary, tmp_path / "chrome-profile")
    try:
        browser.goto(server.url)
        assert browser.wait(SHOWN) == "p1"
        assert browser.wait(IMAGES_OK) == 7  # the query + 6 candidates, all decoded
        assert browser.eval("document.getElementById('progress').textContent") == "0 of 5 reviewed"
        metres = browser.eval("[...document.querySelectorAll('.candidate .metres')].map(e => e.textContent)")
        assert metres[0] == "6.3 m" and metres[5] == "28.6 m"
        # 1. click the right database image (the 6th candidate)
        name = db_name(setup, 2)
        browser.eval(f"document.querySelector('.candidate[data-name=\"{name}\"]').click()")
        assert browser.wait(SHOWN + " === 'p2' && 'p2'") == "p2"
        # 2. bad coordinates: refused with the server's message, the photo stays
        browser.eval("document.getElementById('lat').value = 'abc'; document.getElementById('lon').value = '2';"
                     "document.getElementById('enter-btn').click()")
        assert "not a number" in browser.wait("(m => m.className === 'error' && m.textContent)(document.getElementById('message'))")
        assert browser.eval("document.body.dataset.photo") == "p2"
        # ... then type a pasted "lat, lon" and submit
        lat2, lon2 = latlon(E0 + 92, N0 + 2)
        browser.eval("document.getElementById('lat').value = ''; document.getElementById('lon').value = '';"
                     "document.getElementById('lat').focus()")
        browser.call("Input.insertText", {"text": f"{lat2:.7f}, {lon2:.7f}"}, session=True)
        browser.eval("document.getElementById('enter-btn').click()")
        assert browser.wait(SHOWN + " === 'p3' && 'p3'") == "p3"
        # 3. reject with the keyboard shortcut, 4. skip with the button
        browser.key("x")
        assert browser.wait(SHOWN + " === 'p4' && 'p4'") == "p4"
        browser.eval("document.getElementById('skip-btn').click()")
        assert browser.wait(SHOWN + " === 'p5' && 'p5'") == "p5"
        assert browser.wait(IMAGES_OK)
        assert browser.eval("document.getElementById('progress').textContent") == "4 of 5 reviewed"
        assert browser.errors() == []
    finally:
        stop(server)
    try:
        lines = log_lines(setup)
        assert [(x["photo_id"], x["action"]) for x in lines] == [
            ("p1", "moved"), ("p2", "entered"), ("p3", "rejected"), ("p4", "skipped")]
        db = setup["db"].set_index("name")
        assert lines[0]["db_name"] == name
        assert (lines[0]["new_lat"], lines[0]["new_lon"]) == pytest.approx(tuple(db.loc[name, ["lat", "lon"]]))
        assert (lines[0]["old_lat"], lines[0]["old_lon"]) == pytest.approx(latlon(E0 + 48, N0 + 6))
        assert (lines[1]["new_lat"], lines[1]["new_lon"]) == pytest.approx((lat2, lon2), abs=1e-7)
        lab = labels(setup)
        assert lab.status.to_dict() == {"p1": "moved", "p2": "entered", "p3": "rejected", "p4": "skipped",
                                        "p5": "unreviewed"}
        assert (lab.loc["p1", "lat"], lab.loc["p1", "lon"]) == pytest.approx(tuple(db.loc[name, ["lat", "lon"]]))
        assert (lab.loc["p2", "lat"], lab.loc["p2", "lon"]) == pytest.approx((lat2, lon2), abs=1e-7)
        assert lab.loc["p3", "lat"] == pytest.approx(latlon(E0 + 40, N0 + 1)[0])
        before = (setup["build"] / "relabel" / "labels.csv").read_text()
        # restart: a new server on the same build resumes at the next unreviewed photo
        server = start(setup)
        try:
            browser.goto(server.url)
            assert browser.wait(SHOWN + " === 'p5' && 'p5'") == "p5"
            assert browser.eval("document.getElementById('progress').textContent") == "4 of 5 reviewed"
            assert browser.wait(IMAGES_OK)
            assert (setup["build"] / "relabel" / "labels.csv").read_text() == before
            # the last one: pick the nearest (1 m away) confirms it; then everything is reviewed
            browser.key("1")
            assert browser.wait("document.getElementById('done').style.display === 'block'")
            assert "5 of 5 reviewed" == browser.eval("document.getElementById('progress').textContent")
            assert browser.errors() == []
        finally:
            stop(server)
        assert labels(setup).loc["p5", "status"] == "confirmed"
    finally:
        browser.close()
