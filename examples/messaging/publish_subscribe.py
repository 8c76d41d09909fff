"""Publishing and subscribing with the decorator (docs/messaging.rst)."""

from typing import Any

import trio

from peerkit import Broker, Message, Peer, message, subscribe


@message
class Reading(Message):
    celsius: float


class Display(Peer):
    """Counts every reading, and keeps those of the kitchen's thermometer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count = 0
        self.kitchen: list[float] = []
        self.three_seen = trio.Event()

    @subscribe(Reading)
    def on_any_reading(self, msg: Reading) -> None:
        self.count += 1
        if self.count == 3:
            self.three_seen.set()

    @subscribe(Reading, sender="kitchen")
    def on_kitchen_reading(self, msg: Reading) -> None:
        self.kitchen.append(msg.celsius)


async def main() -> None:
    async with (
        Broker() as broker,
        Display(broker.url, "display") as display,
        Peer(broker.url, "kitchen") as kitchen,
        Peer(broker.url, "cellar") as cellar,
    ):
        await kitchen.send_message(Reading(celsius=21.5))
        await cellar.send_message(Reading(celsius=12.0))
        await kitchen.send_message(Reading(celsius=22.0))
        with trio.fail_after(5):
            await display.three_seen.wait()
    print(f"the display saw {display.count} readings")
    print(f"from the kitchen, in the order sent: {display.kitchen}")


if __name__ == "__main__":
    trio.run(main)
