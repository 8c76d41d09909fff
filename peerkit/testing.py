"""Helpers and pytest fixtures for testing peers (and peerkit itself).

Use the fixtures by adding ``pytest_plugins = ["peerkit.testing"]`` to your ``conftest.py``
(with pytest-trio in ``trio_mode``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio

from .broker import Broker

__all__ = ["broker", "wait_for_condition"]


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
