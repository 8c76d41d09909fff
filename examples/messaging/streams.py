"""Subscribing at run time: a stream, and a handler added and removed (docs/messaging.rst)."""

import trio

from peerkit import Broker, Message, Peer, message


@message
class Reading(Message):
    celsius: float


async def main() -> None:
    async with (
        Broker() as broker,
        Peer(broker.url, "logger") as logger,
        Peer(broker.url, "kitchen") as kitchen,
    ):
        # a stream: the messages wait in it until the loop takes them
        async with logger.subscription(Reading, sender="kitchen") as readings:
            for celsius in (21.5, 22.0, 22.5):
                await kitchen.send_message(Reading(celsius=celsius))
            async for msg in readings:
                print(f"stream: {msg.sender} {msg.celsius}")
                if msg.celsius >= 22.5:
                    break
        # leaving the block unsubscribed it

        # a handler, subscribed and unsubscribed by hand
        got = trio.Event()

        def on_reading(msg: Reading) -> None:
            print(f"handler: {msg.sender} {msg.celsius}")
            got.set()

        await logger.subscribe_for_specific_msg_subtype(Reading, "kitchen", on_reading)
        await kitchen.send_message(Reading(celsius=23.0))
        with trio.fail_after(5):
            await got.wait()
        removed = await logger.unsubscribe(Reading, on_reading)
        print(f"unsubscribed {removed} handler")


if __name__ == "__main__":
    trio.run(main)
