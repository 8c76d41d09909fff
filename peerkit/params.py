"""Declared parameters, their values and command-line overrides: an alias of
:mod:`peerkit.config.params` (where it lives; both names are the same module object)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config.params import *  # noqa: F403
else:
    import sys

    from .config import params as _module

    sys.modules[__name__] = _module
