"""Several handlers of one query type: the share policies (docs/messaging.rst)."""

import trio

from peerkit import Broker, Message, MultiplePeersAvailable, Peer, message, query_handler


@message
class Classify(Message):
    signal: list[float]


@message
class Label(Message):
    label: str


class Worker(Peer):
    """One of several interchangeable classifiers: the broker takes turns."""

    @query_handler(Classify, policy="round_robin")
    async def classify(self, msg: Classify) -> Label:
        return Label(label="left" if sum(msg.signal) < 0 else "right")


@message
class Impedance(Message):
    pass


@message
class Ohms(Message):
    ohms: float


class Amplifier(Peer):
    """One of several amplifiers: the asker must say which one it means."""

    @query_handler(Impedance, policy="explicit")
    def impedance(self, msg: Impedance) -> Ohms:
        return Ohms(ohms=4700.0 if self.peer_id == "amp-1" else 5100.0)


async def main() -> None:
    async with Broker() as broker:
        url = broker.url
        async with Worker(url, "worker-1"), Worker(url, "worker-2"), Peer(url, "gui") as gui:
            for _ in range(4):
                answer = await gui.query(Classify(signal=[0.5, -1.0]))
                print(f"{answer.sender} says {answer.label}")
        async with Amplifier(url, "amp-1"), Amplifier(url, "amp-2"), Peer(url, "gui") as gui:
            try:
                await gui.query(Impedance())
            except MultiplePeersAvailable as exc:
                print(f"MultiplePeersAvailable: {exc.peers}")
                amplifiers = exc.peers
            for amp in amplifiers:
                print(amp, await gui.ask_peer(amp, Impedance()))


if __name__ == "__main__":
    trio.run(main)
