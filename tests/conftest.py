from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest
import trio

from peerkit import Broker

pytest_plugins = ["peerkit.testing"]


@pytest.fixture
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts: a test CA's certificate for 127.0.0.1, which the
    client trusts."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@pytest.fixture
async def vanishing_broker(nursery: trio.Nursery) -> AsyncIterator[tuple[Broker, trio.CancelScope]]:
    """A broker (heartbeat 1 s, timeout 3 s) and the scope that makes it vanish at once:
    no shutdown notice, its connections just close."""
    broker = Broker(heartbeat_interval=1, heartbeat_timeout=3)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await broker.run(task_status=task_status)

    await nursery.start(run)
    yield broker, scope
