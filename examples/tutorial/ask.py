"""Ask the tutorial's monitor what it has seen (docs/tutorial.rst): ``python ask.py``."""

import os

import trio
from lab import GetSummary

from peerkit import Peer


async def main() -> None:
    broker_url = os.environ.get("PEERKIT_BROKER", "ws://127.0.0.1:8765")
    async with Peer(broker_url, "asker") as peer:
        summary = await peer.query(GetSummary(), timeout=5)
        print(summary)


trio.run(main)
