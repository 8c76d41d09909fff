"""When a subscriber cannot keep up: the delivery of each subscription (docs/messaging.rst)."""

from typing import Any

import trio

from peerkit import Broker, Message, Peer, message, subscribe

N = 1000  # samples published, far more than the queues hold (16 at the broker, 16 here)


@message
class Sample(Message):
    seq: int


class Display(Peer):
    """Shows the newest sample: older ones may be skipped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shown: list[int] = []
        self.busy = trio.Event()  # the display is stuck on its first sample until set
        self.newest_shown = trio.Event()

    @subscribe(Sample, delivery="latest")
    async def show(self, msg: Sample) -> None:
        if not self.shown:
            await self.busy.wait()
        self.shown.append(msg.seq)
        if msg.seq == N - 1:
            self.newest_shown.set()


class Recorder(Peer):
    """Records every sample: the publisher waits for it instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[int] = []
        self.all_recorded = trio.Event()

    @subscribe(Sample, delivery="lossless")
    def record(self, msg: Sample) -> None:
        self.recorded.append(msg.seq)  # a real recorder writes to a disk, and falls behind
        if len(self.recorded) == N:
            self.all_recorded.set()


async def main() -> None:
    async with Broker(send_queue_size=16) as broker:
        url, small = broker.url, {"receive_queue_size": 16}
        async with Display(url, "display", **small) as display, Peer(url, "amp") as amp:
            for seq in range(N):
                await amp.send_message(Sample(seq=seq))
            await amp.broker_info()  # a round trip: the broker has routed every sample
            display.busy.set()
            with trio.fail_after(10):
                await display.newest_shown.wait()
        print(f"latest: the newest sample shown last: {display.shown[-1] == N - 1}")
        print(f"latest: older samples skipped: {display.dropped_messages > 0}")

        async with Recorder(url, "recorder", **small) as recorder, Peer(url, "amp") as amp:
            for seq in range(N):
                await amp.send_message(Sample(seq=seq))  # waits while the recorder is behind
            with trio.fail_after(10):
                await recorder.all_recorded.wait()
        print(
            f"lossless: recorded {len(recorder.recorded)} samples, in order: "
            f"{recorder.recorded == list(range(N))}, lost: {recorder.dropped_messages}"
        )


if __name__ == "__main__":
    trio.run(main)
