"""peerkit's pytest plugin: a broker, peers and a config server as fixtures.

Installing peerkit registers this module with pytest (a ``pytest11`` entry point named
``peerkit.pytest_plugin``), so a test asks for ``peerkit_broker``, ``peerkit_peer`` or
``peerkit_config_server`` with no import and no ``pytest_plugins`` line. Where plugin
autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), add
``pytest_plugins = ["peerkit.pytest_plugin"]`` to the root ``conftest.py``; the two ways do
not clash. The fixtures are trio fixtures: they need pytest-trio, with ``trio_mode = true``
or ``@pytest.mark.trio`` on the test, and they work under its ``autojump_clock``.

Everything runs in the test's own trio run, on real loopback sockets and a free port; a peer
that dies of an error fails the test with that error.

This module must not import :mod:`peerkit.testing` when it is imported: a ``conftest.py``
may load that module as a plugin after this one, and pytest can only rewrite the assertions
of a plugin module it imports itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
import trio

from .broker import Broker
from .config.server import ConfigServer

if TYPE_CHECKING:
    from .testing import PeerFactory

__all__ = [
    "peerkit_broker",
    "peerkit_broker_options",
    "peerkit_config_server",
    "peerkit_peer",
]

#: How long a fixture waits for its peer to become ready before failing the test.
READY_TIMEOUT = 10.0


@pytest.fixture
def peerkit_broker_options() -> dict[str, Any]:
    """Keyword arguments for the ``peerkit_broker`` fixture's :class:`~peerkit.Broker`.

    Empty by default; override this fixture (in a ``conftest.py``, a test module, or with
    ``@pytest.mark.parametrize("peerkit_broker_options", [{...}])``) to set broker options
    such as ``token`` or ``heartbeat_interval``.
    """
    return {}


@pytest.fixture
async def peerkit_broker(
    nursery: trio.Nursery, peerkit_broker_options: dict[str, Any]
) -> AsyncIterator[Broker]:
    """A running :class:`~peerkit.Broker` on 127.0.0.1 and a free port (``.url``).

    Shut down cleanly after the test (its peers are told, as in production).
    """
    broker = Broker(**peerkit_broker_options)
    await nursery.start(broker.run)
    yield broker
    await broker.shutdown()


@pytest.fixture
async def peerkit_peer(peerkit_broker: Broker, nursery: trio.Nursery) -> AsyncIterator[PeerFactory]:
    """A :class:`~peerkit.testing.PeerFactory`:
    ``peer = await peerkit_peer(MyPeer, "my-id", **options)``.

    The peers are connected to ``peerkit_broker`` and shut down at the end of the test.
    """
    from .testing import PeerFactory  # not at import: see the module's docstring

    factory = PeerFactory(peerkit_broker, nursery)
    yield factory
    await factory._shutdown_all()


@pytest.fixture
async def peerkit_config_server(
    peerkit_broker: Broker, nursery: trio.Nursery
) -> AsyncIterator[ConfigServer]:
    """A :class:`~peerkit.ConfigServer` (peer id ``config_server``) on ``peerkit_broker``,
    ready when the test starts, so configured peers can register with it."""
    server = ConfigServer(peerkit_broker.url)
    await nursery.start(server.run)
    await server.wait_for_state(lambda p: p.is_ready, READY_TIMEOUT)
    yield server
    await server.async_shutdown()
