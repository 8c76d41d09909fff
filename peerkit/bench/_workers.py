"""The benchmark's worker processes: ``python -m peerkit.bench worker ROLE CONFIG-JSON``.

A worker is one broker, relay, publisher, subscriber, query handler, asker or crowd of
peers. Commands arrive as JSON lines on its stdin (``{"cmd": ...}``) and events leave as
JSON lines on its stdout (``{"event": ...}``). A worker exits at once when its stdin reaches
end-of-file (the parent is gone) and has a hard timeout (a watchdog thread).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio_websocket

from ..broker import Broker
from ..peer import Peer
from ._stats import (
    HEAD,
    SMALL,
    BenchMsg,
    BenchQuery,
    BenchReply,
    RunCounter,
    make_payload,
    percentile,
    read_payload,
)

__all__ = ["LineReader", "worker_main"]


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk


class _Control:
    """A worker's side of the conversation with the parent."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](100)

    async def pump(self) -> None:
        """Read commands from stdin; exit the process at once when the parent is gone."""
        reader = LineReader(trio.lowlevel.FdStream(os.dup(0)))
        while True:
            line = await reader.readline()
            if line is None:
                os._exit(0)  # the parent closed our stdin or died: leave no leftover
            if line.strip():
                await self._send.send(json.loads(line))

    async def next(self) -> dict[str, Any]:
        return await self._recv.receive()

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


async def _await_run(
    counter: RunCounter, dropped: Callable[[], int], start_timeout: float, idle_timeout: float
) -> dict[str, Any]:
    """Wait until ``expected`` messages arrived or were reported dropped, or stalled."""
    base = dropped()
    last_total = 0
    last_change = time.monotonic()
    while True:
        lost = dropped() - base
        total = counter.count + lost
        if total >= counter.expected:
            return counter.result(lost, complete=True)
        now = time.monotonic()
        if total != last_total:
            last_total, last_change = total, now
        if now - last_change > (idle_timeout if total else start_timeout):
            return counter.result(lost, complete=False)
        await trio.sleep(0.05)


async def _w_broker(cfg: dict[str, Any], ctl: _Control) -> None:
    broker = Broker("127.0.0.1", 0, **cfg.get("options", {}))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        ctl.emit("ready", url=broker.url, pid=os.getpid())
        while True:
            cmd = await ctl.next()
            if cmd["cmd"] == "status":
                ids = set(broker.peer_ids)
                ctl.emit(
                    "status", peers=len(ids), present=[p for p in cmd.get("ids", []) if p in ids]
                )
            elif cmd["cmd"] == "quit":
                nursery.cancel_scope.cancel()
                return


async def _subscriber_loop(
    ctl: _Control, counter: RunCounter, dropped: Callable[[], int], cfg: dict[str, Any]
) -> None:
    ctl.emit("ready")
    while True:
        cmd = await ctl.next()
        if cmd["cmd"] == "arm":
            counter.arm(cmd["run"], cmd["expected"], latency=cmd.get("latency", False))
            ctl.emit("armed")
            res = await _await_run(
                counter, dropped, cfg.get("start_timeout", 30.0), cfg.get("idle_timeout", 3.0)
            )
            ctl.emit("result", **res)
        elif cmd["cmd"] == "quit":
            return


async def _w_sub(cfg: dict[str, Any], ctl: _Control) -> None:
    """A subscriber; ``delivery`` chooses its guarantee, ``work_us`` makes its handler
    spend that long on each message (a subscriber slower than its publisher)."""
    counter = RunCounter()
    work = float(cfg.get("work_us", 0.0)) / 1e6
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        def on_msg(msg: BenchMsg) -> None:
            counter.feed(msg.payload)

        def on_msg_slowly(msg: BenchMsg) -> None:
            counter.feed(msg.payload)
            end = time.perf_counter() + work
            while time.perf_counter() < end:
                pass

        await peer.subscribe_for_all_msg_subtype(
            BenchMsg, on_msg_slowly if work else on_msg, delivery=cfg.get("delivery", "drop")
        )
        await _subscriber_loop(ctl, counter, lambda: peer.dropped_messages, cfg)


async def _w_bare_sub(cfg: dict[str, Any], ctl: _Control) -> None:
    counter = RunCounter()
    async with trio_websocket.open_websocket_url(cfg["url"] + "/sub") as ws:
        if await ws.get_message() != b"ok":
            raise RuntimeError("the relay did not acknowledge the subscriber")

        async def receive() -> None:
            while True:
                frame = await ws.get_message()
                counter.feed(frame)  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await _subscriber_loop(ctl, counter, lambda: 0, cfg)
            nursery.cancel_scope.cancel()


async def _publisher_loop(
    ctl: _Control,
    send: Callable[[bytes], Awaitable[None]],
    send_many: Callable[[int, int, int], Awaitable[None]],
) -> None:
    """``send(payload)`` publishes one message; ``send_many(run, count, size)`` publishes
    ``count`` as fast as it can (a tight loop without an extra coroutine per message)."""
    ctl.emit("ready")
    while True:
        cmd = await ctl.next()
        if cmd["cmd"] == "publish":
            t0 = time.monotonic()
            await send_many(cmd["run"], cmd["count"], cmd["size"])
            ctl.emit("published", seconds=time.monotonic() - t0)
        elif cmd["cmd"] == "lone":
            run, count, size, interval = cmd["run"], cmd["count"], cmd["size"], cmd["interval"]
            for seq in range(count):
                await trio.sleep(interval)
                await send(make_payload(run, seq, size, time.monotonic()))
            ctl.emit("published", seconds=0.0)
        elif cmd["cmd"] == "quit":
            return


async def _w_pub(cfg: dict[str, Any], ctl: _Control) -> None:
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        async def send(payload: bytes) -> None:
            await peer.send_message(BenchMsg(payload=payload))

        async def send_many(run: int, count: int, size: int) -> None:
            pad = bytes(max(0, size - HEAD.size))
            pack, send_message = HEAD.pack, peer.send_message
            for seq in range(count):
                await send_message(BenchMsg(payload=pack(run, seq, 0.0) + pad))

        await _publisher_loop(ctl, send, send_many)


async def _w_bare_pub(cfg: dict[str, Any], ctl: _Control) -> None:
    async with trio_websocket.open_websocket_url(cfg["url"] + "/pub") as ws:

        async def send_many(run: int, count: int, size: int) -> None:
            pad = bytes(max(0, size - HEAD.size))
            pack, send_message = HEAD.pack, ws.send_message
            for seq in range(count):
                await send_message(pack(run, seq, 0.0) + pad)

        await _publisher_loop(ctl, ws.send_message, send_many)


async def _w_relay(cfg: dict[str, Any], ctl: _Control) -> None:
    """A bare trio-websocket relay, one message per frame: each frame from ``/pub`` goes to
    every ``/sub`` connection; each frame from an ``/rpc`` connection goes to every other
    ``/rpc`` connection (a request/echo round trip, the baseline of the query figure)."""
    groups: dict[str, list[trio_websocket.WebSocketConnection]] = {"/sub": [], "/rpc": []}

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        path = request.path
        members = groups.get(path)
        if members is not None:
            members.append(ws)
            await ws.send_message(b"ok")
        try:
            while True:
                frame = await ws.get_message()
                if path == "/pub":
                    for sub in groups["/sub"]:
                        await sub.send_message(frame)
                elif path == "/rpc":
                    for other in groups["/rpc"]:
                        if other is not ws:
                            await other.send_message(frame)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            if members is not None:
                members.remove(ws)

    async with trio.open_nursery() as nursery:
        server: trio_websocket.WebSocketServer = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
        )
        ctl.emit("ready", url=f"ws://127.0.0.1:{server.port}", pid=os.getpid())
        while (await ctl.next())["cmd"] != "quit":
            pass
        nursery.cancel_scope.cancel()


async def _w_bare_echo(cfg: dict[str, Any], ctl: _Control) -> None:
    async with trio_websocket.open_websocket_url(cfg["url"] + "/rpc") as ws:
        if await ws.get_message() != b"ok":
            raise RuntimeError("the relay did not acknowledge the echo")

        async def echo() -> None:
            while True:
                await ws.send_message(await ws.get_message())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            ctl.emit("ready")
            while (await ctl.next())["cmd"] != "quit":
                pass
            nursery.cancel_scope.cancel()


async def _w_qhandler(cfg: dict[str, Any], ctl: _Control) -> None:
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        def answer(msg: BenchQuery) -> BenchReply:
            return BenchReply(payload=msg.payload)

        await peer.register_query_handler(BenchQuery, answer)
        ctl.emit("ready")
        while (await ctl.next())["cmd"] != "quit":
            pass


async def _asker_loop(ctl: _Control, ask: Callable[[bytes], Awaitable[bytes]]) -> None:
    ctl.emit("ready")
    while True:
        cmd = await ctl.next()
        if cmd["cmd"] == "query":
            payload = make_payload(cmd["run"], 0, cmd["size"])
            rtts: list[float] = []
            clock = time.perf_counter
            for _ in range(cmd["count"]):
                t0 = clock()
                reply = await ask(payload)
                rtts.append(clock() - t0)
                if reply != payload:
                    raise RuntimeError(f"wrong reply {reply!r}")
            ms = [x * 1000.0 for x in rtts]
            ctl.emit(
                "result",
                count=len(ms),
                median_ms=statistics.median(ms),
                p99_ms=percentile(ms, 99),
                mean_ms=statistics.fmean(ms),
                max_ms=max(ms),
            )
        elif cmd["cmd"] == "quit":
            return


async def _w_asker(cfg: dict[str, Any], ctl: _Control) -> None:
    async with Peer(cfg["url"], cfg["peer_id"]) as peer:

        async def ask(payload: bytes) -> bytes:
            reply = await peer.query(BenchQuery(payload=payload))
            if not isinstance(reply, BenchReply):
                raise RuntimeError(f"wrong reply {reply!r}")
            return reply.payload

        await _asker_loop(ctl, ask)


async def _w_bare_asker(cfg: dict[str, Any], ctl: _Control) -> None:
    async with trio_websocket.open_websocket_url(cfg["url"] + "/rpc") as ws:
        if await ws.get_message() != b"ok":
            raise RuntimeError("the relay did not acknowledge the asker")

        async def ask(payload: bytes) -> bytes:
            await ws.send_message(payload)
            reply = await ws.get_message()
            assert isinstance(reply, bytes)
            return reply

        await _asker_loop(ctl, ask)


async def _w_crowd(cfg: dict[str, Any], ctl: _Control) -> None:
    """Many peers in one process: connect them all at once when told to."""
    n, prefix = cfg["peers"], cfg["prefix"]
    peers = [Peer(cfg["url"], f"{prefix}-{i}", connect_timeout=120.0) for i in range(n)]
    errors: list[str] = []
    got = trio.Event()
    latency: list[float] = []

    async def run_one(p: Peer) -> None:
        try:
            await p.run()
        except Exception as exc:
            errors.append(f"{p.peer_id}: {type(exc).__name__}: {exc}")

    def on_msg(msg: BenchMsg) -> None:
        latency.append(time.monotonic() - read_payload(msg.payload)[2])
        got.set()

    ctl.emit("loaded", pid=os.getpid())
    async with trio.open_nursery() as nursery:
        while True:
            cmd = await ctl.next()
            if cmd["cmd"] == "connect":
                t0 = time.monotonic()
                for p in peers:
                    nursery.start_soon(run_one, p)
                with trio.move_on_after(cfg.get("ready_timeout", 120.0)):
                    for p in peers:
                        await p.wait_for_state(lambda q: q.is_ready or q.is_finished, 1e9)
                t1 = time.monotonic()
                ready = sum(1 for p in peers if p.is_ready)
                ctl.emit("ready", t0=t0, t1=t1, ready=ready, errors=errors[:3], failed=len(errors))
            elif cmd["cmd"] == "check":
                connected = sum(1 for p in peers if p.is_connected)
                ctl.emit("checked", connected=connected, failed=len(errors), errors=errors[:3])
            elif cmd["cmd"] == "subscribe":
                await peers[0].subscribe_for_all_msg_subtype(BenchMsg, on_msg)
                ctl.emit("subscribed")

                async def report() -> None:
                    await got.wait()
                    ctl.emit("received", latency_ms=latency[0] * 1000.0)

                nursery.start_soon(report)
            elif cmd["cmd"] == "publish":
                await peers[-1].send_message(
                    BenchMsg(payload=make_payload(0, 0, SMALL, time.monotonic()))
                )
                ctl.emit("published")
            elif cmd["cmd"] == "freeze":
                # Block the whole process (no heartbeat, no reading) like a hung program,
                # then vanish; unlike SIGSTOP this cannot leave a stopped orphan behind.
                ctl.emit("freezing")
                time.sleep(cmd["seconds"])  # noqa: ASYNC251
                os._exit(0)
            elif cmd["cmd"] == "quit":
                nursery.cancel_scope.cancel()
                return


_ROLES: dict[str, Callable[[dict[str, Any], _Control], Awaitable[None]]] = {
    "broker": _w_broker,
    "sub": _w_sub,
    "pub": _w_pub,
    "relay": _w_relay,
    "bare_sub": _w_bare_sub,
    "bare_pub": _w_bare_pub,
    "qhandler": _w_qhandler,
    "asker": _w_asker,
    "bare_echo": _w_bare_echo,
    "bare_asker": _w_bare_asker,
    "crowd": _w_crowd,
}


async def _worker(role: str, cfg: dict[str, Any]) -> None:
    ctl = _Control()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctl.pump)
        await _ROLES[role](cfg, ctl)
        nursery.cancel_scope.cancel()


def worker_main(role: str, cfg_json: str) -> int:
    cfg: dict[str, Any] = json.loads(cfg_json)
    limit = float(cfg.get("hard_timeout", 600.0))

    def hard_exit() -> None:
        sys.stderr.write(f"bench worker {role}: hard timeout of {limit} s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    watchdog = threading.Timer(limit, hard_exit)
    watchdog.daemon = True
    watchdog.start()
    # A subscriber that overflows logs one warning per lost message; the bench counts the
    # losses itself, and writing thousands of log lines would distort the figures.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if role not in _ROLES:
        sys.stderr.write(f"unknown worker role {role!r}\n")
        return 2
    try:
        trio.run(_worker, role, cfg)
    except BaseException as exc:
        traceback.print_exc()
        _Control.emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0
