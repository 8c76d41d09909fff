"""``python -m peerkit._stress.serve``: a broker (and a config server) in a process of its own,
for the stress tools (internal).

It prints ``url ws://...`` on stdout once it listens, logs warnings and errors to stderr
(``LEVEL logger: message``), and shuts down cleanly on SIGINT or SIGTERM. Should the broker
stop by itself, it logs why (CRITICAL) and the process ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

import trio

from ..broker import Broker
from ..config_server import ConfigServer

log = logging.getLogger("peerkit.broker")


async def serve(options: dict[str, Any], config_server: bool) -> None:
    """Serve until SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            broker = Broker(**options)
            asked = False  # a signal asked it to stop

            async def run_broker(*, task_status: trio.TaskStatus[Broker]) -> None:
                try:
                    await broker.run(task_status=task_status)
                except BaseException as exc:
                    log.critical("the broker stopped: %r", exc, exc_info=exc)
                    raise
                if not asked:
                    log.critical("the broker stopped by itself")
                nursery.cancel_scope.cancel()

            await nursery.start(run_broker)
            server: ConfigServer | None = None
            if config_server:
                server = ConfigServer(broker.url)
                await nursery.start(server.run)
            print(f"url {broker.url}", flush=True)
            async for _ in signals:
                asked = True
                break
            if server is not None:
                with trio.move_on_after(5):
                    await server.async_shutdown()
            await broker.shutdown()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peerkit._stress.serve")
    parser.add_argument(
        "--options", default="{}", help="Broker keyword arguments, as a JSON object"
    )
    parser.add_argument("--no-config-server", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    trio.run(serve, json.loads(args.options), not args.no_config_server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
