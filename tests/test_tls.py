"""The broker over wss:// (TLS)."""

from __future__ import annotations

import ssl

import pytest
import trio

from peerkit import Broker, BrokerConnectError, Message, Peer, message


@message
class Secret(Message):
    text: str


async def test_peers_talk_over_tls(
    nursery: trio.Nursery, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls
    with trio.fail_after(10):
        broker = Broker(ssl_context=server_ctx)
        await nursery.start(broker.run)
        assert broker.url.startswith("wss://127.0.0.1:")
        async with (
            Peer(broker.url, "a", ssl_context=client_ctx) as a,
            Peer(broker.url, "b", ssl_context=client_ctx) as b,
            b.subscription(Secret) as stream,
        ):
            await a.send_message(Secret(text="over tls"))
            assert (await stream.receive()).text == "over tls"
        # a client that does not trust the broker's certificate cannot connect
        with pytest.raises(BrokerConnectError, match="TLS handshake"):
            async with Peer(broker.url, "c", ssl_context=ssl.create_default_context()):
                pass  # pragma: no cover
        await broker.shutdown()
