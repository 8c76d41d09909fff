"""What happens when a handler raises (docs/messaging.rst)."""

from typing import Any

import trio

from peerkit import Broker, Message, Peer, message, subscribe
from peerkit.messages import PanickMsg


@message
class Command(Message):
    text: str


class Fragile(Peer):
    @subscribe(Command)
    def on_command(self, msg: Command) -> None:
        level = int(msg.text)  # "abc" raises ValueError, and the peer dies of it
        print(f"fragile: level {level}")


class Sturdy(Peer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled = 0
        self.two_handled = trio.Event()

    @subscribe(Command)
    def on_command(self, msg: Command) -> None:
        self.handled += 1
        if self.handled == 2:
            self.two_handled.set()
        try:
            level = int(msg.text)
        except ValueError:
            print(f"sturdy: ignored {msg.text!r} from {msg.sender}")
            return
        print(f"sturdy: level {level}")


async def main() -> None:
    async with Broker() as broker, Peer(broker.url, "watcher") as watcher:
        panicked = trio.Event()

        def on_panic(msg: PanickMsg) -> None:
            print(f"watcher: {msg.sender} died of {msg.error_type}: {msg.message}")
            panicked.set()

        await watcher.subscribe_for_all_msg_subtype(PanickMsg, on_panic)

        async with Sturdy(broker.url, "sturdy") as sturdy:
            await watcher.send_message(Command(text="abc"))
            await watcher.send_message(Command(text="7"))
            with trio.fail_after(5):
                await sturdy.two_handled.wait()

        try:
            async with Fragile(broker.url, "fragile"):
                await watcher.send_message(Command(text="abc"))
                await trio.sleep_forever()  # until the fragile peer's death cancels it
        except ValueError as exc:
            error = exc
        with trio.fail_after(5):
            await panicked.wait()
        print(f"the block raised {error!r}")


if __name__ == "__main__":
    trio.run(main)
