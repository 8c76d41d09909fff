"""The live dashboard: a web page built on the JavaScript client, served with hypercorn on
trio (``pip install 'peerkit[dashboard]'``).

``peerkit dashboard --broker URL`` (or :func:`dashboard_main`) serves, on loopback by
default:

* ``/``: the page (``peerkit/static/dashboard.html``); it shows every peer with its state
  and uptime, message rates, drops, the broker's figures, start/stop/close buttons and a
  live trace of a signal the user picks;
* ``/static/...``: the page's scripts (the client ``peerkit.js``, the vendored uPlot);
* ``/ws``: a WebSocket *bridge* to the broker. The page speaks the JSON subprotocol
  (:mod:`peerkit.jsonwire`) to the dashboard, which speaks msgpack to the broker on a
  connection of its own per page: the broker sees the page as one more (msgpack) peer,
  and the JSON work is done here, in the dashboard's process, not in the broker's. The
  page can also connect to a broker that speaks JSON itself (``?broker=ws://...``).

Access follows the broker's rule: bound to loopback, the dashboard needs no token; bound
to any other address it needs the broker's ``token``, and then the page and the bridge
refuse requests without ``?token=`` (the page passes it on to the broker in its hello).
The bridge also refuses WebSocket requests from other web sites' pages (their ``Origin``
is not the dashboard's own) and, without a token, requests for a host name that is not
the dashboard's (DNS rebinding): a page from elsewhere must not drive your peers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hmac
import importlib.resources
import logging
import os
import re
import signal
import ssl
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from importlib.resources.abc import Traversable
from typing import Any

import msgpack
import trio
import trio_websocket

from . import codec, jsonwire
from ._admission import is_loopback
from ._batching import ws_max_frame
from ._util import OwnNursery
from .codec import DEFAULT_MAX_MESSAGE_SIZE, control, pack_envelope
from .errors import DecodeError, PeerkitError
from .protocol import KIND_VALUES, Kind, RequestFailed, Welcome

__all__ = ["Dashboard", "add_arguments", "dashboard_command", "dashboard_main"]

log = logging.getLogger("peerkit.dashboard")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: the page may connect to its own bridge, or straight to a broker that speaks JSON
_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_BROKER_TIME_TYPE = "peerkit.BrokerTime"


class Dashboard(OwnNursery):
    """Serves the dashboard page and its bridge to the broker at ``broker_url``.

    ``await nursery.start(dashboard.run)`` returns once it listens; :attr:`url` is then the
    page's address (with ``?token=`` when there is a token). ``async with Dashboard(...)``
    does the same with its own nursery and stops on exit.

    ``token``: the broker's shared secret; required to bind beyond loopback.
    ``ssl_context``: client-side TLS context for a ``wss://`` broker.
    ``max_message_size``: the broker's (default 1 MiB).
    """

    def __init__(
        self,
        broker_url: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        scheme = urllib.parse.urlsplit(broker_url).scheme if isinstance(broker_url, str) else ""
        if scheme not in ("ws", "wss"):
            raise PeerkitError(
                f"the broker's URL must start with ws:// or wss://, got {broker_url!r}"
            )
        if not isinstance(host, str) or not host:
            raise PeerkitError(f"host must be a non-empty string, got {host!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise PeerkitError("token must be a non-empty string (or None on loopback)")
        if not is_loopback(host) and token is None:
            raise PeerkitError(
                f"serving the dashboard on {host!r} exposes your peers beyond this machine; "
                "pass the broker's token (token='...', --token) or bind 127.0.0.1"
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise PeerkitError(f"port must be an integer in 0..65535, got {port!r}")
        self.broker_url = broker_url
        self.host = host
        self.token = token
        self.ssl_context = ssl_context
        self.max_message_size = max_message_size
        self._port = port
        self._listening = False
        self._started = False
        self._stop = trio.Event()
        #: bridges open now (one per page)
        self.bridges = 0

    # ------------------------------------------------------------------ public
    @property
    def port(self) -> int:
        """The bound port (once listening)."""
        if not self._listening:
            raise PeerkitError("the dashboard is not listening yet; start it with nursery.start")
        return self._port

    @property
    def url(self) -> str:
        """The page's address, ``?token=...`` included when there is a token."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?token={urllib.parse.quote(self.token)}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    async def run(
        self, *, task_status: trio.TaskStatus[Dashboard] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop` or cancellation."""
        if self._started:
            raise PeerkitError("Dashboard.run() can be called only once; create a new Dashboard")
        self._started = True
        try:
            from hypercorn.config import Config
            from hypercorn.trio import serve
        except ImportError:  # pragma: no cover - the extra is part of the test set-up
            raise PeerkitError(
                "the dashboard needs hypercorn: pip install 'peerkit[dashboard]'"
            ) from None
        config = Config()
        host = f"[{self.host}]" if ":" in self.host else self.host
        config.bind = [f"{host}:{self._port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("peerkit.dashboard.http")
        config.websocket_max_message_size = 2 * ws_max_frame(self.max_message_size)
        config.graceful_timeout = 1.0

        serving = functools.partial(
            serve,
            self,  # type: ignore[arg-type]
            config,
            shutdown_trigger=self._stop.wait,
            mode="asgi",
        )
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(serving)
                self._port = urllib.parse.urlsplit(binds[0]).port or self._port
                self._listening = True
                log.info("dashboard on %s (broker %s)", self.url, self.broker_url)
                task_status.started(self)
        finally:
            self._listening = False

    def stop(self) -> None:
        """Stop serving (open pages lose their connection)."""
        self._stop.set()

    def _end_of_block(self) -> None:
        self.stop()

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _refusal(self, scope: Scope, *, page: bool) -> str | None:
        """Why a request may not have the page or the bridge, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.token is None:
            name = urllib.parse.urlsplit(f"//{host}").hostname or ""
            if name not in _LOOPBACK_NAMES and name != self.host.strip("[]"):
                return f"host {host!r} is not this dashboard's address; use {self.url}"
        else:
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return "wrong or missing token: open the address with ?token=<the broker's token>"
        origin = headers.get("origin")
        if not page and origin is not None and urllib.parse.urlsplit(origin).netloc != host:
            return f"a page from {origin} may not connect to this dashboard"
        return None

    async def _http(self, scope: Scope, send: Send) -> None:
        path: str = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"only GET here\n", "text/plain; charset=utf-8")
            return
        if path == "/":
            why = self._refusal(scope, page=True)
            if why is not None:
                await _respond(send, 403, why.encode() + b"\n", "text/plain; charset=utf-8")
                return
            name = "dashboard.html"
        elif path.startswith("/static/"):
            name = path[len("/static/") :]
        else:
            await _respond(send, 404, b"not found\n", "text/plain; charset=utf-8")
            return
        resource = _static(name)
        if resource is None:
            await _respond(send, 404, b"not found\n", "text/plain; charset=utf-8")
            return
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        body = resource.read_bytes()
        await _respond(
            send,
            200,
            b"" if scope["method"] == "HEAD" else body,
            _CONTENT_TYPES.get(suffix, "application/octet-stream"),
        )

    # ------------------------------------------------------------------ bridge
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        why = (
            self._refusal(scope, page=False)
            if scope["path"] == "/ws"
            else f"no WebSocket at {scope['path']}; the bridge is /ws"
        )
        if why is None and jsonwire.SUBPROTOCOL not in scope.get("subprotocols", ()):
            why = f"the bridge speaks the {jsonwire.SUBPROTOCOL} subprotocol only"
        if why is not None:
            log.warning("refused a WebSocket: %s", why)
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            return
        async with trio.open_nursery() as nursery:
            try:
                stream = await self._open_stream()
            except (OSError, trio.BrokenResourceError) as exc:
                log.warning("bridge: the broker at %s is not reachable: %s", self.broker_url, exc)
                await send({"type": "websocket.close", "code": 1011})
                return
            try:
                await self._bridge(nursery, stream, receive, send)
            finally:
                # trio-websocket leaves a client's stream open when the server closed
                # first: the stream is ours, so close it here in any case
                await trio.aclose_forcefully(stream)

    async def _open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        url = urllib.parse.urlsplit(self.broker_url)
        host = url.hostname or "127.0.0.1"
        tcp = await trio.open_tcp_stream(host, url.port or (443 if url.scheme == "wss" else 80))
        if url.scheme != "wss":
            return tcp
        context = self.ssl_context or ssl.create_default_context()
        return trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)

    async def _bridge(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        receive: Receive,
        send: Send,
    ) -> None:
        url = urllib.parse.urlsplit(self.broker_url)
        try:
            upstream = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                url.netloc,
                (url.path or "/") + (f"?{url.query}" if url.query else ""),
                max_message_size=ws_max_frame(self.max_message_size),
                message_queue_size=64,
                receive_buffer_size=256 * 1024,
            )
        except (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError) as exc:
            log.warning("bridge: the broker at %s refused: %s", self.broker_url, exc)
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept", "subprotocol": jsonwire.SUBPROTOCOL})
        self.bridges += 1
        try:
            bridge = _Bridge(upstream, send, self.max_message_size)
            nursery.start_soon(bridge.downstream, nursery.cancel_scope)
            await bridge.upstream(receive)
        finally:
            self.bridges -= 1
            with trio.move_on_after(1.0) as cs:  # (its reader task must still run)
                cs.shield = True
                await upstream.aclose()
            nursery.cancel_scope.cancel()


class _Bridge:
    """One page's connection to the broker: JSON text on the page's side, msgpack frames
    on the broker's."""

    def __init__(
        self, up: trio_websocket.WebSocketConnection, send: Send, max_message_size: int
    ) -> None:
        self.up = up
        self.send = send
        self.max_size = max_message_size
        #: the broker answers TIME itself once its protocol has the kind
        self.broker_has_time = jsonwire.TIME in KIND_VALUES

    async def upstream(self, receive: Receive) -> None:
        """Page → broker, until the page goes away."""
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            text = event.get("text")
            if text is None:  # a binary message: msgpack already
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await self.up.send_message(event.get("bytes") or b"")
                continue
            try:
                envelopes = jsonwire.json_envelopes(text)
            except DecodeError as exc:
                await self._to_page(
                    control(Kind.ERROR, RequestFailed(code="bad_frame", detail=str(exc)))
                )
                continue
            if not self.broker_has_time:
                for env in envelopes:
                    if env.kind == jsonwire.TIME:
                        await self._to_page(_time_reply(env.corr))
                envelopes = [e for e in envelopes if e.kind != jsonwire.TIME]
            if envelopes:
                frame = jsonwire.envelopes_to_frame(envelopes, self.max_size)
                try:
                    await self.up.send_message(frame)
                except trio_websocket.ConnectionClosed:
                    return

    async def downstream(self, done: trio.CancelScope) -> None:
        """Broker → page, until the broker closes; then the page's connection closes with
        the broker's code and reason."""
        first = True
        while True:
            try:
                frame = await self.up.get_message()
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
                code = reason.code if reason is not None and reason.code else 1000
                with contextlib.suppress(Exception):
                    await self.send(
                        {
                            "type": "websocket.close",
                            "code": code if 1000 <= code < 5000 and code != 1006 else 1011,
                            "reason": (reason.reason or "" if reason is not None else "")[:120],
                        }
                    )
                done.cancel()
                return
            if isinstance(frame, str):
                continue  # the broker never sends text
            if first:
                first = False
                self._learn_limits(frame)
            await self._to_page(frame)

    def _learn_limits(self, frame: bytes) -> None:
        with contextlib.suppress(DecodeError, StopIteration):
            env = next(codec.iter_envelopes(frame))
            if env.kind == Kind.WELCOME:
                welcome = codec.decode_body(Welcome, env.body)
                assert isinstance(welcome, Welcome)
                self.max_size = welcome.max_message_size

    async def _to_page(self, frame: bytes) -> None:
        await self.send({"type": "websocket.send", "text": jsonwire.frame_to_json(frame)})


def _time_reply(corr: int) -> bytes:
    """What the broker will answer a TIME request with (until it does: the dashboard's own
    clock, the same machine's when the launcher runs both)."""
    body = msgpack.packb({"time": time.time()})
    return pack_envelope(int(Kind.REPLY), _BROKER_TIME_TYPE, "broker", corr, "", body)


def _static(name: str) -> Traversable | None:
    """The file ``name`` under ``peerkit/static``, or None (no way out of that folder)."""
    if not _STATIC_NAME.fullmatch(name) or ".." in name:
        return None
    resource = importlib.resources.files("peerkit") / "static"
    for part in name.split("/"):
        resource = resource / part
    return resource if resource.is_file() else None


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]
    if content_type.startswith("text/html"):
        headers.append((b"content-security-policy", _CSP.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peerkit dashboard`` (for the ``peerkit`` command's subparser)."""
    parser.add_argument("--broker", metavar="URL", required=True, help="the broker's ws:// URL")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8766, help="port to bind, 0 for any free one (default: 8766)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("PEERKIT_TOKEN"),
        help="the broker's shared secret; required to bind beyond loopback "
        "(default: $PEERKIT_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``peerkit dashboard``."""
    parser = argparse.ArgumentParser(
        prog="peerkit dashboard", description=DESCRIPTION, allow_abbrev=False
    )
    add_arguments(parser)
    return parser


#: What ``peerkit dashboard --help`` says first.
DESCRIPTION = (
    "Serve the live dashboard of a broker's peers (a web page) until Ctrl-C or SIGTERM. "
    "The first line printed is 'peerkit dashboard on URL'."
)


def dashboard_main(argv: Sequence[str] | None = None) -> int:
    """``peerkit dashboard``: serve the dashboard until Ctrl-C; returns the exit status."""
    return dashboard_command(build_parser().parse_args(argv))


def dashboard_command(args: argparse.Namespace) -> int:
    """Run ``peerkit dashboard`` with parsed arguments (see :func:`add_arguments`)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        dashboard = Dashboard(args.broker, args.host, args.port, token=args.token)
    except PeerkitError as exc:
        print(f"peerkit dashboard: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with dashboard:
                print(f"peerkit dashboard on {dashboard.url}", flush=True)
                async for _ in signals:
                    break

    try:
        trio.run(serve)
    except (OSError, PeerkitError) as exc:
        print(f"peerkit dashboard: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
