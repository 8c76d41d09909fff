"""The config server: an alias of :mod:`peerkit.config.server`
(where it lives; both names are the same module object)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config.server import *  # noqa: F403
else:
    import sys

    from .config import server as _module

    sys.modules[__name__] = _module
