"""Helpers shared by the launcher and CLI tests."""

from __future__ import annotations

import io
import re
import shutil
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from peerkit.experiment import load_experiment
from peerkit.launch import Launcher, PeerRecord

HERE = Path(__file__).parent


def write_experiment(directory: Path, text: str, name: str = "exp.toml") -> Path:
    """Write an experiment file (and a copy of ``launchpeers.py`` beside it)."""
    shutil.copy(HERE / "launchpeers.py", directory / "launchpeers.py")
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


class Run:
    """A launcher running in a background task."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.status: int | None = None
        self.done = trio.Event()
        self.output = launcher.out

    @property
    def peers(self) -> dict[str, PeerRecord]:
        return self.launcher.peers

    def text(self) -> str:
        assert isinstance(self.output, io.StringIO)
        return self.output.getvalue()

    async def _run(self) -> None:
        self.status = await self.launcher.run()
        self.done.set()

    async def wait(self, predicate: Callable[[Launcher], bool], timeout: float = 15) -> None:
        await self.launcher.wait_until(predicate, timeout)

    async def result(self, timeout: float = 15) -> int:
        with trio.fail_after(timeout):
            await self.done.wait()
        assert self.status is not None
        return self.status

    def pids(self) -> list[int]:
        """The process of each peer's current (or last) run."""
        return [rec.pid for rec in self.launcher.peers.values() if rec.pid is not None]

    def all_pids(self) -> list[int]:
        """The process of every run of every peer (restarts included)."""
        return [int(pid) for pid in re.findall(r"started process (\d+)", self.text())]


@asynccontextmanager
async def launched(tmp_path: Path, text: str, **options: object) -> AsyncIterator[Run]:
    """Launch the experiment ``text`` (log view, into a string) in the background; stop it
    at the end of the block and check that no process of any run was left behind."""
    exp = load_experiment(write_experiment(tmp_path, text))
    options.setdefault("ready_timeout", 15.0)
    options.setdefault("grace_period", 5.0)
    options.setdefault("status_interval", 0.1)
    launcher = Launcher(
        exp,
        run_dir=tmp_path / "run",
        out=io.StringIO(),
        view="log",
        **options,  # type: ignore[arg-type]
    )
    run = Run(launcher)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run._run)
        try:
            yield run
        finally:
            launcher.stop("the test is over")
            with trio.move_on_after(20):
                await run.done.wait()
    for pid in {*run.pids(), *run.all_pids()}:
        assert not alive(pid), f"process {pid} was left behind"
