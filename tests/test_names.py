import math

import pytest

from pipeline.datasets.names import BadNameError, format_name, parse_name

FIXTURE_NAME = "@0543099.15@4179908.99@10@S@37.765498@-122.510553@51293731544@@@@@@20210706@@.jpg"


def test_parse_fixture_name():
    p = parse_name(FIXTURE_NAME)
    assert (p.east, p.north, p.zone, p.letter) == (543099.15, 4179908.99, 10, "S")
    assert (p.lat, p.lon) == (37.765498, -122.510553)
    assert p.zone_id == "10S"


def test_parse_path_and_bytes():
    assert parse_name("queries/sub/" + FIXTURE_NAME).east == 543099.15
    assert parse_name(FIXTURE_NAME.encode()).north == 4179908.99


def test_round_trip():
    name = format_name(123456.78, 4999999.5, 33, "T", 45.1, 9.2, pano_id="abc", heading=90.0, note="night")
    p = parse_name(name)
    assert (p.east, p.north, p.zone, p.letter, p.lat, p.lon) == (123456.78, 4999999.5, 33, "T", 45.1, 9.2)
    assert name.endswith("@night@.jpg")


def test_missing_latlon_is_nan():
    p = parse_name("@0543099.15@4179908.99@10@S@@@x@.jpg")
    assert math.isnan(p.lat) and math.isnan(p.lon)


@pytest.mark.parametrize(
    "name, message",
    [
        ("photo.jpg", "separators"),
        ("@1@2@10@S.jpg", "separators"),
        ("@abc@4179908.99@10@S@37.7@-122.5@@.jpg", "UTM_east"),
        ("@543099.15@nan@10@S@37.7@-122.5@@.jpg", "not finite"),
        ("@543099.15@4179908.99@61@S@37.7@-122.5@@.jpg", "outside 1..60"),
        ("@543099.15@4179908.99@x@S@37.7@-122.5@@.jpg", "not an integer"),
        ("@543099.15@4179908.99@10@I@37.7@-122.5@@.jpg", "band letter"),
        ("@543099.15@4179908.99@10@S@97.7@-122.5@@.jpg", "latitude"),
        ("@543099.15@4179908.99@10@S@37.7@-222.5@@.jpg", "longitude"),
        ("x@543099.15@4179908.99@10@S@37.7@-122.5@@.jpg", "separators"),
    ],
)
def test_bad_names_are_named(name, message):
    with pytest.raises(BadNameError) as e:
        parse_name("queries/" + name)
    assert name in str(e.value) and message in str(e.value)


def test_format_rejects_at_sign():
    with pytest.raises(ValueError):
        format_name(1.0, 2.0, 10, "S", 0.0, 0.0, note="a@b")
