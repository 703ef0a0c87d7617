"""The street world of the synthetic dataset: straight streets placed in UTM coordinates, and their lamps.

Each street is a corridor in a local frame (``x`` lateral, to the right when looking
along the street; ``y`` along the street; ``z`` up) with a facade wall on each side
(``x = -w/2``, ``x = +w/2``), a ground plane and a sky; :class:`Street` maps the frame
to UTM. The constants below (facade height, sidewalk, lamps) are shared by the
texture, scene and render modules and by the conf check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_ATLAS_MARGIN = 100.0  # metres of facade beyond each end of a street
_HMAX = 20.0  # facade atlas height (metres); buildings are at most this tall
_LAMP_SPACING = 28.0
_LAMP_HEIGHT = 6.0
_SIDEWALK = 2.5


@dataclass
class Street:
    index: int
    origin: tuple[float, float]  # UTM east, north of y = 0, x = 0
    bearing: float  # compass bearing (degrees) of the +y axis
    length: float
    width: float

    def to_utm(self, x: float, y: float) -> tuple[float, float]:
        b = math.radians(self.bearing)
        east = self.origin[0] + y * math.sin(b) + x * math.cos(b)
        north = self.origin[1] + y * math.cos(b) - x * math.sin(b)
        return east, north

    @property
    def ymin(self) -> float:
        return -_ATLAS_MARGIN

    @property
    def ymax(self) -> float:
        return self.length + _ATLAS_MARGIN


def _make_streets(conf: dict, rng: np.random.Generator) -> list[Street]:
    streets = []
    e0, n0 = conf["utm_origin"]
    east = float(e0)
    for i in range(int(conf["n_streets"])):
        length = float(conf["street_length"]) * rng.uniform(0.9, 1.1)
        length = max(2 * conf["db_spacing"], round(length / conf["db_spacing"]) * conf["db_spacing"])
        # never axis-aligned: 15-75 or 105-165 degrees
        bearing = float(rng.uniform(15, 75) + 90 * rng.integers(0, 2))
        width = float(rng.uniform(*conf["street_width"]))
        north = float(n0) + float(rng.uniform(-150, 150))
        # all streets run eastwards (bearing in (0, 180)); origins are spaced so that
        # their east extents are >= 250 m apart
        streets.append(Street(i, (east, north), bearing, float(length), width))
        east += length + 250.0
    return streets


def _lamp_positions(street: Street, rng) -> list[tuple[float, float]]:
    """Street lamps (x of the pole, y): staggered on both sidewalks."""
    out = []
    off = rng.uniform(0, _LAMP_SPACING)
    half = street.width / 2 - _SIDEWALK + 0.4
    y = street.ymin + off
    k = 0
    while y < street.ymax:
        out.append(((half if k % 2 else -half), y))
        y += _LAMP_SPACING / 2
        k += 1
    return out
