"""Configuration: parameters declared on peers (:mod:`peerkit.params`, sans-IO), the
:class:`ConfigServer` that holds every configured peer's parameters and readiness, and the
:class:`ConfiguredPeer` that gets its parameters from it."""

from .configured import DEFAULT_CONFIG_SERVER_ID, ConfigTimeout, ConfiguredPeer, DependencyLost
from .server import ConfigServer

__all__ = [
    "DEFAULT_CONFIG_SERVER_ID",
    "ConfigServer",
    "ConfigTimeout",
    "ConfiguredPeer",
    "DependencyLost",
]
