"""The ``peerkit`` command (also ``python -m peerkit``).

Subcommands: ``broker`` (serve a broker), ``run`` (run one peer), ``launch`` (run an
experiment file), ``ctl`` (start, stop or close a peer) and ``peers`` (list the peers a broker
knows). Exit status: 0 success, 1 failure, 2 usage or validation error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from .broker import Broker
from .config import ConfigServer, ConfiguredPeer
from .errors import PeerkitError
from .experiment import CONFIG_SERVER_ID, ExperimentError, import_class, load_experiment
from .launch import LOG_FORMAT, Launcher
from .messages import CONTROL_ACTIONS, OkMsg, PeerControlMessage
from .params import ConfigError, merge_overrides, parse_overrides
from .peer import Peer
from .protocol import BrokerInfo

__all__ = ["main"]

DEFAULT_BROKER_URL = "ws://127.0.0.1:8765"
_USAGE_ERROR = 2


class _UsageError(Exception):
    """Bad command-line input: message printed, exit status 2."""


def _broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        metavar="URL",
        default=os.environ.get("PEERKIT_BROKER", DEFAULT_BROKER_URL),
        help="the broker's URL (default: $PEERKIT_BROKER or %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("PEERKIT_TOKEN"),
        help="the broker's shared secret (default: $PEERKIT_TOKEN)",
    )


def _log_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``peerkit`` command."""
    parser = argparse.ArgumentParser(
        prog="peerkit",
        description="peerkit: run brokers, peers and whole experiments.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "broker",
        help="serve a broker until Ctrl-C",
        description="Serve a peerkit broker, and a config server (peer id 'config_server') "
        "for ConfiguredPeer classes, until Ctrl-C or SIGTERM (then shut down cleanly: every "
        "peer is told). The first line printed is 'peerkit broker listening on URL'.",
        allow_abbrev=False,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument(
        "--port", type=int, default=8765, help="port to bind, 0 for any free one (default: 8765)"
    )
    p.add_argument(
        "--token",
        default=os.environ.get("PEERKIT_TOKEN"),
        help="shared secret peers must present; required to bind beyond loopback "
        "(default: $PEERKIT_TOKEN)",
    )
    p.add_argument(
        "--no-config-server",
        action="store_true",
        help="do not run the config server (ConfiguredPeers then wait for another one)",
    )
    _log_option(p, "WARNING")

    p = sub.add_parser(
        "run",
        help="run one peer",
        description="Run one peer (a peerkit.Peer subclass) until it finishes, Ctrl-C or "
        "SIGTERM. Exit status 0 when it finishes cleanly, 1 when it dies of an error.",
        allow_abbrev=False,
    )
    p.add_argument("target", metavar="MODULE:CLASS", help="the peer class, e.g. mypeers:Amp")
    _broker_option(p)
    p.add_argument("--id", dest="peer_id", help="the peer id (default: generated)")
    p.add_argument(
        "--no-autostart",
        action="store_true",
        help="stay ready until told to start (peerkit ctl start ID)",
    )
    p.add_argument(
        "--non-essential",
        action="store_true",
        help="mark the peer non-essential (its failure does not stop an experiment)",
    )
    p.add_argument(
        "--args-file",
        metavar="JSON",
        help="constructor keyword arguments as a JSON object (written by peerkit launch); "
        "the overrides below apply on top",
    )
    _log_option(p, "INFO")
    group = p.add_argument_group(
        "configuration overrides",
        "For ConfiguredPeer classes; each may be repeated, later ones win.",
    )
    for short, long, meta, text in (
        ("-p", "--local-params", ("NAME", "VALUE"), "local parameter (parsed as declared)"),
        ("-e", "--external-params", ("NAME", "SOURCE.PARAM"), "take it from another peer"),
        ("-c", "--config-sources", ("SOURCE", "PEER_ID"), "bind a config source to a peer"),
        ("-d", "--launch-dependencies", ("NAME", "PEER_ID"), "be ready only after PEER_ID"),
    ):
        group.add_argument(short, long, nargs=2, action="append", metavar=meta, help=text)
    group.add_argument(
        "-f", "--config-file", action="append", metavar="FILE", help="TOML config file"
    )

    p = sub.add_parser(
        "launch",
        help="run an experiment file",
        description="Run an experiment: broker and config server in this process, the peers "
        "in dependency order, a live status view, and a clean shutdown on Ctrl-C/SIGTERM, "
        "at the end of --duration or when an essential peer fails. Exit status 0 on a "
        "clean run, 1 when a peer failed or was not ready in time, 2 for an invalid file.",
        allow_abbrev=False,
    )
    p.add_argument("file", metavar="FILE", help="the experiment file (TOML)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of running")
    p.add_argument(
        "--inprocess", action="store_true", help="run every peer as a task in this process"
    )
    p.add_argument(
        "--run-dir", metavar="DIR", help="where logs go (default: runs/<name>-<timestamp>)"
    )
    p.add_argument("--ready-timeout", type=float, metavar="S", help="override the file's")
    p.add_argument("--grace", type=float, metavar="S", help="grace period per peer at shutdown")
    p.add_argument(
        "--view",
        choices=["auto", "terminal", "log"],
        default="auto",
        help="live table (terminal) or log lines (default: table when output is a terminal)",
    )
    p.add_argument(
        "--tail",
        type=int,
        default=3,
        metavar="N",
        help="show the last N lines of each peer's log at the end (default: 3)",
    )
    p.add_argument("--check", action="store_true", help="validate the file and exit")

    p = sub.add_parser(
        "ctl",
        help="start, stop or close a peer",
        description="Send PeerControlMessage to one peer and print its answer.",
        allow_abbrev=False,
    )
    p.add_argument(
        "action",
        help=f"what the peer should do: {', '.join(CONTROL_ACTIONS)} or an action it defines",
    )
    p.add_argument("peer_id", metavar="PEER_ID")
    _broker_option(p)
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="(default: 10)")

    p = sub.add_parser(
        "peers",
        help="list the peers connected to a broker",
        description="List the peers connected to a broker: state, message counts, "
        "subscriptions and query handlers.",
        allow_abbrev=False,
    )
    _broker_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="(default: 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peerkit`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {
        "broker": _cmd_broker,
        "run": _cmd_run,
        "launch": _cmd_launch,
        "ctl": _cmd_ctl,
        "peers": _cmd_peers,
    }[args.command]
    try:
        return handler(args)
    except _UsageError as exc:
        print(f"peerkit {args.command}: {exc}", file=sys.stderr)
        return _USAGE_ERROR
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT, stream=sys.stderr)


def _error(command: str, exc: BaseException) -> int:
    print(f"peerkit {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- broker


def _cmd_broker(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    try:
        broker = Broker(args.host, args.port, token=args.token)
    except PeerkitError as exc:
        raise _UsageError(str(exc)) from None
    try:
        trio.run(_serve_broker, broker, not args.no_config_server)
    except OSError as exc:
        return _error("broker", exc)
    return 0


async def _serve_broker(broker: Broker, with_config_server: bool) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            config_server: ConfigServer | None = None
            if with_config_server:
                config_server = ConfigServer(broker.url, CONFIG_SERVER_ID, token=broker.token)
                await nursery.start(config_server.run)
            print(f"peerkit broker listening on {broker.url}", flush=True)
            if config_server is not None:
                print(f"config server: peer {CONFIG_SERVER_ID!r}", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name} received, shutting down", flush=True)
                break
            if config_server is not None:
                await config_server.async_shutdown()
            await broker.shutdown()
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- run


def _cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    sys.path.insert(0, os.getcwd())
    try:
        cls = import_class(args.target)
    except PeerkitError as exc:
        raise _UsageError(str(exc)) from None
    kwargs: dict[str, Any] = {}
    if args.args_file:
        try:
            kwargs = json.loads(Path(args.args_file).read_text())
        except (OSError, ValueError) as exc:
            raise _UsageError(f"cannot read --args-file {args.args_file}: {exc}") from None
        if not isinstance(kwargs, dict):
            raise _UsageError(f"--args-file {args.args_file} must hold a JSON object")
    argv: list[str] = []
    for opt in ("local_params", "external_params", "config_sources", "launch_dependencies"):
        for name, value in getattr(args, opt) or ():
            argv += [f"--{opt.replace('_', '-')}", name, value]
    for file in args.config_file or ():
        argv += ["-f", file]
    if argv:
        if not issubclass(cls, ConfiguredPeer):
            raise _UsageError(
                f"{args.target} is not a ConfiguredPeer; -p/-e/-c/-d/-f do not apply to it"
            )
        try:
            kwargs = merge_overrides(kwargs, parse_overrides(argv))
        except ConfigError as exc:
            raise _UsageError(str(exc)) from None
    try:
        peer = cls(
            args.broker,
            args.peer_id,
            autostart=not args.no_autostart,
            is_essential=not args.non_essential,
            token=args.token,
            **kwargs,
        )
    except (PeerkitError, TypeError) as exc:
        raise _UsageError(f"cannot create {args.target}: {exc}") from None
    try:
        trio.run(_run_peer, peer)
    except Exception as exc:
        return _error("run", exc)
    return 0


async def _run_peer(peer: Peer) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    logging.getLogger("peerkit.cli").info(
                        "%s received, shutting down", signal.Signals(signum).name
                    )
                    nursery.start_soon(peer.async_shutdown)

            nursery.start_soon(on_signal)
            error: Exception | None = None
            try:
                await peer.run()
            except Exception as exc:
                error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


# ----------------------------------------------------------------------------- launch


def _cmd_launch(args: argparse.Namespace) -> int:
    try:
        experiment = load_experiment(args.file)
    except ExperimentError as exc:
        print(f"peerkit launch: {exc}", file=sys.stderr)
        return _USAGE_ERROR
    if args.check:
        print(f"{args.file}: ok, start order: {', '.join(experiment.order)}")
        return 0
    try:
        launcher = Launcher(
            experiment,
            duration=args.duration,
            inprocess=args.inprocess,
            run_dir=args.run_dir,
            ready_timeout=args.ready_timeout,
            grace_period=args.grace,
            view=args.view,
            handle_signals=True,
            tail=args.tail,
            token=os.environ.get("PEERKIT_TOKEN"),
        )
    except PeerkitError as exc:
        raise _UsageError(str(exc)) from None
    return trio.run(launcher.run)


# ----------------------------------------------------------------------------- ctl / peers


def _cli_peer(args: argparse.Namespace, what: str) -> Peer:
    return Peer(
        args.broker,
        f"peerkit-{what}-{uuid.uuid4().hex[:8]}",
        token=args.token,
        connect_timeout=args.timeout,
        request_timeout=args.timeout,
    )


def _cmd_ctl(args: argparse.Namespace) -> int:
    async def ctl() -> OkMsg:
        async with _cli_peer(args, "ctl") as peer:
            msg = PeerControlMessage(peer_id=args.peer_id, action=args.action)
            answer = await peer.ask_peer(args.peer_id, msg, timeout=args.timeout)
        if not isinstance(answer, OkMsg):
            raise PeerkitError(f"unexpected answer {answer!r}")
        return answer

    try:
        answer = trio.run(ctl)
    except PeerkitError as exc:
        return _error("ctl", exc)
    print(answer.detail or "ok")
    return 0


def _cmd_peers(args: argparse.Namespace) -> int:
    me = ""

    async def peers() -> BrokerInfo:
        nonlocal me
        async with _cli_peer(args, "peers") as peer:
            me = peer.peer_id
            return await peer.broker_info()

    try:
        info = trio.run(peers)
    except PeerkitError as exc:
        return _error("peers", exc)
    rows = [p for p in info.peers if p.peer_id != me]
    if args.json:
        data = [
            {
                "peer_id": p.peer_id,
                "state": p.state,
                "subscriptions": p.subscriptions,
                "query_handlers": p.query_handlers,
                "msgs_in": p.msgs_in,
                "msgs_out": p.msgs_out,
                "queued": p.queued,
                "dropped": p.dropped,
            }
            for p in rows
        ]
        print(json.dumps(data, indent=2))
        return 0
    if not rows:
        print("no peers connected")
        return 0
    headers = ("PEER", "STATE", "SENT", "RECEIVED", "QUEUED", "DROPPED")
    cells = [
        (p.peer_id, p.state, str(p.msgs_in), str(p.msgs_out), str(p.queued), str(p.dropped))
        for p in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for p, c in zip(rows, cells, strict=True):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if p.subscriptions:
            print(f"    subscribes to: {', '.join(p.subscriptions)}")
        if p.query_handlers:
            print(f"    answers:       {', '.join(p.query_handlers)}")
    return 0
