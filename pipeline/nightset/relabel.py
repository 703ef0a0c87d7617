"""Relabel: review the positions of the night photos in a small local web page.

Flickr positions are often tens of metres off. This stage shows each query photo beside
the database images nearest its current label (UTM distance, in metres under each) and
records what the reviewer decides:

- **pick** a database image (click it, or press its number ``1``-``9``): the label moves
  to that image's latitude/longitude, status ``moved``; or, when the picked image is
  already (one of) the nearest database images to the label and no farther than
  ``confirm_m`` (5 m by default), the label is kept as it is, status ``confirmed``.
  "One of the nearest": within :data:`~pipeline.nightset.relabel_log.TIE_M` (0.5 m) of the nearest distance, so the
  several crops of one panorama count alike;
- **enter** coordinates (latitude, longitude in decimal degrees, WGS84; a pasted
  ``"lat, lon"`` is split): status ``entered``. Coordinates are validated (numbers, in
  range, convertible to UTM); a bad value is refused with HTTP 400 and a message;
- **skip** (``s``): status ``skipped``, label unchanged ("next unreviewed" does not offer it
  again; browse back to it with the arrows);
- **reject** (``x``): status ``rejected``, label unchanged; verify drops the photo.

Other keys: ``n`` next unreviewed photo, ``←``/``→`` previous/next photo, ``e`` the
coordinate field, ``m`` more candidates. The page shows the progress (photos reviewed
of the total) and, after every decision, goes on to the next unreviewed photo.

The decision log and ``labels.csv`` (derived from it, rebuilt at every decision and at
start-up, so a restarted server resumes where the reviewer stopped) are described in
:mod:`pipeline.nightset.relabel_log`; the server and its page are in
:mod:`pipeline.nightset.relabel_server`. This module is the stage's entry point and CLI.

Usage (the server binds 127.0.0.1 on a free port and prints its URL; Ctrl-C stops it)::

    python -m pipeline.nightset.relabel --queries BUILD/dedup.csv \\
        --positions BUILD/collected/photos.csv --photos BUILD/collected \\
        --db-root data/sf --db-table work/sf/index/database.csv --build BUILD
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .relabel_log import CONFIRM_M, LABELS_NAME, LOG_NAME, load_queries, write_labels
from .relabel_server import serve

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--queries", required=True, help="photos to review: CSV with photo_id, file (+ keep; + lat, lon "
                   "unless --positions), e.g. <build>/dedup.csv")
    p.add_argument("--positions", default=None, help="CSV with photo_id, lat, lon (e.g. <build>/collected/photos.csv)")
    p.add_argument("--photos", required=True, help="folder the 'file' column is relative to (<build>/collected)")
    p.add_argument("--db-root", required=True, help="dataset root of the database images")
    p.add_argument("--db-table", required=True, help="its index table (work/<dataset>/index/database.csv)")
    p.add_argument("--build", required=True, help="build folder: writes <build>/relabel/{log.jsonl,labels.csv}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    p.add_argument("--candidates", type=int, default=6, help="database images shown per photo (default 6)")
    p.add_argument("--confirm-m", type=float, default=CONFIRM_M,
                   help=f"picking the nearest database image within this many metres confirms the label "
                        f"(default {CONFIRM_M:g})")
    p.add_argument("--replay-only", action="store_true", help="rebuild labels.csv from the log and exit")
    return p


def run(a: argparse.Namespace) -> int:
    if a.replay_only:
        queries = load_queries(a.queries, a.positions)
        d = Path(a.build) / "relabel"
        labels = write_labels(queries, d / LOG_NAME, d / LABELS_NAME)
        print(json.dumps(labels.status.value_counts().to_dict(), sort_keys=True))
        return 0
    server = serve(a.queries, a.photos, a.db_root, a.db_table, a.build, a.host, a.port, a.candidates,
                   positions_csv=a.positions, confirm_m=a.confirm_m)
    print(f"relabel: open {server.url}  (Ctrl-C stops; decisions are saved as you go)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", flush=True)
    finally:
        server.server_close()
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m pipeline.nightset.relabel",
                                              description=__doc__.split("\n\n")[0]))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run(a)
    except (ValueError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 1


#: ``python -m pipeline`` subcommands (see :mod:`pipeline.cli`)
COMMANDS = {"nightset-relabel": (add_arguments, run)}


if __name__ == "__main__":
    sys.exit(main())
