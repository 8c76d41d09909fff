"""Experiment files: an alias of :mod:`peerkit.launch.experiment`
(where it lives; both names are the same module object)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .launch.experiment import *  # noqa: F403
else:
    import sys

    from .launch import experiment as _module

    sys.modules[__name__] = _module
