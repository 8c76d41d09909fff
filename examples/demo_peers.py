"""The peers of the demo experiment (``examples/demo.toml``).

* :class:`SyntheticAmplifier` publishes a synthetic multichannel signal in chunks;
* :class:`LowPassFilter` takes its sampling rate from the amplifier (an external parameter),
  filters every chunk and republishes it;
* :class:`Recorder` writes what it receives to a file in the run directory and, at shutdown,
  reports the samples it received and any gaps in the sequence numbers.

Samples travel as float32 little-endian bytes, sample-major (all channels of the first sample,
then all channels of the second...), so no numpy is needed. Run the demo with::

    peerkit launch examples/demo.toml --duration 10
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import trio

from peerkit import ConfiguredPeer, Message, message, param
from peerkit.launch import current_run_dir

log = logging.getLogger("demo_peers")


@message
class SignalChunk(Message):
    """``samples_per_chunk`` consecutive samples of every channel."""

    #: 0, 1, 2... per publisher: a missing number is a lost chunk
    seq: int
    #: when the chunk was complete: its last sample's time (seconds since the epoch)
    timestamp: float
    sampling_rate: float
    channel_count: int
    #: float32 little-endian, sample-major
    samples: bytes


def to_bytes(values: array[float]) -> bytes:
    """float32 values as little-endian bytes."""
    if sys.byteorder == "big":
        values = array("f", values)
        values.byteswap()
    return values.tobytes()


def from_bytes(data: bytes) -> array[float]:
    """Little-endian float32 bytes as an array of floats."""
    values = array("f")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


class SyntheticAmplifier(ConfiguredPeer):
    """Publishes sine waves (channel ``c`` at ``c + 1`` Hz) plus a little deterministic noise,
    one :class:`SignalChunk` every ``samples_per_chunk / sampling_rate`` seconds while running.
    """

    sampling_rate: int = param(512, doc="samples per second and channel")
    channel_count: int = param(32, doc="number of channels")
    samples_per_chunk: int = param(32, doc="samples per channel in one chunk")

    _scope: trio.CancelScope | None = None

    async def _start(self) -> None:
        self.create_task(self._acquire)

    async def _stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _acquire(self) -> None:
        rate, channels, n = self.sampling_rate, self.channel_count, self.samples_per_chunk
        period = n / rate
        steps = [2 * math.pi * (c + 1) / rate for c in range(channels)]
        t0 = trio.current_time()
        seq = 0
        with trio.CancelScope() as self._scope:
            while True:
                # a chunk is complete once its last sample has been "acquired"
                await trio.sleep_until(t0 + (seq + 1) * period)
                first = seq * n
                values = array(
                    "f",
                    (
                        math.sin(step * (first + i)) + 0.01 * ((first + i + c) % 7 - 3)
                        for i in range(n)
                        for c, step in enumerate(steps)
                    ),
                )
                await self.send_message(
                    SignalChunk(
                        seq=seq,
                        timestamp=time.time(),  # the chunk is complete: it exists from now
                        sampling_rate=float(rate),
                        channel_count=channels,
                        samples=to_bytes(values),
                    )
                )
                seq += 1


class LowPassFilter(ConfiguredPeer):
    """A first-order low-pass filter per channel; republishes each chunk with the same
    ``seq`` and ``timestamp``. Reads chunks from the peer bound to the config source ``amp``.
    """

    sampling_rate: int = param(doc="sampling rate of the input (an external parameter)")
    cutoff: float = param(40.0, doc="cut-off frequency in Hz")

    _history: list[float] | None = None  # last output of each channel

    async def _dependencies_are_ready(self) -> None:
        source = self.config.config_sources.get("amp", "amplifier")
        await self.subscribe_for_specific_msg_subtype(SignalChunk, source, self._on_chunk)

    async def _on_chunk(self, chunk: SignalChunk) -> None:
        alpha = 1.0 - math.exp(-2 * math.pi * self.cutoff / self.sampling_rate)
        channels = chunk.channel_count
        values = from_bytes(chunk.samples)
        state = self._history
        if state is None or len(state) != channels:
            state = list(values[:channels])
        for i in range(0, len(values), channels):
            for c in range(channels):
                y = state[c] + alpha * (values[i + c] - state[c])
                state[c] = y
                values[i + c] = y
        self._history = state
        await self.send_message(
            SignalChunk(
                seq=chunk.seq,
                timestamp=chunk.timestamp,
                sampling_rate=chunk.sampling_rate,
                channel_count=channels,
                samples=to_bytes(values),
            )
        )


def latency_summary(latencies: tuple[float, ...] | list[float]) -> dict[str, float]:
    """Median, p99 (nearest rank) and max of ``latencies`` (seconds), in milliseconds."""
    if not latencies:
        return {"median": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(latencies)
    rank = max(0, math.ceil(0.99 * len(ordered)) - 1)
    return {
        "median": 1000 * statistics.median(ordered),
        "p99": 1000 * ordered[rank],
        "max": 1000 * ordered[-1],
    }


class Recorder(ConfiguredPeer):
    """Writes the chunks of the peer bound to the config source ``signal`` to ``path`` (raw
    float32 little-endian, sample-major; a ``.json`` file next to it describes the layout) and
    reports the samples received and the gaps in the sequence at shutdown.
    """

    path: str = param("recording.f32", doc="output file, relative to the run directory")
    sampling_rate: int = param(0, doc="sampling rate of the input (for the .json description)")

    chunks = 0
    samples = 0
    gaps = 0
    lost = 0
    first_seq: int | None = None
    last_seq: int | None = None
    channel_count = 0
    _file: Any = None  # the trio async file
    #: end-to-end latency of each chunk (the amplifier's timestamp to this handler), in s;
    #: at most 1,000,000 kept (the demo sends 16 chunks a second); set when it starts
    latencies: tuple[float, ...] | list[float] = ()

    def _output(self) -> Path:
        path = Path(self.path)
        if not path.is_absolute():
            path = (current_run_dir() or Path.cwd()) / path
        return path

    async def _dependencies_are_ready(self) -> None:
        self.latencies = []
        self._file = await trio.open_file(self._output(), "wb")
        source = self.config.config_sources.get("signal", "filter")
        await self.subscribe_for_specific_msg_subtype(SignalChunk, source, self._on_chunk)

    async def _on_chunk(self, chunk: SignalChunk) -> None:
        latencies = self.latencies
        if isinstance(latencies, list) and len(latencies) < 1_000_000:
            latencies.append(time.time() - chunk.timestamp)
        assert self._file is not None
        # written first: a chunk cut off by the shutdown is neither in the file nor counted
        await self._file.write(chunk.samples)
        if self.last_seq is None:
            self.first_seq = chunk.seq
        elif chunk.seq != self.last_seq + 1:
            self.gaps += 1
            self.lost += chunk.seq - self.last_seq - 1
            log.warning("gap: chunk %d follows chunk %d", chunk.seq, self.last_seq)
        self.last_seq = chunk.seq
        self.chunks += 1
        self.channel_count = chunk.channel_count
        self.samples += len(chunk.samples) // (4 * chunk.channel_count)

    async def _shutting_down(self) -> None:
        if self._file is not None:
            await self._file.aclose()
        output = self._output()
        description = {
            "format": "float32 little-endian, sample-major",
            "channel_count": self.channel_count,
            "sampling_rate": self.sampling_rate,
            "samples": self.samples,
            "chunks": self.chunks,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "gaps": self.gaps,
            "lost_chunks": self.lost,
            "latency_ms": latency_summary(self.latencies),
        }
        output.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
        lat = description["latency_ms"]
        log.info(
            "latency from the amplifier's chunk timestamp to the recorder: median %.2f ms, "
            "p99 %.2f ms, max %.2f ms over %d chunks",
            lat["median"],
            lat["p99"],
            lat["max"],
            len(self.latencies),
        )
        log.info(
            "recorded %d samples x %d channels in %d chunks (seq %s..%s), %d gaps "
            "(%d chunks lost) -> %s",
            self.samples,
            self.channel_count,
            self.chunks,
            self.first_seq,
            self.last_seq,
            self.gaps,
            self.lost,
            output,
        )
