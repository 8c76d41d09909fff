"""Helpers shared by the launcher and CLI tests."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

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
