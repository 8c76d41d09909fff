"""The ``peerkit`` command (also ``python -m peerkit``).

Subcommands: ``broker`` (serve a broker), ``run`` (run one peer), ``launch`` (run an
experiment file), ``ctl`` (start, stop or close a peer), ``peers`` (list the peers a broker
knows, or ``--watch`` them join, change state and leave) and ``completion`` (print a bash or
zsh completion script). Exit status: 0 success,
1 failure, 2 usage or validation error, 130 interrupted (Ctrl-C) before a peer was running.

Everything a user can get wrong ends in **one line** on stderr naming the fix, in the words
of the command line: the library's errors name Python keyword arguments (``token=``,
``connect_timeout``), so :func:`_flags` rewrites them into flags (``--token``,
``--connect-timeout``) here, where the two layers meet. A peer's own error is shown once:
the library logs it (with its traceback) and ``run()`` raises it again, so the command's log
handler lets each exception through once (:class:`_ShowOnce`) and the command prints only
what was not shown already.

Reaching the broker (``run``, ``ctl``, ``peers``) starts with a plain TCP connection to its
address: a refused connection fails at once (a peer would retry for its whole
``connect_timeout``, since a broker may be starting), unless ``--wait`` asks to keep trying.
``--connect-timeout`` bounds the whole wait, including a server that accepts the connection
but never answers the WebSocket handshake.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from . import dashboard as _dashboard
from ._completion import SHELLS, bash_script, zsh_script
from .broker import Broker
from .config.configured import ConfigServer, ConfiguredPeer
from .config.params import ConfigError, merge_overrides, parse_overrides
from .errors import (
    BrokerConnectError,
    BrokerLostError,
    DuplicatePeerId,
    HandshakeRejected,
    NoHandlerError,
    PeerkitError,
    QueryTimeout,
)
from .launch._status import StatusEvent, event_line, event_record, peer_records, peers_table
from .launch.experiment import CONFIG_SERVER_ID, ExperimentError, import_class, load_experiment
from .launch.launcher import LOG_FORMAT, Launcher
from .messages import (
    CONTROL_ACTIONS,
    OkMsg,
    PeerControlMessage,
    PeerJoined,
    PeerLeft,
    PeerStateChanged,
)
from .peer import Peer
from .protocol import BrokerInfo

__all__ = ["build_parser", "main"]

DEFAULT_BROKER_URL = "ws://127.0.0.1:8765"
#: how long reaching the broker may take when ``--connect-timeout`` is not given (without
#: ``--wait``; with it, only the handshake after the broker accepted the connection)
DEFAULT_CONNECT_TIMEOUT = 10.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_USAGE_ERROR = 2
_INTERRUPTED = 130

log = logging.getLogger("peerkit.cli")


class _UsageError(Exception):
    """Bad command-line input: message printed, exit status 2."""


class _Failure(Exception):
    """The command could not do its job (broker unreachable, port taken...): message
    printed on one line, exit status 1."""


# ============================================================================ the parser

_MAIN_EPILOG = """\
examples:
  peerkit broker                     serve a broker on ws://127.0.0.1:8765
  peerkit run mypeers:Amp --id amp   run one peer (mypeers.py in this directory)
  peerkit peers                      list the peers the broker knows
  peerkit ctl start amp              tell peer 'amp' to start
  peerkit launch experiment.toml     broker, config server and peers from a file

'peerkit COMMAND --help' describes each command. Shell completion:
  eval "$(peerkit completion bash)"  (zsh too: see 'peerkit completion --help')
"""

_BROKER_DESCRIPTION = """\
Serve a peerkit broker, and a config server (peer id 'config_server') for
ConfiguredPeer classes, until Ctrl-C or SIGTERM; then shut both down cleanly
(every peer is told). The first line printed is
'peerkit broker listening on ws://HOST:PORT'."""

_BROKER_EPILOG = """\
examples:
  peerkit broker                          on ws://127.0.0.1:8765, the default
                                          of every other command's --broker
  peerkit broker --port 0                 on any free port (the URL is printed)
  peerkit broker --host 0.0.0.0 --token s3cret
                                          reachable from other machines
"""

_RUN_DESCRIPTION = """\
Run one peer (a peerkit.Peer subclass, imported from the current directory or
the installed packages) until it finishes, Ctrl-C or SIGTERM (both shut it down
cleanly). It prints a line when the peer is connected and one each time it is
running. Exit status 0 when the peer finishes cleanly, 1 when it dies of an
error or cannot reach the broker, 2 when the class cannot be imported or its
configuration is wrong."""

_RUN_EPILOG = """\
examples:
  peerkit run mypeers:Amplifier --id amp
  peerkit run mypeers:Amplifier --id amp -p sampling_rate 1024 -f amp.toml
  peerkit run mypeers:Filter --id filter --no-autostart --wait
                                  (ready, waits for: peerkit ctl start filter)
"""

_LAUNCH_DESCRIPTION = """\
Run an experiment: broker and config server in this process, the peers in
dependency order, a live status view, and a clean shutdown on Ctrl-C/SIGTERM,
at the end of --duration or when an essential peer fails. Exit status 0 on a
clean run, 1 when a peer failed or was not ready in time, 2 for an invalid
file."""

_LAUNCH_EPILOG = """\
examples:
  peerkit launch examples/demo.toml --duration 10
  peerkit launch examples/demo.toml --check      validate, print the start order
  peerkit launch experiment.toml --view log --run-dir runs/today
"""

_CTL_DESCRIPTION = """\
Send a PeerControlMessage to one peer and print its answer: 'start' moves it
from ready to running, 'stop' from running to ready (a peer with autoshutdown,
the default, then shuts down), 'close' shuts it down; any other action is passed
to the peer's _control_action hook (see the peer states page of the docs)."""

_CTL_EPILOG = """\
examples:
  peerkit ctl start amp
  peerkit ctl calibrate amp          an action peer 'amp' defines
  peerkit ctl close amp --broker ws://10.0.0.5:8765 --token s3cret
"""

_PEERS_DESCRIPTION = """\
List the peers connected to a broker: state, message counts, subscriptions and
query handlers. SENT is what a peer published, RECEIVED what the broker
delivered to it, QUEUED what waits in the broker for it, DROPPED what the broker
dropped because the peer was too slow (the same names in --json).

With --watch, print the peers' events as they happen instead, one line each:
a peer joined, changed state (old -> new; a custom state with the base state it
counts as) or left (clean, or why not), until Ctrl-C or --duration."""

_PEERS_EPILOG = """\
examples:
  peerkit peers
  peerkit peers --json --broker ws://127.0.0.1:41483
  peerkit peers --wait --connect-timeout 30      wait for the broker to come up
  peerkit peers --watch                          live, until Ctrl-C
  peerkit peers --watch --json --duration 60     JSON lines, for a minute
"""

_COMPLETION_DESCRIPTION = """\
Print a completion script for bash or zsh: subcommands, options and their
values (log levels, files, ctl actions) complete with TAB."""

_COMPLETION_EPILOG = """\
examples:
  bash, for the current shell:  eval "$(peerkit completion bash)"
  bash, for good:   peerkit completion bash \\
                        > ~/.local/share/bash-completion/completions/peerkit
  zsh:              peerkit completion zsh > ~/.zfunc/_peerkit
                    (with fpath=(~/.zfunc $fpath) before compinit in ~/.zshrc)
"""


class _VersionAction(argparse.Action):
    """``--version``: reads the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print peerkit's version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from . import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port number 0..65535 (0 picks a free one), got {text!r}"
        )
    return value


def _subparser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def _connect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reaching the broker")
    group.add_argument(
        "--broker",
        metavar="URL",
        default=os.environ.get("PEERKIT_BROKER", DEFAULT_BROKER_URL),
        help="the broker's URL (default: $PEERKIT_BROKER or %(default)s)",
    )
    group.add_argument(
        "--token",
        metavar="SECRET",
        default=os.environ.get("PEERKIT_TOKEN"),
        help="the broker's shared secret, if it has one (default: $PEERKIT_TOKEN)",
    )
    group.add_argument(
        "--wait",
        action="store_true",
        help="if nothing listens at the broker's address yet, keep trying until it does "
        "(by default the command fails at once)",
    )
    group.add_argument(
        "--connect-timeout",
        type=_seconds,
        metavar="S",
        help=f"give up when the broker has not answered within S seconds (default: "
        f"{DEFAULT_CONNECT_TIMEOUT:g}; with --wait, no limit until it listens, then "
        f"{DEFAULT_CONNECT_TIMEOUT:g})",
    )


def _log_option(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("PEERKIT_LOG_LEVEL", default),
        help=f"show {what} log records of this level and above "
        f"(default: $PEERKIT_LOG_LEVEL or {default})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``peerkit`` command."""
    parser = argparse.ArgumentParser(
        prog="peerkit",
        description="peerkit: run brokers, peers and whole experiments.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subparser(
        sub, "broker", "serve a broker until Ctrl-C", _BROKER_DESCRIPTION, _BROKER_EPILOG
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but loopback needs --token (default: %(default)s)",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=8765,
        help="port to listen on, 0 for any free one (default: %(default)s)",
    )
    p.add_argument(
        "--token",
        metavar="SECRET",
        default=os.environ.get("PEERKIT_TOKEN"),
        help="shared secret every peer must present; required to listen beyond loopback "
        "(default: $PEERKIT_TOKEN)",
    )
    p.add_argument(
        "--no-config-server",
        action="store_true",
        help="serve the broker alone, without a config server (ConfiguredPeers then wait "
        "for one to appear)",
    )
    _log_option(p, "WARNING", "the broker's and the config server's")

    p = _subparser(sub, "run", "run one peer", _RUN_DESCRIPTION, _RUN_EPILOG)
    p.add_argument(
        "target", metavar="MODULE:CLASS", help="the peer class to run, e.g. mypeers:Amplifier"
    )
    p.add_argument(
        "--id", dest="peer_id", help="the peer's id (default: the class name and a random suffix)"
    )
    p.add_argument(
        "--no-autostart",
        action="store_true",
        help="stay ready until told to start (peerkit ctl start ID)",
    )
    p.add_argument(
        "--non-essential",
        action="store_true",
        help="mark the peer non-essential: its failure does not stop an experiment",
    )
    p.add_argument(
        "--args-file",
        metavar="JSON",
        help="constructor keyword arguments as a JSON object (peerkit launch writes one); "
        "the configuration overrides below apply on top",
    )
    _log_option(p, "INFO", "the peer's")
    _connect_options(p)
    group = p.add_argument_group(
        "configuration overrides",
        "For ConfiguredPeer classes; each may be repeated, later ones win.",
    )
    for short, long, meta, text in (
        ("-p", "--local-params", ("NAME", "VALUE"), "set a parameter (parsed as declared)"),
        ("-e", "--external-params", ("NAME", "SOURCE.PARAM"), "take it from another peer"),
        ("-c", "--config-sources", ("SOURCE", "PEER_ID"), "bind a config source to a peer"),
        ("-d", "--launch-dependencies", ("NAME", "PEER_ID"), "be ready only after PEER_ID"),
    ):
        group.add_argument(short, long, nargs=2, action="append", metavar=meta, help=text)
    group.add_argument(
        "-f", "--config-file", action="append", metavar="FILE", help="a TOML config file"
    )

    p = _subparser(sub, "launch", "run an experiment file", _LAUNCH_DESCRIPTION, _LAUNCH_EPILOG)
    p.add_argument("file", metavar="FILE", help="the experiment file (TOML)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of running")
    p.add_argument(
        "--inprocess", action="store_true", help="run every peer as a task in this process"
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="also serve the live dashboard (a web page on 127.0.0.1; its address is printed)",
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=0,
        metavar="PORT",
        help="the dashboard's port (default: any free one)",
    )
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        help="where the logs and the peers' output go (default: runs/NAME-TIMESTAMP-PID)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        metavar="S",
        help="seconds every peer has to get ready (default: the file's [launcher] value)",
    )
    p.add_argument(
        "--grace",
        type=float,
        metavar="S",
        help="seconds each peer has to shut down cleanly (default: the file's [launcher] value)",
    )
    p.add_argument(
        "--view",
        choices=["auto", "terminal", "log"],
        default="auto",
        help="a live table (terminal) or log lines (log); auto picks the table when the "
        "output is a terminal (default: auto)",
    )
    p.add_argument(
        "--tail",
        type=int,
        default=3,
        metavar="N",
        help="show the last N lines of each peer's log at the end (default: 3)",
    )
    p.add_argument("--check", action="store_true", help="validate the file and exit")
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get("PEERKIT_LOG_LEVEL"),
        help="level of the records written to the run directory's logs, the launcher's "
        "and every peer's (default: $PEERKIT_LOG_LEVEL or INFO)",
    )

    p = _subparser(sub, "ctl", "start, stop or close a peer", _CTL_DESCRIPTION, _CTL_EPILOG)
    action = p.add_argument(
        "action",
        help=f"what the peer should do: {', '.join(CONTROL_ACTIONS)} or an action it defines",
    )
    action.suggestions = CONTROL_ACTIONS  # type: ignore[attr-defined]  # for completion
    p.add_argument("peer_id", metavar="PEER_ID", help="the peer to tell")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for the peer's answer once connected (default: 10)",
    )
    _log_option(p, "WARNING", "peerkit's")
    _connect_options(p)

    p = _subparser(
        sub, "peers", "list the peers connected to a broker", _PEERS_DESCRIPTION, _PEERS_EPILOG
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list instead of a table (with --watch: a JSON object per line)",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="print the peers' events live (joined, state changes, left) until Ctrl-C",
    )
    p.add_argument(
        "--duration",
        type=_seconds,
        metavar="S",
        help="with --watch: stop watching after S seconds",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for the broker's answer once connected (default: 10)",
    )
    _log_option(p, "WARNING", "peerkit's")
    _connect_options(p)

    p = _subparser(
        sub,
        "dashboard",
        "serve the live dashboard of a broker's peers (a web page)",
        _dashboard.DESCRIPTION,
        "example:\n  peerkit dashboard --broker ws://127.0.0.1:8765 --port 0\n",
    )
    _dashboard.add_arguments(p)

    p = _subparser(
        sub,
        "completion",
        "print a shell completion script",
        _COMPLETION_DESCRIPTION,
        _COMPLETION_EPILOG,
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    return parser


# ============================================================================ entry point


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
        "completion": _cmd_completion,
        "dashboard": _dashboard.dashboard_command,
    }[args.command]
    try:
        _check_environment(args)
        return handler(args)
    except BaseException as exc:  # sorted below; anything else is re-raised
        leaf = _single(exc)
        if isinstance(leaf, _UsageError):
            print(f"peerkit {args.command}: {leaf}", file=sys.stderr, flush=True)
            return _USAGE_ERROR
        if isinstance(leaf, _Failure):
            _say_error(args.command, str(leaf))
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            return _INTERRUPTED
        raise


def _say(command: str, text: str) -> None:
    print(f"peerkit {command}: {text}", flush=True)


def _say_error(command: str, text: str) -> None:
    """One line on stderr, whatever the text holds."""
    print(f"peerkit {command}: {' '.join(text.split())}", file=sys.stderr, flush=True)


def _single(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups, leaving out Cancelled; ``exc``
    itself when it is not a group or holds several."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        elif not isinstance(e, trio.Cancelled):
            leaves.append(e)

    walk(exc)
    return leaves[0] if len(leaves) == 1 else exc


def _check_environment(args: argparse.Namespace) -> None:
    level = getattr(args, "log_level", None)
    if level is not None and level not in LOG_LEVELS:  # from $PEERKIT_LOG_LEVEL
        raise _UsageError(
            f"$PEERKIT_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    url = getattr(args, "broker", None)
    if url is not None:
        _address(url)


# ============================================================================ wording

#: library wording -> command-line wording (applied in order)
_FLAG_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\btoken='[^']*'"), "--token SECRET"),
    (re.compile(r"\btoken=(?!\w)"), "--token"),
    (re.compile(r"\bbind 127\.0\.0\.1\b"), "--host 127.0.0.1"),
    (
        re.compile(r"\bpass an ssl_context that trusts the broker's certificate"),
        "make this machine trust the broker's certificate (e.g. SSL_CERT_FILE=ca.pem)",
    ),
    (re.compile(r"\bconnect_timeout\b"), "--connect-timeout"),
    (re.compile(r"\bbroker_url\b"), "--broker"),
    (re.compile(r"\bpeer_id\b"), "--id"),
    (re.compile(r"^(host|port|token) must\b"), r"--\1 must"),
)


def _flags(text: str) -> str:
    """A library message in command-line words: the Python keyword arguments it names
    become the flags that set them (``token=`` -> ``--token``)."""
    for pattern, replacement in _FLAG_WORDS:
        text = pattern.sub(replacement, text)
    return text


def _address(url: str) -> tuple[str, int]:
    """(host, port) of a broker URL, or a usage error naming ``--broker``."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port == -1:
        source = " (from $PEERKIT_BROKER)" if url == os.environ.get("PEERKIT_BROKER") else ""
        raise _UsageError(
            f"--broker must be a ws:// or wss:// URL such as {DEFAULT_BROKER_URL}, "
            f"got {url!r}{source}"
        )
    return parts.hostname, port if port is not None else (443 if parts.scheme == "wss" else 80)


def _reason(exc: OSError) -> str:
    """Why a TCP connection failed, in a few words ('connection refused')."""
    leaves: list[BaseException] = []
    cause: BaseException | None = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves = list(cause.exceptions)
    elif cause is not None:
        leaves = [cause]
    leaves = leaves or [exc]
    if all(isinstance(e, ConnectionRefusedError) for e in leaves):
        return "connection refused"
    first = leaves[0]
    if isinstance(first, OSError) and first.strerror:
        return first.strerror.lower()
    return str(first)


def _listen_error(exc: OSError, host: str, port: int) -> str:
    where = f"cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: the port is already in use (another broker?); stop that program, "
            "or choose another port with --port N (--port 0 picks a free one)"
        )
    if exc.errno == errno.EACCES:
        return (
            f"{where}: permission denied; use a port above 1023 with --port N "
            "(--port 0 picks a free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return (
            f"{where}: {host!r} is not an address of this machine; check --host "
            "(0.0.0.0 listens on every address, with --token)"
        )
    return f"{where}: {exc.strerror or exc}"


# ============================================================================ logging


class _ShowOnce(logging.Filter):
    """Lets each exception reach the command's log output once.

    The library logs a peer's failure with its traceback, logs the end of the peer naming
    the error again, and ``run()`` raises it to the command. This filter passes the first
    record carrying an exception (``exc_info``) and drops later records that carry or name
    the same exception. Errors the command reports itself, on one line, are held back: the
    connection errors (:data:`_QUIET`), and, while ``hide`` is set, every error and every
    record of the ``peerkit.peer`` logger (the command is still connecting, or the peer is
    the command's own, as in ``ctl`` and ``peers``: its lifecycle is not the user's
    business). At ``--log-level DEBUG`` everything passes.
    """

    _QUIET = (BrokerConnectError, BrokerLostError, HandshakeRejected)
    _PEER_LOGGER = "peerkit.peer"

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.hide = False
        self._seen: list[BaseException] = []
        self._shown: list[BaseException] = []

    def was_shown(self, exc: BaseException) -> bool:
        """Whether a record carrying ``exc`` (and its traceback) was let through."""
        return any(e is exc for e in self._shown)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if self.hide and record.name.startswith(self._PEER_LOGGER):
            if record.exc_info and record.exc_info[1] is not None:
                self._seen.append(record.exc_info[1])
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            text = record.getMessage()
            return not any(_names(text, e) for e in self._seen)
        if any(e is exc for e in self._seen):
            return False
        self._seen.append(exc)
        if self.hide or isinstance(exc, self._QUIET):
            return False
        self._shown.append(exc)
        return True


def _names(text: str, exc: BaseException) -> bool:
    return repr(exc) in text or f"{type(exc).__name__}: {exc}" in text


@contextlib.contextmanager
def _logging(level: str) -> Iterator[_ShowOnce]:
    """Log records of ``level`` and above to stderr while the command runs.

    The command owns the process, so it configures the root logger (the library never
    does); the handler is removed afterwards, so :func:`main` can be called again.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    once = _ShowOnce(verbose=level == "DEBUG")
    handler.addFilter(once)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield once
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# ============================================================================ the broker


@attrs.frozen
class _Reach:
    """How a command reaches its broker: ``--broker``, ``--wait``, ``--connect-timeout``."""

    url: str
    wait: bool
    timeout: float | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Reach:
        return cls(args.broker, args.wait, args.connect_timeout)

    @property
    def peer_timeout(self) -> float:
        """The ``connect_timeout`` a peer of this command gets (the command's own deadline
        is the one that matters; this one only has to be no shorter)."""
        return self.timeout if self.timeout is not None else DEFAULT_CONNECT_TIMEOUT


async def _listening(reach: _Reach, command: str) -> None:
    """Return once something accepts TCP connections at the broker's address.

    A refused connection is a :class:`_Failure` at once, or, with ``--wait``, the start of
    a wait announced on one line.
    """
    host, port = _address(reach.url)
    announced = False
    delay = 0.05
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except socket.gaierror as exc:
            raise _Failure(
                f"cannot resolve {host!r}, the host of --broker {reach.url}: "
                f"{exc.strerror or exc}; check the URL"
            ) from None
        except OSError as exc:
            if not reach.wait:
                raise _Failure(
                    f"no broker at {reach.url} ({_reason(exc)}); start one with "
                    "'peerkit broker', check --broker, or pass --wait to wait for it"
                ) from None
            if not announced:
                limit = "" if reach.timeout is None else f" for up to {reach.timeout:g} s"
                print(
                    f"peerkit {command}: waiting{limit} for the broker at {reach.url} "
                    f"({_reason(exc)}); Ctrl-C to give up",
                    file=sys.stderr,
                    flush=True,
                )
                announced = True
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        await trio.aclose_forcefully(stream)
        return


async def _run_quietly(peer: Peer) -> None:
    """``peer.run()``; the error that ends it stays in ``peer.error``, for the command to
    report once."""
    with contextlib.suppress(Exception):
        await peer.run()


async def _start_peer(
    nursery: trio.Nursery, peer: Peer, reach: _Reach, command: str, logs: _ShowOnce
) -> None:
    """Start ``peer`` in ``nursery``; return once it is connected, or raise :class:`_Failure`
    saying why it is not, within the time ``reach`` allows."""
    start = trio.current_time()
    if reach.timeout is not None:
        deadline = start + reach.timeout
    elif reach.wait:
        deadline = math.inf
    else:
        deadline = start + DEFAULT_CONNECT_TIMEOUT
    hide, logs.hide = logs.hide, True
    listening = False
    with trio.move_on_at(deadline) as scope:
        await _listening(reach, command)
        listening = True
        if reach.timeout is None:
            scope.deadline = trio.current_time() + DEFAULT_CONNECT_TIMEOUT
        nursery.start_soon(_run_quietly, peer)
        with contextlib.suppress(PeerkitError):  # finished before it was connected
            await peer.wait_for_state(lambda p: p.is_connected, math.inf)
    limit = reach.timeout if reach.timeout is not None else DEFAULT_CONNECT_TIMEOUT
    if scope.cancelled_caught:
        await peer.async_shutdown()
        if not listening:
            raise _Failure(
                f"no broker at {reach.url} within {limit:g} s; start one with 'peerkit "
                "broker', check --broker, or raise --connect-timeout"
            )
        raise _Failure(
            f"the server at {reach.url} accepted the connection but did not complete the "
            f"peerkit handshake within {limit:g} s; is it a peerkit broker (check --broker)? "
            "if it is only busy, raise --connect-timeout"
        )
    if not peer.is_connected:
        raise _Failure(_connect_error(peer, reach))
    logs.hide = hide


def _connect_error(peer: Peer, reach: _Reach) -> str:
    exc = peer.error
    if isinstance(exc, DuplicatePeerId):
        return (
            f"the broker at {reach.url} already has a peer {peer.peer_id!r}; choose another "
            "--id, or stop that peer first"
        )
    if isinstance(exc, HandshakeRejected) and exc.reason == "bad_token":
        what = "refused the token" if peer.token else "requires a token"
        return (
            f"the broker at {reach.url} {what}; pass its shared secret with "
            "--token SECRET or $PEERKIT_TOKEN"
        )
    if isinstance(exc, HandshakeRejected):
        return f"the broker at {reach.url} refused the peer: {_flags(str(exc))}"
    if exc is None:
        return f"the peer was shut down before it connected to {reach.url}"
    return f"cannot connect to the broker at {reach.url}: {_flags(str(exc))}"


# ============================================================================ broker


def _cmd_broker(args: argparse.Namespace) -> int:
    try:
        broker = Broker(args.host, args.port, token=args.token)
    except PeerkitError as exc:
        raise _UsageError(_flags(str(exc))) from None
    with _logging(args.log_level):
        try:
            trio.run(_serve_broker, broker, not args.no_config_server)
        except BaseException as exc:
            leaf = _single(exc)
            if isinstance(leaf, OSError):
                raise _Failure(_listen_error(leaf, args.host, args.port)) from None
            raise
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


# ============================================================================ run


def _cmd_run(args: argparse.Namespace) -> int:
    reach = _Reach.from_args(args)
    peer = _make_peer(args, reach)
    with _logging(args.log_level) as logs:
        return trio.run(_run_peer, peer, reach, logs)


def _make_peer(args: argparse.Namespace, reach: _Reach) -> Peer:
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
    kwargs.setdefault("connect_timeout", reach.peer_timeout)
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
        raise _UsageError(f"cannot create {args.target}: {_flags(str(exc))}") from None
    return peer


async def _run_peer(peer: Peer, reach: _Reach, logs: _ShowOnce) -> int:
    connected = interrupted = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                nonlocal interrupted
                async for signum in signals:
                    log.info("%s received, shutting down", signal.Signals(signum).name)
                    if connected:
                        nursery.start_soon(peer.async_shutdown)
                    else:
                        interrupted = True
                        nursery.cancel_scope.cancel()

            nursery.start_soon(on_signals)
            await _start_peer(nursery, peer, reach, "run", logs)
            connected = True
            _say("run", f"peer {peer.peer_id!r} connected to {reach.url}")
            nursery.start_soon(_say_running, peer)
            await peer.wait_finished()
            nursery.cancel_scope.cancel()
    if interrupted:
        return _INTERRUPTED
    error = peer.error
    if error is None:
        return 0
    if isinstance(error, BrokerLostError):
        _say_error("run", f"peer {peer.peer_id!r} lost the broker at {reach.url}: {error}")
    elif not logs.was_shown(error):
        _say_error("run", f"peer {peer.peer_id!r} failed: {type(error).__name__}: {error}")
    return 1


async def _say_running(peer: Peer) -> None:
    with contextlib.suppress(PeerkitError):  # the peer finished
        while True:
            await peer.wait_for_state(lambda p: p.is_running, math.inf)
            _say("run", f"peer {peer.peer_id!r} running")
            await peer.wait_for_state(lambda p: not p.is_running, math.inf)


# ============================================================================ launch


def _cmd_launch(args: argparse.Namespace) -> int:
    try:
        experiment = load_experiment(args.file)
    except ExperimentError as exc:
        raise _UsageError(str(exc)) from None
    if args.check:
        print(f"{args.file}: ok, start order: {', '.join(experiment.order)}")
        return 0
    if args.log_level is not None:
        os.environ["PEERKIT_LOG_LEVEL"] = args.log_level  # for the peer processes
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
            log_level=getattr(logging, args.log_level or "INFO"),
            dashboard=args.dashboard,
            dashboard_port=args.dashboard_port,
        )
    except PeerkitError as exc:
        raise _UsageError(_launch_flags(str(exc))) from None
    return trio.run(launcher.run)


def _launch_flags(text: str) -> str:
    for name, flag in (
        ("duration", "--duration"),
        ("ready_timeout", "--ready-timeout"),
        ("grace_period", "--grace"),
    ):
        text = re.sub(rf"^{name} must\b", f"{flag} must", text)
    return text


# ============================================================================ ctl / peers


def _cli_peer(args: argparse.Namespace, what: str, reach: _Reach) -> Peer:
    return Peer(
        args.broker,
        f"peerkit-{what}-{uuid.uuid4().hex[:8]}",
        token=args.token,
        connect_timeout=reach.peer_timeout,
        request_timeout=args.timeout,
    )


def _cmd_ctl(args: argparse.Namespace) -> int:
    reach = _Reach.from_args(args)
    peer = _cli_peer(args, "ctl", reach)

    async def ctl(logs: _ShowOnce) -> OkMsg:
        logs.hide = True  # the command's own peer: the command reports its errors
        async with trio.open_nursery() as nursery:
            await _start_peer(nursery, peer, reach, "ctl", logs)
            try:
                msg = PeerControlMessage(peer_id=args.peer_id, action=args.action)
                answer = await peer.ask_peer(args.peer_id, msg, timeout=args.timeout)
            except QueryTimeout:
                raise _Failure(
                    f"peer {args.peer_id!r} did not answer within {args.timeout:g} s; is it "
                    "busy? raise --timeout to wait longer"
                ) from None
            except NoHandlerError as exc:
                raise _Failure(f"{exc}; 'peerkit peers' lists the connected peers") from None
            except PeerkitError as exc:
                raise _Failure(_flags(str(peer.error or exc))) from None
            finally:
                await peer.async_shutdown()
        if not isinstance(answer, OkMsg):
            raise _Failure(f"peer {args.peer_id!r} answered {answer!r}, not OkMsg")
        return answer

    with _logging(args.log_level) as logs:
        answer = trio.run(ctl, logs)
    print(answer.detail or "ok")
    return 0


def _cmd_peers(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch_peers(args)
    if args.duration is not None:
        raise _UsageError("--duration goes with --watch; add --watch to watch the peers live")
    reach = _Reach.from_args(args)
    peer = _cli_peer(args, "peers", reach)

    async def peers(logs: _ShowOnce) -> BrokerInfo:
        logs.hide = True  # the command's own peer: the command reports its errors
        async with trio.open_nursery() as nursery:
            await _start_peer(nursery, peer, reach, "peers", logs)
            try:
                return await peer.broker_info()
            except PeerkitError as exc:
                raise _Failure(
                    f"the broker at {reach.url} did not list its peers: "
                    f"{_flags(str(peer.error or exc))}"
                ) from None
            finally:
                await peer.async_shutdown()

    with _logging(args.log_level) as logs:
        info = trio.run(peers, logs)
    rows = [p for p in info.peers if p.peer_id != peer.peer_id]  # not the command itself
    if args.json:
        print(json.dumps(peer_records(rows), indent=2))
    else:
        print("\n".join(peers_table(rows)))
    return 0


class _WatchPeer(Peer):
    """The peer of ``peerkit peers --watch``: says so when it got its broker back (peers
    reconnect by default), since the events of the time without it are missing."""

    async def _reconnected(self) -> None:
        _say_error(
            "peers",
            f"reconnected to the broker at {self.broker_url}; events while the connection "
            "was down are missing ('peerkit peers' lists the peers now)",
        )


def _watch_peers(args: argparse.Namespace) -> int:
    """``peerkit peers --watch``: the broker's state events, a line each, as they come."""
    reach = _Reach.from_args(args)
    peer = _WatchPeer(
        args.broker,
        f"peerkit-peers-{uuid.uuid4().hex[:8]}",
        token=args.token,
        connect_timeout=reach.peer_timeout,
        request_timeout=args.timeout,
    )

    def show(msg: StatusEvent) -> None:
        if msg.sender == peer.peer_id:  # the command itself
            return
        when = datetime.datetime.now().astimezone()
        text = json.dumps(event_record(msg, when)) if args.json else event_line(msg, when)
        print(text, flush=True)

    async def watch(logs: _ShowOnce) -> int:
        logs.hide = True  # the command's own peer: the command reports its errors
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await _start_peer(nursery, peer, reach, "peers", logs)
                try:
                    await peer.subscribe_for_all_msg_subtype(PeerJoined, show)
                    await peer.subscribe_for_all_msg_subtype(PeerStateChanged, show)
                    await peer.subscribe_for_all_msg_subtype(PeerLeft, show)
                except PeerkitError as exc:
                    await peer.async_shutdown()
                    why = _flags(str(peer.error or exc))
                    raise _Failure(f"could not watch the peers of {reach.url}: {why}") from None
                until = f" for {args.duration:g} s" if args.duration else "; Ctrl-C to stop"
                _say_error("peers", f"watching the peers of {reach.url}{until}")
                stopped = False
                with trio.move_on_after(args.duration or math.inf):
                    async with trio.open_nursery() as waits:

                        async def on_signal() -> None:
                            nonlocal stopped
                            async for _signum in signals:
                                stopped = True
                                waits.cancel_scope.cancel()

                        waits.start_soon(on_signal)
                        await peer.wait_finished()  # the broker went away
                        waits.cancel_scope.cancel()
                stopped = stopped or not peer.is_finished
                await peer.async_shutdown()
                nursery.cancel_scope.cancel()
        if stopped:
            return 0
        if peer.error is not None:
            raise _Failure(f"lost the broker at {reach.url}: {_flags(str(peer.error))}")
        _say_error("peers", f"the broker at {reach.url} shut down; the watch is over")
        return 0

    with _logging(args.log_level) as logs:
        return trio.run(watch, logs)


# ============================================================================ completion


def _cmd_completion(args: argparse.Namespace) -> int:
    from . import __version__

    script = {"bash": bash_script, "zsh": zsh_script}[args.shell]
    sys.stdout.write(script(build_parser(), __version__))
    return 0
