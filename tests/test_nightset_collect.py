"""Night-set collect stage against the mock Flickr server (tests/nightset_mock.py)."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from PIL import Image

from pipeline.nightset import collect as C
from pipeline.nightset import flickr as F
from pipeline.nightset.collect import collect, main
from pipeline.nightset.flickr import (
    FlickrError,
    Query,
    RateLimiter,
    retry_after_seconds,
)

from .nightset_mock import jpeg_bytes, make_images, make_photos, mock_flickr

BBOX = (-122.45, 37.75, -122.40, 37.80)
KEY = "test-key"


class Sleeps(list):
    """An injectable sleep: records the waits, never sleeps."""

    def __call__(self, s):
        self.append(s)


def run(base_url, build, **kw):
    kw.setdefault("api_key", KEY)
    kw.setdefault("rate", 0)
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("progress", False)
    return collect(BBOX, build, base_url=base_url, **kw)


def read_rows(build):
    with open(build / "collected" / "photos.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_skipped(build):
    with open(build / "collected" / "skipped.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_table(build, ids):
    rows = read_rows(build)
    assert [r["photo_id"] for r in rows] == sorted(ids, key=lambda s: (len(s), s))
    assert list(rows[0]) == C.COLUMNS
    for r in rows:
        assert r["file"] == f"images/{r['photo_id']}.jpg"
        with Image.open(build / "collected" / r["file"]) as im:
            im.load()
        assert BBOX[1] <= float(r["lat"]) <= BBOX[3] and BBOX[0] <= float(r["lon"]) <= BBOX[2]
        assert r["url"].endswith(f"/img/{r['photo_id']}.jpg")
    return rows


def test_paging(tmp_path):
    photos = make_photos(23, BBOX)
    with mock_flickr(photos, make_images(photos), api_key=KEY) as (url, st):
        s = run(url, tmp_path, per_page=5)
    assert s["pages_fetched"] == 5 and s["downloaded"] == 23 and s["rows"] == 23 and s["complete"]
    assert max(st.api_served.values()) == 1 and len(st.api_served) == 5
    assert max(st.image_served.values()) == 1 and len(st.image_served) == 23
    q = st.api_requests[0]
    assert q["method"] == "flickr.photos.search" and q["has_geo"] == "1" and q["per_page"] == "5"
    assert q["bbox"] == "-122.450000,37.750000,-122.400000,37.800000"
    assert set(q["extras"].split(",")) >= {"geo", "date_taken", "url_l", "owner_name", "license"}
    rows = check_table(tmp_path, [p["id"] for p in photos])
    assert rows[0]["accuracy"] == "16" and rows[0]["license"] == "4" and rows[0]["datetaken"].startswith("2020")
    summary = json.loads((tmp_path / "collected" / "summary.json").read_text())
    assert summary["rows"] == 23


def test_split_bbox_over_cap(tmp_path):
    photos = make_photos(30, BBOX, seed=1)
    with mock_flickr(photos, make_images(photos), max_results=10) as (url, st):
        s = run(url, tmp_path, per_page=5, max_results_per_query=10)
    assert s["splits"] >= 1 and s["capped_queries"] == 0 and s["complete"]
    check_table(tmp_path, [p["id"] for p in photos])
    assert max(st.image_served.values()) == 1
    # every page served was within the cap of its query
    assert all(page <= 2 for (_, _, _, page) in st.api_served)


def test_split_dates_when_bbox_too_small(tmp_path):
    # 12 photos at one spot, a day apart: only the taken-date range can separate them
    photos = [{"id": str(500 + i), "latitude": 37.7712, "longitude": -122.4211,
               "datetaken": f"2021-03-{i + 1:02d} 22:00:00"} for i in range(12)]
    with mock_flickr(photos, make_images(photos), max_results=4) as (url, st):
        s = run(url, tmp_path, per_page=2, max_results_per_query=4)
    assert s["complete"] and s["capped_queries"] == 0
    check_table(tmp_path, [p["id"] for p in photos])
    assert any(q.get("min_taken_date") for q in st.api_requests)


def test_429_retry_after_then_success(tmp_path):
    photos = make_photos(4, BBOX)
    faults = {"api": [{"status": 429, "headers": {"Retry-After": "7"}}],
              "images": {"1001": [{"status": 429}]}}
    sleeps = Sleeps()
    with mock_flickr(photos, make_images(photos), faults) as (url, st):
        s = run(url, tmp_path, sleep=sleeps)
    assert s["rows"] == 4
    assert sleeps[0] == 7.0  # Retry-After honoured
    assert sleeps[1] == F.backoff_seconds(0)  # no header: exponential backoff
    assert st.image_requests["1001"] == 2 and st.image_served["1001"] == 1


def test_stat_fail_is_a_clear_error(tmp_path):
    photos = make_photos(3, BBOX)
    with mock_flickr(photos, make_images(photos), api_key="the-right-key") as (url, st), \
            pytest.raises(FlickrError, match=r"100.*Invalid API Key") as e:
        run(url, tmp_path, api_key="wrong")
    assert e.value.code == 100
    assert len(st.api_requests) == 1  # not retried
    faults = {"api": [{"stat": "fail", "code": 3, "message": "Parameterless searches have been disabled"}]}
    with mock_flickr(photos, make_images(photos), faults) as (url, st), \
            pytest.raises(FlickrError, match="error 3.*Parameterless"):
        run(url, tmp_path / "b")


def test_flickr_rate_limit_error_is_retried(tmp_path):
    photos = make_photos(3, BBOX)
    faults = {"api": [{"stat": "fail", "code": 105, "message": "Service currently unavailable"}, "html",
                      {"stat": "fail", "code": 999, "message": "Rate limit exceeded"}]}
    with mock_flickr(photos, make_images(photos), faults) as (url, st):
        s = run(url, tmp_path)
    assert s["rows"] == 3 and len(st.api_requests) == 4


def test_5xx_and_dropped_connections_then_success(tmp_path, caplog):
    photos = make_photos(8, BBOX)
    faults = {"api": [None, 500, "drop"], "images": {"1002": [503, "drop"], "1005": [502]}}
    sleeps = Sleeps()
    with caplog.at_level(logging.WARNING, logger="pipeline.nightset.flickr"), \
            mock_flickr(photos, make_images(photos), faults) as (url, st):
        s = run(url, tmp_path, per_page=4, sleep=sleeps)
    assert s["complete"] and s["rows"] == 8 and s["pages_fetched"] == 2
    assert st.image_requests["1002"] == 3 and max(st.image_served.values()) == 1
    # page 1's images (1002: 2 failures), page 2 (2 failures), then its images (1005: 1 failure)
    assert sleeps == [1.0, 2.0, 1.0, 2.0, 1.0]
    assert "ConnectionError" in caplog.text and KEY not in caplog.text  # the key is never logged


def test_retries_exhausted(tmp_path):
    photos = make_photos(3, BBOX)
    with mock_flickr(photos, make_images(photos), {"api": [500] * 10}) as (url, st), \
            pytest.raises(FlickrError, match="gave up after 3 tries.*HTTP 500"):
        run(url, tmp_path, retries=2)
    assert len(st.api_requests) == 3


def test_truncated_and_corrupt_images(tmp_path, caplog):
    photos = make_photos(6, BBOX)
    images = make_images(photos)
    images["1003"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    del images["1005"]  # 404
    faults = {"images": {"1001": ["truncate"], "1004": ["corrupt", "corrupt"]}}
    with caplog.at_level(logging.WARNING, logger="pipeline.nightset.collect"), \
            mock_flickr(photos, images, faults) as (url, st):
        s = run(url, tmp_path)
        assert st.image_requests["1001"] == 2 and st.image_served["1001"] == 1
        # a second run asks for none of the bad images again
        before = st.image_requests.copy()
        s2 = run(url, tmp_path)
        assert st.image_requests == before
    ok = ["1000", "1001", "1002"]
    check_table(tmp_path, ok)
    assert s["skipped"] == {"HTTP 404": 1, "corrupt image": 2}
    assert not (tmp_path / "collected" / "images" / "1003.jpg").exists()
    skipped = {r["photo_id"]: r["reason"] for r in read_skipped(tmp_path)}
    assert set(skipped) == {"1003", "1004", "1005"} and skipped["1005"] == "HTTP 404"
    assert skipped["1003"].startswith("corrupt image")
    assert "1003" in caplog.text and "corrupt" in caplog.text
    assert s2["rows"] == 3 and s2["downloaded"] == 0 and s2["complete"]


def test_image_urls(tmp_path):
    assert F.photo_url({"id": "5", "url_c": "c", "url_o": "o"}) == "c"
    assert F.photo_url({"id": "5", "server": "65535", "secret": "ab"}) == "https://live.staticflickr.com/65535/5_ab_b.jpg"
    assert F.photo_url({"id": "5"}) is None
    photos = make_photos(2, BBOX)
    photos[1].update(url_l=None, server=None, secret=None)
    with mock_flickr(photos, make_images(photos)) as (url, _):
        s = run(url, tmp_path)
    assert s["skipped"] == {"no image url": 1} and s["complete"]
    check_table(tmp_path, ["1000"])


def test_non_jpeg_is_stored_as_jpeg(tmp_path):
    import io

    photos = make_photos(1, BBOX)
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 20, 30)).save(buf, "PNG")
    with mock_flickr(photos, {"1000": buf.getvalue()}) as (url, _):
        run(url, tmp_path)
    with Image.open(tmp_path / "collected" / "images" / "1000.jpg") as im:
        assert im.format == "JPEG" and im.size == (20, 10)


def test_outside_bbox_and_accuracy_dropped(tmp_path):
    photos = make_photos(5, BBOX)
    photos[0]["accuracy"] = 11
    photos.append({"id": "77", "latitude": 37.9, "longitude": -122.42, "_force": True})  # north of the bbox
    photos.append({"id": "78", "latitude": 0, "longitude": 0, "_force": True})
    with mock_flickr(photos, make_images(photos)) as (url, st):
        s = run(url, tmp_path, min_accuracy=14)
    assert s["photos_listed"] == 7
    assert s["skipped"] == {"outside bbox": 1, "no position": 1, "accuracy below 14": 1}
    check_table(tmp_path, ["1001", "1002", "1003", "1004"])
    assert "77" not in st.image_requests and "1000" not in st.image_requests
    assert read_skipped(tmp_path) == []  # filtered photos are counted, not listed


def test_resume_after_max_photos(tmp_path):
    photos = make_photos(12, BBOX)
    with mock_flickr(photos, make_images(photos)) as (url, st):
        s1 = run(url, tmp_path, per_page=5, max_photos=4)
        assert s1["rows"] == 4 and not s1["complete"] and s1["pages_fetched"] == 1
        assert len(read_rows(tmp_path)) == 4
        s2 = run(url, tmp_path, per_page=5)
    assert s2["already_downloaded"] == 4 and s2["downloaded"] == 8 and s2["complete"]
    assert s2["pages_reused"] == 1 and s2["pages_fetched"] == 2
    assert max(st.image_served.values()) == 1 and max(st.api_served.values()) == 1
    check_table(tmp_path, [p["id"] for p in photos])


def test_resume_after_server_dies(tmp_path):
    photos = make_photos(15, BBOX)
    with mock_flickr(photos, make_images(photos), {"die_after_images": 6}) as (url, st):
        with pytest.raises(RuntimeError, match="in a row"):
            run(url, tmp_path, per_page=5, retries=1, abort_after=3)
        assert sum(st.image_served.values()) == 6
        st.revive()
        s = run(url, tmp_path, per_page=5)
    assert s["complete"] and s["rows"] == 15 and s["already_downloaded"] == 6
    assert max(st.image_served.values()) == 1 and max(st.api_served.values()) == 1
    check_table(tmp_path, [p["id"] for p in photos])


def test_resume_after_crash_while_listing(tmp_path):
    photos = make_photos(15, BBOX)
    with mock_flickr(photos, make_images(photos), {"die_after_api": 2}) as (url, st):
        with pytest.raises(FlickrError, match="gave up"):
            run(url, tmp_path, per_page=5, retries=1)
        st.revive()
        state = tmp_path / "collected" / C.STATE_NAME
        with open(state, "a") as f:
            f.write('{"type": "page", "query": "torn')  # a write cut short by the crash
        s = run(url, tmp_path, per_page=5)
    assert s["complete"] and s["rows"] == 15 and s["pages_reused"] == 2 and s["pages_fetched"] == 1
    assert max(st.api_served.values()) == 1 and max(st.image_served.values()) == 1
    assert state.read_text().endswith("\n")


def test_other_parameters_refuse_to_resume(tmp_path):
    photos = make_photos(3, BBOX)
    with mock_flickr(photos, make_images(photos)) as (url, _):
        run(url, tmp_path)
        with pytest.raises(ValueError, match=f"{C.STATE_NAME}.*other listing parameters"):
            run(url, tmp_path, min_taken="2019-01-01")


def test_missing_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    with pytest.raises(ValueError, match="FLICKR_API_KEY"):
        collect(BBOX, tmp_path, base_url="http://127.0.0.1:9/")
    assert not (tmp_path / "collected").exists()


@pytest.mark.parametrize("bbox", ["1,2,3", "-122.4,37.8,-122.45,37.75", "a,b,c,d", (0, 0, 200, 1)])
def test_bad_bbox(tmp_path, bbox):
    with pytest.raises(ValueError, match="bbox"):
        collect(bbox, tmp_path, api_key=KEY)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="per_page"):
        collect(BBOX, tmp_path, api_key=KEY, per_page=600)
    with pytest.raises(ValueError, match="min_taken"):
        collect(BBOX, tmp_path, api_key=KEY, min_taken="yesterday")
    with pytest.raises(ValueError, match="after max_taken"):
        collect(BBOX, tmp_path, api_key=KEY, min_taken="2020-02-01", max_taken="2020-01-01")


def test_main_uses_environment_key(tmp_path, monkeypatch, capsys):
    photos = make_photos(3, BBOX)
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    with mock_flickr(photos, make_images(photos), api_key=KEY) as (url, st):
        rc = main(["--build", str(tmp_path), "--bbox=" + ",".join(map(str, BBOX)), "--base-url", url,
                   "--rate", "0", "--no-progress", "--min-taken", "2019-01-01"])
    assert rc == 0
    assert st.api_requests[0]["min_taken_date"] == "2019-01-01 00:00:00"
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    with mock_flickr(photos, make_images(photos), api_key=KEY) as (url, st):  # the same, bbox as 4 arguments
        rc = main(["--build", str(tmp_path), "--bbox", *map(str, BBOX), "--base-url", url, "--rate", "0",
                   "--no-progress", "--min-taken", "2019-01-01"])
    assert rc == 0 and st.image_requests == {}  # all there already
    capsys.readouterr()
    monkeypatch.delenv("FLICKR_API_KEY")
    assert main(["--build", str(tmp_path / "b"), "--bbox", "0,0,1,1"]) == 1


def test_rate_limiter_spaces_requests():
    now = [100.0]
    waits = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    lim = RateLimiter(2.0, sleep, clock=lambda: now[0])
    for _ in range(3):
        lim.wait()
    assert waits == [0.5, 0.5]
    now[0] += 10
    lim.wait()
    assert waits == [0.5, 0.5]
    RateLimiter(0, sleep).wait()
    assert len(waits) == 2


def test_retry_after_parsing():
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert F.backoff_seconds(0) == 1.0 and F.backoff_seconds(3) == 8.0 and F.backoff_seconds(30) == 60.0


def test_query_split_rounds_to_flickr_precision():
    q = Query((-122.45, 37.75, -122.40, 37.80))
    kids = q.split()
    assert len(kids) == 4 and {k.bbox[2] for k in kids} == {-122.425, -122.40}
    tiny = Query((-122.42115, 37.77115, -122.42110, 37.77120), "2020-01-01 00:00:00", "2020-01-01 02:00:00")
    assert [(k.min_taken, k.max_taken) for k in tiny.split()] == [
        ("2020-01-01 00:00:00", "2020-01-01 01:00:00"), ("2020-01-01 01:00:01", "2020-01-01 02:00:00")]
    assert {k.bbox for k in tiny.split()} == {tiny.bbox}
    assert Query(tiny.bbox, "2020-01-01 00:00:00", "2020-01-01 01:00:00").split() == []


def test_jpeg_helper_decodes():
    with Image.open(__import__("io").BytesIO(jpeg_bytes(3, (20, 30)))) as im:
        assert im.size == (30, 20)
