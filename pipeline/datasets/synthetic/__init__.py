"""A small synthetic visual geo-localization dataset (day database, night queries).

The world is a handful of straight streets placed in real UTM coordinates (around
San Francisco by default). Each street is a corridor in a local frame (``x``
lateral, to the right when looking along the street; ``y`` along the street; ``z``
up) with two planar facade walls at ``x = -w/2`` (left) and ``x = +w/2`` (right),
a ground plane and a sky. Facades are procedural texture atlases: a row of
buildings with their own colours, materials, window grids, doors, shop fronts,
signs with random text, graffiti, pipes, murals. Window styles are shared between
buildings and streets (perceptual aliasing) while signs, murals and shop fronts
make places distinctive.

Views are rendered by ray casting every pixel against the walls and the ground
(vectorised numpy) and sampling the atlases with ``cv2.remap``. The database is
a grid of day views every ``db_spacing`` metres along each street, at the
``db_headings`` (yaw relative to the street axis; negative looks left). Queries
are taken at random positions between the grid points, off the centre line,
with perturbed yaw/pitch/roll, another focal length, a lower camera, and a night
appearance rendered from the *same* facade layout (dark walls, some windows lit,
lamp light, tint, noise, blur, JPEG), sometimes with parked cars or pedestrians
in front. Every query has a database image within ``positive_radius`` metres.

Output (the VG benchmark layout)::

    <root>/database/@east@north@zone@letter@lat@lon@pano@@heading@...@.jpg
    <root>/queries/...
    <root>/README.txt        # how it was made: conf and seed
    <root>/synthetic.json    # conf + counts (+ street geometry)

``generate`` is atomic (it writes ``<root>.partial-<pid>`` and renames it) and
idempotent (a complete root made with the same conf is left alone).

CLI::

    python3 -m pipeline.datasets.synthetic --root data/demo [--seed 0] [--n-queries 50]

Modules: ``world`` (streets, their UTM frame, lamps), ``facades`` (facade textures,
day and night), ``scene`` (ground, sky and the mip-mapped atlas of a street),
``render`` (camera, ray casting, occluders, post-processing), ``dataset`` (the conf,
the shots, file names, ``generate``), ``cli`` (``main`` and ``COMMANDS``).
"""

from .cli import COMMANDS, main
from .dataset import DEFAULT_CONF, FORMAT_VERSION, generate

__all__ = ["COMMANDS", "DEFAULT_CONF", "FORMAT_VERSION", "generate", "main"]
