"""``python -m peerkit.bench``: run the benchmarks (see :mod:`peerkit.bench`)."""

import sys

from . import main

sys.exit(main())
