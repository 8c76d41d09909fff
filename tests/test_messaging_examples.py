"""The examples of ``docs/messaging.rst`` print what the page shows.

Each ``literalinclude`` of ``examples/messaging/NAME.py`` in the page is followed by a
``.. code-block:: text`` captioned ``output of python examples/messaging/NAME.py``; the test
runs the program (a process of its own: its message classes are its own, and it owns its
``trio.run``) and compares its standard output with that block, exactly.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "messaging.rst"
EXAMPLES = ROOT / "examples" / "messaging"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def shown_outputs(text: str) -> dict[str, list[str]]:
    """Example file name -> the output lines the page shows for it."""
    outputs: dict[str, list[str]] = {}
    pattern = re.compile(
        r"^\.\. code-block:: text\n   :caption: output of python examples/messaging/(\S+)\n\n"
        r"((?:   .*\n|\n)+)",
        re.MULTILINE,
    )
    for found in pattern.finditer(text):
        lines = [line[3:] for line in found.group(2).splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        outputs[found.group(1)] = lines
    return outputs


OUTPUTS = shown_outputs(PAGE.read_text())


def test_every_example_is_shown_with_its_output() -> None:
    text = PAGE.read_text()
    included = re.findall(r"literalinclude:: \.\./examples/messaging/(\S+)", text)
    files = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert sorted(included) == files
    assert sorted(OUTPUTS) == files
    for name in files:  # the output comes right after the code it belongs to
        assert text.index(f"messaging/{name}\n") < text.index(f"python examples/messaging/{name}")


@pytest.mark.parametrize("name", sorted(OUTPUTS))
async def test_example_prints_what_the_page_shows(name: str) -> None:
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, str(EXAMPLES / name)],
            cwd=ROOT,
            env=ENV,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == OUTPUTS[name]
