"""A local HTTP server on 127.0.0.1 standing in for release hosts (no test needs the network).

``serve(routes)`` serves ``routes``: path -> :class:`Route` (the file's bytes and how the
host behaves: ranges honoured or not, a connection cut after N bytes on the first
request, a redirect, an error status, a Google-Drive-style confirmation page). Every
request is logged in ``server.requests`` as ``(path, Range header)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Route:
    data: bytes = b""
    status: int = 200
    ranges: bool = True
    cut_after: int | None = None  # close the connection after this many bytes, on the first request only
    redirect: str | None = None  # answer 302 to this path
    confirm: bool = False  # a confirmation page first (like Google Drive's virus-scan warning)
    served: int = 0


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        self.server.requests.append((url.path, self.headers.get("Range")))
        route = self.server.routes.get(url.path)
        if route is None:
            self.send_error(404)
            return
        if route.redirect:
            self.send_response(302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.status != 200:
            self.send_error(route.status)
            return
        if route.confirm and "confirm" not in parse_qs(url.query):
            page = (f'<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
                    f'<form id="download-form" action="{url.path}" method="get">'
                    f'<input type="hidden" name="id" value="abc"><input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="1234"></form></body></html>').encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        data, start = route.data, 0
        rng = self.headers.get("Range")
        if rng and route.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        first = route.served == 0
        route.served += 1
        if route.cut_after is not None and first:
            self.wfile.write(body[: route.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # a client that read what it wanted (a probe)
            self.close_connection = True


class AssetServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Route]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes, self.requests = routes, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def serve(routes: dict[str, Route]) -> AssetServer:
    return AssetServer(routes)
