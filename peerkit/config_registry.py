"""The config server's registry: an alias of :mod:`peerkit.config.registry`
(where it lives; both names are the same module object)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config.registry import *  # noqa: F403
else:
    import sys

    from .config import registry as _module

    sys.modules[__name__] = _module
