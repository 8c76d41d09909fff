"""Parameter types and conversions: an alias of :mod:`peerkit.config.paramtypes`
(where it lives; both names are the same module object)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config.paramtypes import *  # noqa: F403
else:
    import sys

    from .config import paramtypes as _module

    sys.modules[__name__] = _module
