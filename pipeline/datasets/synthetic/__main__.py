"""``python3 -m pipeline.datasets.synthetic``: see :func:`.cli.main`."""

import sys

from .cli import main

sys.exit(main())
