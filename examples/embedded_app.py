"""A trio application that serves its own WebSocket endpoint and a peerkit broker on one
port, with two peers exchanging a message and a query through it.

The application owns the server (``trio_websocket.serve_websocket``) and decides, request by
request, what to serve: ``/peerkit`` goes to the broker, ``/echo`` is its own endpoint. The
broker is mounted (``Broker(listen=False)``): it opens no port, and its life is still owned
by a nursery.

Run it with ``python examples/embedded_app.py`` (it binds a free port on 127.0.0.1).
"""

from __future__ import annotations

import functools

import trio
import trio_websocket

from peerkit import Broker, Message, Peer, message


@message(type="embedded_app.Greeting")  # wire names need only be unique per process
class Greeting(Message):
    text: str


@message(type="embedded_app.Add")
class Add(Message):
    a: int
    b: int


@message(type="embedded_app.Sum")
class Sum(Message):
    value: int


async def echo(request: trio_websocket.WebSocketRequest) -> None:
    """The application's own endpoint: sends back every message it receives."""
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except trio_websocket.ConnectionClosed:
        pass


async def main() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = Broker(listen=False)
            await nursery.start(broker.run)

            async def handler(request: trio_websocket.WebSocketRequest) -> None:
                if request.path == "/peerkit":
                    await broker.handle_request(request)
                elif request.path == "/echo":
                    await echo(request)
                else:
                    await request.reject(404)

            serve = functools.partial(
                trio_websocket.serve_websocket,
                handler,
                "127.0.0.1",
                0,
                None,
                **broker.websocket_options(),  # the limits and buffers the broker serves with
            )
            server: trio_websocket.WebSocketServer = await nursery.start(serve)
            base = f"ws://127.0.0.1:{server.port}"
            print(f"serving {base}/echo and the broker at {base}/peerkit")

            # the application's own endpoint works beside the broker
            async with trio_websocket.open_websocket_url(f"{base}/echo") as ws:
                await ws.send_message("ping")
                print(f"/echo answered {await ws.get_message()!r}")

            async with (
                Peer(f"{base}/peerkit", "listener") as listener,
                Peer(f"{base}/peerkit", "talker") as talker,
            ):
                got = trio.Event()

                def on_greeting(msg: Greeting) -> None:
                    print(f"listener got {msg.text!r} from {msg.sender}")
                    got.set()

                await listener.subscribe_for_all_msg_subtype(Greeting, on_greeting)
                await listener.register_query_handler(Add, lambda q: Sum(value=q.a + q.b))
                await talker.send_message(Greeting(text="hello through the app's port"))
                await got.wait()
                answer = await talker.query(Add(a=2, b=40))
                print(f"talker asked 2 + 40, {answer.sender} answered {answer}")

            await broker.shutdown()
            nursery.cancel_scope.cancel()  # stops the application's server


if __name__ == "__main__":
    trio.run(main)
