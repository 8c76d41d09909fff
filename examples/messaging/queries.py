"""Queries: a handler, the asker, and what the asker gets when there is no answer
(docs/messaging.rst)."""

import trio

from peerkit import (
    Broker,
    Message,
    NoHandlerError,
    Peer,
    RemoteError,
    message,
    query_handler,
)


@message
class GetOffset(Message):
    channel: int


@message
class Offset(Message):
    channel: int
    microvolts: float


@message
class GetGain(Message):
    channel: int


class Amplifier(Peer):
    offsets = {1: 0.5, 2: -1.5}

    @query_handler(GetOffset)
    def offset(self, msg: GetOffset) -> Offset:
        if msg.channel not in self.offsets:
            raise ValueError(f"no channel {msg.channel}; channels are 1 and 2")
        return Offset(channel=msg.channel, microvolts=self.offsets[msg.channel])


async def main() -> None:
    async with (
        Broker() as broker,
        Amplifier(broker.url, "amplifier"),
        Peer(broker.url, "gui") as gui,
    ):
        print(await gui.query(GetOffset(channel=2)))
        print(await gui.ask_peer("amplifier", GetOffset(channel=1), timeout=2))
        try:
            await gui.query(GetOffset(channel=9))
        except RemoteError as exc:
            print(f"RemoteError from {exc.peer_id!r}: {exc.error_type}: {exc.error_message}")
        try:
            await gui.query(GetGain(channel=1))
        except NoHandlerError as exc:
            print(f"NoHandlerError: {exc}")


if __name__ == "__main__":
    trio.run(main)
