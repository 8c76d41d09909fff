"""Helpers and pytest fixtures for testing peers (and peerkit itself).

The fixtures ``peerkit_broker``, ``peerkit_peer`` and ``peerkit_config_server`` come from
:mod:`peerkit.pytest_plugin`, which pytest loads by itself wherever peerkit is installed.
``pytest_plugins = ["peerkit.testing"]`` in a ``conftest.py`` adds the older ``broker``
fixture and loads that plugin too (the two ways do not clash). All of them need pytest-trio
(``trio_mode = true`` or ``@pytest.mark.trio``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, overload

import trio

from .broker import Broker
from .errors import PeerkitError
from .peer import Peer

__all__ = ["PeerFactory", "broker", "wait_for_condition"]

#: Loading this module as a pytest plugin loads the fixtures' plugin too (a no-op when its
#: entry point already did).
pytest_plugins = ["peerkit.pytest_plugin"]


async def wait_for_condition(
    condition: Callable[[], object], timeout: float = 5.0, *, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` is true; :class:`trio.TooSlowError` after ``timeout`` s.

    It re-checks every ``interval`` seconds of trio time, so it costs nothing under
    ``autojump_clock``. Prefer waiting on an event when the code offers one.
    """
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - an arbitrary predicate has no event to wait on
            await trio.sleep(interval)


P = TypeVar("P", bound=Peer)


class PeerFactory:
    """What ``peerkit_peer`` gives a test: ``await peerkit_peer(PeerClass, peer_id, **options)``.

    Builds a peer of ``PeerClass`` (:class:`~peerkit.Peer` when omitted) connected to the
    test's broker, with the given constructor options, and returns it once it is
    *connected* (as ``nursery.start(peer.run)`` does; wait for more with
    ``await peer.wait_for_state(lambda p: p.is_ready, timeout)``). ``broker_url=`` points it
    at another broker. Every peer it made is shut down gracefully, newest first, at the
    end of the test. Annotate the fixture argument with this class to get the peer's type.
    """

    def __init__(self, broker: Broker, nursery: trio.Nursery) -> None:
        self._broker = broker
        self._nursery = nursery
        #: every peer made, oldest first
        self.peers: list[Peer] = []

    @overload
    async def __call__(
        self, peer_class: type[P], /, peer_id: str | None = None, **options: Any
    ) -> P: ...
    @overload
    async def __call__(self, /, *, peer_id: str | None = None, **options: Any) -> Peer: ...

    async def __call__(
        self, peer_class: type[Peer] | None = None, /, peer_id: str | None = None, **options: Any
    ) -> Peer:
        if peer_class is None:
            peer_class = Peer
        if not (isinstance(peer_class, type) and issubclass(peer_class, Peer)):
            raise PeerkitError(
                f"peerkit_peer takes the peer class first, got {peer_class!r}: "
                "await peerkit_peer(MyPeer, 'my-id') or await peerkit_peer(peer_id='my-id')"
            )
        url = options.pop("broker_url", None) or self._broker.url
        peer = peer_class(url, peer_id, **options)
        self.peers.append(peer)
        await self._nursery.start(peer.run)
        return peer

    async def _shutdown_all(self) -> None:
        for peer in reversed(self.peers):
            await peer.async_shutdown()


try:  # the fixtures need pytest; the helpers above do not
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture
    async def broker(nursery: trio.Nursery) -> AsyncIterator[Broker]:
        """A broker on 127.0.0.1 and a free port, shut down cleanly after the test."""
        b = Broker()
        await nursery.start(b.run)
        yield b
        await b.shutdown()
