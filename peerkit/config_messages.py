"""The config server's messages: an alias of :mod:`peerkit.config.messages`
(where it lives; both names are the same module object)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config.messages import *  # noqa: F403
else:
    import sys

    from .config import messages as _module

    sys.modules[__name__] = _module
