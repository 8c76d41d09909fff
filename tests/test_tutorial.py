"""The tutorial (``docs/tutorial.rst``) works as written.

Its Python, TOML and test code is ``literalinclude``-d from ``examples/tutorial/``; its
console blocks are read from the page itself and run in order, in a temporary copy of that
directory, as a reader would type them:

* a block captioned ``terminal N`` runs in that terminal (its own environment, so an
  ``export`` holds for the later commands typed there), in the order of the page; an
  uncaptioned block runs in a terminal of its own, beside them (it does not depend on them);
* ``$ peerkit broker ...`` and ``$ peerkit run ...`` keep running, as they do for the
  reader; a later block of the same terminal that starts without ``$`` shows more of their
  output, and ``^C`` sends them SIGINT; every other command must end with exit status 0;
* the broker's URL is the one the page's ``peerkit broker`` printed: the commands get the
  real one (a free port), never a fixed port.

Output is compared line by line after normalising numbers (times, counts, ports, process
ids) to ``N`` and runs of spaces to one: ``...`` within a line matches any text, a line
``...`` any number of lines. Shown output of a program that is still running may begin
after lines that came before it (the page elides them).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "tutorial.rst"
EXAMPLE = ROOT / "examples" / "tutorial"
#: bound on one step (a command, or the output a running program must show), for a loaded
#: machine: starting Python and importing peerkit takes a moment
STEP = 30.0
#: commands that run until they are stopped
LONG_RUNNING = {"broker", "run"}


# ------------------------------------------------------------------------- reading the page


@attrs.frozen
class Block:
    """One ``.. code-block:: console`` of the page."""

    line: int  # where it starts in the page, for messages
    terminal: str
    lines: tuple[str, ...]


def console_blocks(text: str) -> list[Block]:
    """Every console block of ``text``, with the terminal its caption names."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != ".. code-block:: console":
            i += 1
            continue
        start = i + 1
        i += 1
        terminal = f"block at line {start}"
        while i < len(lines) and lines[i].strip().startswith(":"):
            option = lines[i].strip()
            if option.startswith(":caption:"):
                terminal = option.removeprefix(":caption:").strip()
            i += 1
        content: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
            content.append(lines[i][3:])
            i += 1
        while content and not content[-1].strip():
            content.pop()
        while content and not content[0].strip():
            content.pop(0)
        blocks.append(Block(start, terminal, tuple(content)))
    return blocks


def normal(line: str) -> str:
    return " ".join(re.sub(r"\d+", "N", line).split())


def line_matches(expected: str, actual: str) -> bool:
    parts = normal(expected).split("...")
    pattern = ".*".join(re.escape(part) for part in parts)
    return re.fullmatch(pattern, normal(actual)) is not None


def match_all(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` is ``expected`` (a line ``...`` standing for any lines)."""
    if not expected:
        return not actual
    first, rest = expected[0], expected[1:]
    if first.strip() == "...":
        return any(match_all(rest, actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and line_matches(first, actual[0]) and match_all(rest, actual[1:])


# ------------------------------------------------------------------------- running programs


class Output:
    """A running program's output (stdout and stderr together), line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.seen: list[str] = []  # every line read so far, for failure messages
        self.ended = False

    async def next_line(self) -> str | None:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                self.ended = True
                if not self._buffer:
                    return None
                self._buffer += b"\n"
            else:
                self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        text = line.decode()
        self.seen.append(text)
        return text

    async def expect(self, expected: list[str], *, skip_first: bool, where: str) -> list[str]:
        """Read until ``expected`` has been shown; returns the lines that matched."""
        skipping = skip_first
        matched: list[str] = []
        start = len(self.seen)
        for want in expected:
            if want.strip() == "...":
                skipping = True
                continue
            while True:
                got = await self.next_line()
                if got is None:
                    pytest.fail(f"{where}: the output ended before {want!r}:\n" + self.tail(start))
                if line_matches(want, got):
                    matched.append(got)
                    break
                if not skipping:
                    pytest.fail(f"{where}: expected {want!r}, got {got!r}:\n" + self.tail(start))
            skipping = False
        return matched

    def tail(self, start: int) -> str:
        return "\n".join(self.seen[max(0, start - 5) :])


@attrs.define
class Terminal:
    env: dict[str, str]
    process: trio.Process | None = None
    output: Output | None = None


@attrs.define
class Session:
    """The terminals of the page, the programs running in them, and the broker's URL."""

    directory: Path
    nursery: trio.Nursery
    terminals: dict[str, Terminal] = attrs.field(factory=dict)
    urls: dict[str, str] = attrs.field(factory=dict)  # the page's URL -> the real one

    def terminal(self, name: str) -> Terminal:
        if name not in self.terminals:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PEERKIT_", "PYTEST_"))}
            env["PYTHONPATH"] = str(ROOT)  # this checkout's peerkit, installed or not
            self.terminals[name] = Terminal(env)
        return self.terminals[name]

    def real(self, text: str) -> str:
        for shown, real in self.urls.items():
            text = text.replace(shown, real)
        return text

    async def run_block(self, block: Block) -> None:
        term = self.terminal(block.terminal)
        for step, outputs in steps(block):
            where = f"tutorial.rst line {block.line} ({block.terminal}): {step or 'output'}"
            with trio.fail_after(STEP):
                if step is None:  # more output of the program running in this terminal
                    assert term.output is not None, f"{where}: nothing runs in this terminal"
                    await term.output.expect(outputs, skip_first=True, where=where)
                elif step == "^C":
                    assert term.process is not None and term.output is not None, where
                    term.process.send_signal(signal.SIGINT)
                    await term.output.expect(outputs, skip_first=True, where=where)
                    assert await term.process.wait() == 0, f"{where}: exit status"
                    term.process = term.output = None
                else:
                    await self.command(term, step, outputs, where)

    async def command(self, term: Terminal, step: str, outputs: list[str], where: str) -> None:
        words = shlex.split(self.real(step.removeprefix("$ ")))
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            term.env[name] = value
            return
        argv = {"peerkit": [sys.executable, "-m", "peerkit"], "python": [sys.executable]}[
            words[0]
        ] + words[1:]
        if words[0] == "peerkit" and words[1] in LONG_RUNNING:
            assert term.process is None, f"{where}: this terminal is busy"
            term.process = await trio.lowlevel.open_process(
                argv,
                cwd=self.directory,
                env=term.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert term.process.stdout is not None
            term.output = Output(term.process.stdout)
            got = await term.output.expect(outputs, skip_first=False, where=where)
            if words[1] == "broker":
                (shown,) = [u for line in outputs for u in re.findall(r"ws://\S+", line)][:1]
                (real,) = [u for line in got for u in re.findall(r"ws://\S+", line)][:1]
                self.urls[shown] = real
            return
        done = await trio.run_process(
            argv,
            cwd=self.directory,
            env=term.env,
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
        text = done.stdout.decode().splitlines()
        assert done.returncode == 0, f"{where}: exit status {done.returncode}:\n" + "\n".join(text)
        assert match_all(outputs, text), (
            f"{where}: the output differs from the page's\npage:\n"
            + "\n".join(outputs)
            + "\nactual:\n"
            + "\n".join(text)
        )

    async def close(self, *, wait: bool) -> list[str]:
        """Kill the programs still running, after waiting for them to end if ``wait`` (at
        the end of the page, they should be ending). Returns what was wrong: a program left
        running, or a failed one."""
        problems = []
        for name, term in self.terminals.items():
            if term.process is None:
                continue
            with trio.move_on_after(STEP if wait else 0):
                await term.process.wait()
            if term.process.returncode is None:
                problems.append(f"{name}: still running at the end of the page")
                term.process.kill()
                await term.process.wait()
            elif term.process.returncode != 0:
                problems.append(f"{name}: exit status {term.process.returncode}")
        return problems


def steps(block: Block) -> Iterator[tuple[str | None, list[str]]]:
    """(command, or ``^C``, or None for output alone; the output lines shown after it)."""
    step: str | None = None
    outputs: list[str] = []
    started = False
    for line in block.lines:
        if line.startswith("$ ") or line == "^C":
            if started:
                yield step, outputs
            step, outputs, started = line, [], True
        else:
            outputs.append(line)
            started = True
    if started:
        yield step, outputs


# ------------------------------------------------------------------------------- the tests


def tutorial_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "lab"
    shutil.copytree(EXAMPLE, directory, ignore=shutil.ignore_patterns("__pycache__"))
    return directory


async def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    blocks = console_blocks(PAGE.read_text())
    assert len(blocks) >= 10, "the tutorial's console blocks were not found"
    with trio.fail_after(len(blocks) * STEP):
        async with trio.open_nursery() as nursery:
            session = Session(tutorial_copy(tmp_path), nursery)
            # the numbered terminals' blocks tell one story, in order; the other blocks are
            # independent of it (and of each other's terminals): they run beside it
            story = [b for b in blocks if b.terminal.startswith("terminal ")]
            others = [b for b in blocks if b not in story]

            async def run_in_order(part: list[Block]) -> None:
                for block in part:
                    await session.run_block(block)

            completed = False
            try:
                async with trio.open_nursery() as both:
                    both.start_soon(run_in_order, story)
                    both.start_soon(run_in_order, others)
                completed = True
            finally:
                with trio.CancelScope(shield=True):
                    problems = await session.close(wait=completed)
            assert not problems


def test_every_example_file_is_shown_and_used() -> None:
    """Each file of examples/tutorial is included in the page, and a command of the page
    uses it (so the test above runs it)."""
    text = PAGE.read_text()
    included = set(re.findall(r"literalinclude:: \.\./examples/tutorial/(\S+)", text))
    files = {p.name for p in EXAMPLE.iterdir() if p.is_file()}
    assert included == files
    commands = " ".join(
        line for block in console_blocks(text) for line in block.lines if line.startswith("$ ")
    )
    for name in files:
        assert Path(name).stem in commands, f"no command of the tutorial uses {name}"


def test_the_matching_rules() -> None:
    """The comparison the tutorial test relies on: numbers and spacing do not count, the
    rest does."""
    assert line_matches("[    0.4s] monitor: ready", "[   12.0s] monitor: ready")
    assert not line_matches("[    0.4s] monitor: ready", "[    0.4s] monitor: running")
    assert line_matches("from 'peerkit-ctl-...'", "from 'peerkit-ctl-1f0c55e2'")
    assert not line_matches("exit status 0", "exit status 0 (after 3 tries)")
    assert match_all(["a", "...", "d"], ["a", "b", "c", "d"])
    assert not match_all(["a", "d"], ["a", "b", "d"])
    assert not match_all(["a"], ["a", "b"])
    block = Block(1, "t", ("$ peerkit run x", "out", "^C", "bye", "$ ls"))
    assert list(steps(block)) == [("$ peerkit run x", ["out"]), ("^C", ["bye"]), ("$ ls", [])]
