"""Two peers and a broker in one trio program: publish, subscribe, query.

Run it with ``python examples/two_peers.py``.
"""

import trio

from peerkit import Broker, Message, Peer, message


@message
class Greeting(Message):
    text: str


@message
class Add(Message):
    a: int
    b: int


@message
class Sum(Message):
    value: int


async def main() -> None:
    with trio.fail_after(10):
        async with Broker() as broker, Peer(broker.url, "listener") as listener:
            got = trio.Event()

            def on_greeting(msg: Greeting) -> None:
                print(f"listener got {msg.text!r} from {msg.sender}")
                got.set()

            await listener.subscribe_for_all_msg_subtype(Greeting, on_greeting)
            await listener.register_query_handler(Add, lambda q: Sum(value=q.a + q.b))

            async with Peer(broker.url, "talker") as talker:
                await talker.send_message(Greeting(text="hello"))
                await got.wait()
                answer = await talker.query(Add(a=2, b=40))
                print(f"talker asked 2 + 40, {answer.sender} answered {answer}")


if __name__ == "__main__":
    trio.run(main)
