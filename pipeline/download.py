"""Downloading one file from a list of URLs: resumable, retried, verified, atomic.

:func:`download` tries each URL in turn (official release first, then mirrors):

- streams into ``<dest>.part`` with a progress bar; a cut connection or an interrupted
  run resumes where it stopped (HTTP ``Range``), a server that ignores ranges restarts the
  file;
- retries connection errors, timeouts, 429 and 5xx answers with exponential backoff; a
  4xx answer (a dead or moved link) goes on to the next URL at once;
- follows redirects (GitHub release assets redirect to their storage host) and
  Google-Drive-style confirmation pages (a large file's "can't scan for viruses" page:
  the form's action and fields are followed once);
- checks the size and the sha256 when they are known; a file that does not match is
  deleted, never left in the cache;
- renames ``<dest>.part`` to ``dest`` only once it is complete and verified.

When every URL fails, :class:`DownloadError` names each URL with its failure and the
manual step: where to put the file by hand.

``VG_ASSET_MIRROR`` (a base URL) is tried before every official URL:
``https://host/path`` -> ``<mirror>/host/path`` (a local copy of the release hosts, or a
test server); with ``VG_ASSET_MIRROR_ONLY=1`` only the mirror is (a site with no other way
out, or a test that must never reach the real hosts).

:func:`probe` asks whether a file can be downloaded now (one ranged request per URL), so
a run can stop before its first job, naming every file it cannot get.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from tqdm import tqdm

from .io import hash_file

logger = logging.getLogger(__name__)

MIRROR_ENV = "VG_ASSET_MIRROR"
MIRROR_ONLY_ENV = "VG_ASSET_MIRROR_ONLY"  # "1": the mirror's copies only, never the official hosts
RETRIES_ENV = "VG_DOWNLOAD_RETRIES"  # retries per URL (default 4)
#: answers worth retrying on the same URL (rate limits, server trouble)
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """No URL gave the file; the message names every URL tried and the manual step."""


class ChecksumError(ValueError):
    """A downloaded (or found) file whose sha256 or size is not the expected one."""


def sha256_file(path) -> str:
    return hash_file(path, "sha256")


def mirrored(urls: list[str], mirror: str | None = None) -> list[str]:
    """``urls`` with the mirror's copy of each first (``VG_ASSET_MIRROR`` when ``mirror`` is None)."""
    mirror = os.environ.get(MIRROR_ENV) if mirror is None else mirror
    if not mirror:
        return list(urls)
    out = []
    for url in urls:
        parts = urlsplit(url)
        out.append(f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else ""))
    if os.environ.get(MIRROR_ONLY_ENV, "").lower() in ("1", "true", "yes"):
        return out
    return out + [u for u in urls if u not in out]


def probe(urls: list[str], timeout: float = 10.0, session: requests.Session | None = None) -> tuple[str | None, list]:
    """``(url, attempts)``: the first of ``urls`` (mirror first) that answers with content to a
    one-byte ranged GET (redirects followed), else None; ``attempts``: each failure. Nothing
    is retried: a probe says whether a download can start now, not whether it will finish."""
    session = session or requests.Session()
    attempts: list[Attempt] = []
    for url in mirrored(urls):
        try:
            with session.get(url, headers={"Range": "bytes=0-0"}, stream=True, timeout=timeout,
                             allow_redirects=True) as r:
                if r.status_code in (200, 206):
                    return url, attempts
                attempts.append(Attempt(url, f"HTTP {r.status_code}"))
        except requests.RequestException as e:
            attempts.append(Attempt(url, _short(e)))
    return None, attempts


def _short(e: Exception) -> str:
    """A connection error in a line (requests nests the cause several levels deep)."""
    text = str(e)
    for hint in ("Name or service not known", "Temporary failure in name resolution", "Connection refused",
                 "timed out", "Network is unreachable", "No route to host"):
        if hint in text:
            return f"{type(e).__name__}: {hint}"
    return f"{type(e).__name__}: {text[:200]}"


@dataclass
class Attempt:
    url: str
    error: str


@dataclass
class Result:
    path: Path
    url: str
    sha256: str
    size: int
    resumed_from: int = 0
    attempts: list[Attempt] = field(default_factory=list)


class _Form(HTMLParser):
    """The first form of a page (a confirmation page's download form): action and fields."""

    def __init__(self):
        super().__init__()
        self.action, self.fields, self.href, self._in_form = None, {}, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action, self._in_form = a.get("action"), True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value") or ""
        elif tag == "a" and self.href is None and "confirm=" in (a.get("href") or ""):
            self.href = a["href"]

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def confirmation_target(page: str, base: str) -> tuple[str, dict] | None:
    """``(url, params)`` a Google-Drive-style confirmation page leads to, or None if ``page``
    is no such page."""
    form = _Form()
    form.feed(page)
    if form.action and ("confirm" in form.fields or "uuid" in form.fields or "id" in form.fields):
        return urljoin(base, form.action), form.fields
    if form.href:
        return urljoin(base, form.href.replace("&amp;", "&")), {}
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    if m:
        return base, {"confirm": m.group(1)}
    return None


def _is_html(r: requests.Response) -> bool:
    return "text/html" in r.headers.get("Content-Type", "")


class _Retry(Exception):
    """Worth another try of the same URL (the part file is kept for resuming)."""


class _Dead(Exception):
    """This URL does not serve the file (nothing was written): go on to the next one."""


def _fetch_once(session, url: str, part: Path, timeout: float, progress: bool, desc: str) -> None:
    """One request for ``url`` into ``part`` (resuming it); raises _Retry or a final error."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        r = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retry(f"cannot connect ({type(e).__name__}: {e})") from None
    if _is_html(r) and r.status_code == 200:  # a confirmation page: followed once
        target = confirmation_target(r.text, r.url)
        if target is None:
            raise ValueError(f"an HTML page instead of the file (at {r.url})")
        logger.info("%s: following the confirmation page", url)
        r = session.get(target[0], params=target[1], headers=headers, stream=True, timeout=timeout)
    if _is_html(r) and r.status_code == 200:
        raise ValueError(f"an HTML page instead of the file, also after its confirmation (at {r.url})")
    if r.status_code == 416 and have:  # the part is complete already (or the server lost it): check it
        return
    if r.status_code in RETRY_STATUS:
        raise _Retry(f"HTTP {r.status_code}")
    if r.status_code >= 400:
        raise _Dead(f"HTTP {r.status_code} {r.reason}")
    if r.status_code == 200 and have:  # the server ignores ranges: start over
        logger.info("%s: no resume support, restarting", url)
        have = 0
    elif r.status_code == 206:
        start = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
        if not start or int(start.group(1)) != have:
            raise ValueError(f"a partial answer at the wrong offset ({r.headers.get('Content-Range')!r}, asked {have})")
    length = r.headers.get("Content-Length")
    total = have + int(length) if length and length.isdigit() else None
    mode = "ab" if have else "wb"
    with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=desc,
                                     disable=not progress, mininterval=1) as bar:
        try:
            for block in r.iter_content(1 << 16):  # small reads: a cut connection loses at most one
                f.write(block)
                bar.update(len(block))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as e:
            raise _Retry(f"connection lost after {f.tell()} bytes ({type(e).__name__})") from None
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Retry(f"connection closed after {got} of {total} bytes")


def download(urls: list[str], dest, sha256: str | None = None, size: int | None = None, retries: int | None = None,
             backoff: float = 1.0, timeout: float = 60.0, progress: bool = True, manual: str | None = None,
             session: requests.Session | None = None) -> Result:
    """Fetch ``dest`` from the first of ``urls`` that gives it (mirror first, see the module
    doc), verified against ``sha256`` / ``size`` where given."""
    dest = Path(dest)
    if retries is None:
        retries = int(os.environ.get(RETRIES_ENV, "4"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    attempts: list[Attempt] = []
    resumed_from = part.stat().st_size if part.exists() else 0
    for url in mirrored(urls):
        for attempt in range(retries + 1):
            try:
                _fetch_once(session, url, part, timeout, progress, dest.name)
            except _Retry as e:
                if attempt == retries:
                    attempts.append(Attempt(url, f"{e} (after {retries} retries)"))
                    break
                wait = backoff * 2 ** attempt
                logger.warning("%s: %s; retrying in %.1f s (resuming)", url, e, wait)
                time.sleep(wait)
                continue
            except _Dead as e:
                attempts.append(Attempt(url, str(e)))
                break
            except (requests.RequestException, OSError, ValueError) as e:
                attempts.append(Attempt(url, str(e) or type(e).__name__))
                if part.exists() and not isinstance(e, OSError):
                    part.unlink()  # another URL may serve another copy: never append to this one
                break
            problem = _check(part, sha256, size)
            if problem:
                part.unlink()
                attempts.append(Attempt(url, problem))
                break
            digest = sha256 or sha256_file(part)
            os.replace(part, dest)
            logger.info("%s: fetched from %s", dest, url)
            return Result(dest, url, digest, dest.stat().st_size, resumed_from, attempts)
    lines = "\n".join(f"  {a.url}: {a.error}" for a in attempts) or "  (no URL)"
    raise DownloadError(
        f"could not fetch {dest.name}; tried:\n{lines}\n"
        f"Download it by hand and put it at {dest}" + (f" ({manual})" if manual else "")
        + (f"; its sha256 must be {sha256}" if sha256 else "")
    )


def _check(path: Path, sha256: str | None, size: int | None) -> str | None:
    """Why ``path`` is not the expected file (size, then checksum), or None."""
    got = path.stat().st_size
    if size is not None and got != size:
        return f"wrong size: {got} bytes, expected {size}"
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256.lower():
            return f"wrong sha256 {digest}, expected {sha256}"
    return None
