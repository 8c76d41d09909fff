"""The peer's side of the broker connection: connect and handshake, the batching writer,
the reader, heartbeats and request/answer round trips (internal)."""

from __future__ import annotations

import ssl
import sys
import urllib.parse
from collections.abc import Awaitable
from time import perf_counter
from typing import Any

import trio

from . import _ws, codec
from ._peer_base import (
    _DROPPED_TYPE,
    _PEER_WS_MAX_FRAME,
    PeerBase,
    _never_run,
    _Pending,
    log,
)
from ._wsconf import MAX_BATCH, Run, batch_limit, take_frame
from .codec import Envelope, control, pack_envelope
from .errors import (
    BrokerConnectError,
    BrokerLostError,
    BrokerRequestError,
    DecodeError,
    DuplicatePeerId,
    HandlerAlreadyRegistered,
    HandshakeRejected,
    QueryTimeout,
)
from .messages import MessagesDropped
from .protocol import PROTOCOL_VERSION, Hello, Kind, Reject, RequestFailed, Welcome
from .protocol import PUB as _PUB


def _mock_clock() -> bool:
    """Whether trio runs on a :class:`trio.testing.MockClock` (without importing
    ``trio.testing``, which imports pytest where it is installed: a tenth of a second at
    every peer's start; no MockClock exists unless that module was imported)."""
    testing = sys.modules.get("trio.testing")
    return testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)


class PeerLink(PeerBase):
    """Moves envelopes between the peer and its broker."""

    def _query_error(self, env: Envelope, code: str, detail: str) -> None:
        raise NotImplementedError  # pragma: no cover - PeerMessaging provides it

    def _start_answer(self, env: Envelope) -> Awaitable[Any] | None:
        raise NotImplementedError  # pragma: no cover - PeerMessaging provides it

    async def _open_websocket(self) -> _ws.WebSocket:
        url = urllib.parse.urlsplit(self.broker_url)
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if url.scheme == "wss" else 80)
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        if url.scheme == "wss":
            context = self.ssl_context or ssl.create_default_context()
            tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(tcp)
                raise BrokerConnectError(
                    f"TLS handshake with the broker at {self.broker_url} failed: "
                    f"{exc.__cause__ or exc}; pass an ssl_context that trusts the broker's "
                    "certificate"
                ) from exc
            stream = tls
        resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
        return await _ws.connect(
            stream, url.netloc, resource, _PEER_WS_MAX_FRAME, close_timeout=self.grace_period
        )

    async def _connect(self, nursery: trio.Nursery) -> None:
        deadline = trio.current_time() + self.connect_timeout
        delay = 0.05
        last_error: BaseException | None = None
        with trio.move_on_at(deadline) as scope:
            while True:
                try:
                    ws = await self._open_websocket()
                    break
                except (OSError, trio.BrokenResourceError, _ws.HandshakeError) as exc:
                    if isinstance(exc, _ws.ConnectionRejected):
                        raise BrokerConnectError(
                            f"the server at {self.broker_url} refused the WebSocket connection "
                            f"(HTTP {exc.status_code}); is it a peerkit broker?"
                        ) from exc
                    log.debug("broker at %s not reachable yet: %s", self.broker_url, exc)
                    last_error = exc
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
            self._ws = ws
            hello = Hello(
                peer_id=self.peer_id, protocol_version=PROTOCOL_VERSION, token=self.token or ""
            )
            try:
                await ws.send_message(control(Kind.HELLO, hello))
                frame = await ws.get_message()
            except _ws.ConnectionClosed as exc:
                raise BrokerConnectError(
                    f"the broker at {self.broker_url} closed the connection during the "
                    f"handshake: {exc.reason}"
                ) from None
            envs = list(codec.iter_envelopes(frame))  # type: ignore[arg-type]
            if not envs:
                raise BrokerConnectError("empty handshake answer from the broker")
            first = envs[0]
            if first.kind == Kind.REJECT:
                reject = codec.decode_body(Reject, first.body)
                assert isinstance(reject, Reject)
                cls = DuplicatePeerId if reject.reason == "duplicate_id" else HandshakeRejected
                raise cls(reject.reason, f"the broker rejected {self.peer_id!r}: {reject.detail}")
            if first.kind != Kind.WELCOME:
                raise BrokerConnectError(f"unexpected handshake answer {Kind(first.kind).name}")
            welcome = codec.decode_body(Welcome, first.body)
            assert isinstance(welcome, Welcome)
            self._welcome = welcome
            self._max_message_size = welcome.max_message_size
            self._heard = trio.current_time()
            for env in envs[1:]:
                self._handle(env)
            return
        if scope.cancelled_caught:
            detail = f": {last_error}" if last_error is not None else ""
            raise BrokerConnectError(
                f"could not connect to the broker at {self.broker_url} within "
                f"{self.connect_timeout} s{detail}; is it running? (raise connect_timeout "
                "to wait longer)"
            )

    def _push(self, data: bytes) -> None:
        """Send a packed envelope: at once when nothing waits to go out (a query, a reply or
        a request need not wait for the writer task's turn), else after what is queued."""
        self._enqueued += 1
        ws = self._ws
        if not self._out and ws is not None and ws.can_send_now():
            ws.send_nowait(data)
            self._sent += 1
            if ws.backlog:  # the kernel took part of it: the writer finishes the job
                self._out_ready.set()
            return
        self._tail = None
        self._out.append(data)
        self._out_ready.set()

    def _queue_publish(self, msg_type: str, body: bytes) -> None:
        """Queue one message to publish: it joins the run at the tail of the queue when
        that run has its type and room (:data:`MAX_BATCH` messages, one body's size)."""
        run = self._tail
        if (
            run is not None
            and run.type == msg_type
            and run.size + len(body) <= self._max_message_size
            and len(run.bodies) < MAX_BATCH
        ):
            run.bodies.append(body)
            run.size += len(body)
        else:
            self._out.append(run := Run(msg_type, body))
            self._tail = run
        self._enqueued += 1
        self._out_ready.set()

    async def _flush(self) -> None:
        target = self._enqueued
        while self._sent < target and self._link_ok:
            await self._progress.park()

    async def _writer(self) -> None:
        assert self._ws is not None
        ws = self._ws
        out = self._out
        limit = batch_limit(self._max_message_size)
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            if ws.backlog and not out:
                await ws.flush()
            while out:
                frame, count, published = take_frame(out, limit)
                if not out:  # the tail run is packed: the next message starts another
                    self._tail = None
                await ws.send_message(frame)
                self._sent += count
                self.msgs_out += published
                self._progress.unpark_all()

    async def _heartbeat(self) -> None:
        """Send a heartbeat when the peer said nothing for an interval, and give the broker
        up when it said nothing for the heartbeat timeout (the reader notes each frame)."""
        assert self._welcome is not None
        interval = self._welcome.heartbeat_interval
        timeout = self._welcome.heartbeat_timeout
        beat = pack_envelope(int(Kind.HEARTBEAT))
        last = self._enqueued
        next_beat = trio.current_time() + interval
        while True:
            await trio.sleep_until(min(next_beat, self._heard + timeout))
            now = trio.current_time()
            if now - self._heard >= timeout:
                raise BrokerLostError(
                    f"no word from the broker at {self.broker_url} for {timeout} s"
                )
            if now >= next_beat:
                if self._enqueued == last:
                    self._push(beat)
                last = self._enqueued
                next_beat = now + interval

    async def _reader(self) -> None:
        """Read and handle the broker's frames, except while a caller that waits for an
        answer reads them itself (:meth:`_read_until`)."""
        assert self._ws is not None
        ws = self._ws
        while True:
            if self._caller_reads:
                await self._reads_back.wait()
                continue
            with trio.CancelScope() as self._read_scope:  # a caller takes over: cancelled
                while True:
                    self._on_frame(await ws.get_message())  # a cancelled read reads nothing

    def _on_frame(self, frame: bytes | str) -> None:
        self._heard = trio.current_time()
        try:
            for env in codec.iter_envelopes(frame):  # type: ignore[arg-type]
                self._handle(env)
        except DecodeError as exc:
            log.error("peer %r: bad frame from the broker: %s", self.peer_id, exc)
        if self._local_drops:
            count, self._local_drops = self._local_drops, 0
            self._messages_dropped(count)

    async def _read_until(self, pending: _Pending) -> None:
        """Wait for ``pending``'s answer by reading the connection in this task.

        Were the reader task to read it, the answer would reach this task one scheduling
        pass later, and on a small VM a pass after an idle wait costs tens of microseconds:
        a query's round trip was that much longer. So a lone caller that waits takes the
        reading over; it handles every frame as the reader would (in order, nothing
        skipped) and hands the reading back once its answer came, or it was cancelled, or
        the connection closed (the reader task then sees that). Only where a cancelled read
        leaves the connection intact (plain TCP): taking over cancels the reader's read.

        For its first ``busy_poll`` seconds the wait polls the connection instead of
        sleeping (cooperatively: see :func:`peerkit._ws._poll_pass`), so that a fast answer
        arrives without an idle CPU's wake-up in the way; not while the process has other
        tasks to run, nor under a :class:`trio.testing.MockClock`.
        """
        ws = self._ws
        if self._caller_reads or ws is None or not ws.reads_survive_cancellation:
            await pending.event.wait()  # the reader (or the caller reading) serves us
            return
        self._caller_reads = True
        if self._read_scope is not None:
            self._read_scope.cancel()
        poll_until = (
            perf_counter() + self.busy_poll
            if self.busy_poll and not _mock_clock()
            else 0.0  # (under a mock clock, time would stand still while it polls)
        )
        try:
            while not pending.event.is_set():
                frame = await ws.get_message(poll_until)
                try:
                    self._on_frame(frame)
                except Exception as exc:  # as in the reader task: the peer fails
                    self._fail(exc)
                    raise
        except _ws.ConnectionClosed:
            pass
        finally:
            self._caller_reads = False
            back, self._reads_back = self._reads_back, trio.Event()
            back.set()
        if not pending.event.is_set():  # the connection closed: the peer ends it
            await pending.event.wait()

    def _handle(self, env: Envelope) -> None:
        kind = env.kind
        if kind == _PUB:
            self.msgs_in += env.corr
            if self._can_send or not self.is_shutting_down:  # the flag: the cheap test first
                self._deliver(env)
        elif kind in (Kind.ACK, Kind.NACK, Kind.REPLY, Kind.QERR):
            pending = self._pending.get(env.corr)
            if pending is not None:
                pending.envelope = env
                pending.event.set()
        elif kind == Kind.QUERY:
            if self.is_shutting_down:
                self._query_error(env, "handler_gone", f"peer {self.peer_id!r} is shutting down")
                return
            # a plain handler answers here and now; an async one goes on to a query worker
            rest = self._start_answer(env)
            if rest is None:
                return
            try:
                self._query_send.send_nowait((env, rest))
            except trio.WouldBlock:
                _never_run(rest)
                self._query_error(
                    env,
                    "busy",
                    f"peer {self.peer_id!r} has too many queries "
                    "in progress; raise max_concurrent_queries or retry",
                )
        elif kind == Kind.HEARTBEAT:
            pass
        elif kind == Kind.DROPPED:
            try:
                dropped = codec.decode_body(MessagesDropped, env.body)
                assert isinstance(dropped, MessagesDropped)
                count = dropped.count
            except DecodeError:
                count = 0
            self.dropped_messages += count
            self._messages_dropped(count)
            if _DROPPED_TYPE in self._subs:
                self._deliver(env._replace(kind=_PUB, type=_DROPPED_TYPE, sender="broker", corr=1))
        elif kind == Kind.SHUTDOWN:
            log.info("peer %r: the broker is shutting down", self.peer_id)
            self._request_shutdown("the broker is shutting down")
        elif kind == Kind.ERROR:
            try:
                failure = codec.decode_body(RequestFailed, env.body)
                assert isinstance(failure, RequestFailed)
                text = f"{failure.code}: {failure.detail}"
            except DecodeError:
                text = "(unreadable error)"
            log.error("peer %r: the broker refused something we sent: %s", self.peer_id, text)
        else:
            log.error(
                "peer %r: unexpected envelope %s from the broker", self.peer_id, Kind(kind).name
            )

    def _deliver(self, item: Envelope) -> None:
        """Queue an incoming run of messages for the handlers; what does not fit in
        ``receive_queue_size`` messages is dropped and counted."""
        count = item.corr
        body, kept = codec.fit_run(item.body, count, self.receive_queue_size - self._inbox_count)
        if kept < count:
            self.dropped_messages += count - kept
            self._local_drops += count - kept  # reported once per frame by the reader
            if not kept:
                return
            item = item._replace(corr=kept, body=body)
        self._inbox_count += kept
        self._inbox.append(item)
        self._inbox_ready.set()

    async def _request(
        self, kind: Kind, type_name: str, *, target: str = "", body: bytes = b""
    ) -> None:
        env = await self._roundtrip(
            kind, type_name, target, body, self.request_timeout, what=f"{kind.name} request"
        )
        if env.kind == Kind.NACK:
            failure = codec.decode_body(RequestFailed, env.body)
            assert isinstance(failure, RequestFailed)
            cls = (
                HandlerAlreadyRegistered
                if failure.code == "already_registered"
                else BrokerRequestError
            )
            raise cls(failure.code, failure.detail)

    async def _roundtrip(
        self, kind: Kind, type_name: str, target: str, body: bytes, timeout: float, *, what: str
    ) -> Envelope:
        corr = self._next_corr
        self._next_corr += 1
        pending = _Pending()
        self._pending[corr] = pending
        self._push(pack_envelope(int(kind), type_name, "", corr, target, body))
        try:
            with trio.move_on_after(timeout):
                await self._read_until(pending)
        finally:
            self._pending.pop(corr, None)
            if pending.envelope is None and kind == Kind.QUERY and self._link_ok:
                self._push(pack_envelope(int(Kind.QCANCEL), "", "", corr))
        if pending.error is not None:
            raise pending.error
        if pending.envelope is None:
            if kind == Kind.QUERY:
                raise QueryTimeout(f"{what}: no answer within {timeout} s")
            raise BrokerLostError(f"{what}: the broker did not answer within {timeout} s")
        return pending.envelope
