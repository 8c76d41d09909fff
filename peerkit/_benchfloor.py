"""The machine's floor for a round trip: bench workers on raw TCP (internal).

A query crosses four hops in three processes (asker → broker → handler → broker → asker).
These workers make the same trip with nothing but trio and a socket: 100 bytes, no
WebSocket, no envelope, no peerkit. What a round trip costs here is what the kernel and
trio's run loop cost on this machine, the part of a query's time that no code above them
can remove. The asker sleeps until the kernel reports its answer, or polls for it the way
a peer does (:func:`peerkit._ws._poll_pass`), so the two floors bracket the query figure
with and without ``busy_poll``.

Roles: ``tcp_relay`` accepts one echoer and any number of askers (each says which it is
in its first byte) and forwards every asker's bytes to the echoer and the echoer's bytes to
the asker that sent last (askers take turns); ``tcp_echo`` sends back what it gets;
``tcp_asker`` times round trips (``poll``: seconds to poll before sleeping, 0 to sleep).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import trio

from ._ws import _poll_pass

if TYPE_CHECKING:
    from ._benchworkers import _Control

__all__ = ["FLOOR_ROLES"]

_ASKER, _ECHOER = b"A", b"E"
_CHUNK = 65536


async def _recv(sock: socket.socket, poll_until: float = 0.0, size: int = _CHUNK) -> bytes:
    """What the socket has, up to ``size`` bytes (b"" at its end): sleep until it reports
    data, or poll until ``poll_until`` (a perf_counter time) first."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            if poll_until and perf_counter() < poll_until:
                await _poll_pass()
            else:
                await trio.lowlevel.wait_readable(sock)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _w_tcp_relay(cfg: dict[str, Any], ctl: _Control) -> None:
    with contextlib.ExitStack() as owned:  # the listener and every connection it accepted
        await _relay(owned, ctl)


async def _relay(owned: contextlib.ExitStack, ctl: _Control) -> None:
    listener = owned.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    echoer: list[socket.socket] = []
    asked = trio.Event()
    last: list[socket.socket] = []  # the asker that sent last

    async def from_asker(sock: socket.socket) -> None:
        await asked.wait()  # (the echoer has connected)
        while data := await _recv(sock):
            last[:] = [sock]
            await _send_all(echoer[0], data)

    async def from_echoer(sock: socket.socket) -> None:
        while data := await _recv(sock):
            if last:
                await _send_all(last[0], data)

    async def accept() -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    sock = _nonblocking(owned.enter_context(listener.accept()[0]))
                except BlockingIOError:
                    continue
                if await _recv(sock, size=1) == _ECHOER:  # its first byte: who it is
                    echoer.append(sock)
                    asked.set()
                    nursery.start_soon(from_echoer, sock)
                else:
                    nursery.start_soon(from_asker, sock)

    await _serve(ctl, accept, port=listener.getsockname()[1], pid=os.getpid())


async def _connect(port: int, role: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))  # loopback: at once
    _nonblocking(sock)
    await _send_all(sock, role)
    return sock


async def _w_tcp_echo(cfg: dict[str, Any], ctl: _Control) -> None:
    sock = await _connect(cfg["port"], _ECHOER)

    async def echo() -> None:
        while data := await _recv(sock):
            await _send_all(sock, data)

    with sock:
        await _serve(ctl, echo)


async def _serve(ctl: _Control, task: Callable[[], Awaitable[None]], **ready: Any) -> None:
    """Run ``task`` until the parent says quit (``ready``: what the ready event tells)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        ctl.emit("ready", **ready)
        while (await ctl.next())["cmd"] != "quit":
            pass
        nursery.cancel_scope.cancel()


async def _w_tcp_asker(cfg: dict[str, Any], ctl: _Control) -> None:
    from ._benchworkers import _asker_loop  # (that module imports this one)

    sock = await _connect(cfg["port"], _ASKER)
    poll = float(cfg.get("poll", 0.0))

    async def ask(payload: bytes) -> bytes:
        await _send_all(sock, payload)
        poll_until = perf_counter() + poll if poll else 0.0
        got = b""
        while len(got) < len(payload):
            data = await _recv(sock, poll_until)
            if not data:
                raise RuntimeError("the raw TCP relay closed the connection")
            got += data
        return got

    with sock:
        await _asker_loop(ctl, ask)


FLOOR_ROLES = {"tcp_relay": _w_tcp_relay, "tcp_echo": _w_tcp_echo, "tcp_asker": _w_tcp_asker}
