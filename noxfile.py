"""Developer tasks for peerkit (``python -m pip install -e '.[dev]'`` installs nox).

``nox`` runs the default sessions: the tests on every supported Python found on this machine
(``tests-3.11``, ``tests-3.12``, ``tests-3.13``; a version that is not installed is skipped,
so a machine with only 3.11 runs the default set too), then lint, typecheck and docs once.
``nox -s tests-3.12`` runs one version; ``nox -s bench -- ARGS`` runs the benchmarks, which
are never part of the default run. Arguments after ``--`` are passed on to pytest (``tests``)
and to ``peerkit.bench`` (``bench``).

``nox -s fuzz`` and ``nox -s soak -- --minutes N`` harden the broker (never in the default run
either): a fuzz campaign of 100,000 mutated frames and envelopes against a live broker
(``peerkit._stress.fuzz``), and a soak run with steady traffic and peers joining and leaving
every second (``peerkit._stress.soak``, 10 minutes unless told). Both print their figures and
exit non-zero on a failure; arguments after ``--`` go to them (``--help`` lists them).
"""

from __future__ import annotations

from pathlib import Path

import nox

#: the oldest supported Python (pyproject's requires-python): lint, types, docs, bench
PYTHON = "3.11"
#: every Python the tests run on; keep in step with pyproject's classifiers
TEST_PYTHONS = ["3.11", "3.12", "3.13"]
ROOT = Path(__file__).parent

# Lint targets. Directories that do not exist (yet) are skipped, because ruff
# reports a missing path as an error.
LINT_PATHS = ["peerkit", "tests", "examples", "noxfile.py", "docs/conf.py"]

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
# A Python that is not installed is skipped, not an error (nox makes it an error on CI by
# default): CI images install every version of TEST_PYTHONS they mean to test.
nox.options.error_on_missing_interpreters = False


def _existing(paths: list[str]) -> list[str]:
    return [p for p in paths if (ROOT / p).exists()]


@nox.session(python=TEST_PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest; pass pytest arguments after ``--``)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff (fix with ``ruff check --fix`` / ``ruff format``)."""
    session.install("ruff")
    paths = _existing(LINT_PATHS)
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", "--diff", *paths)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    # The package and its test extra are installed so that mypy sees the real
    # types of trio, attrs, cattrs and pytest (peerkit.testing uses pytest).
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", "peerkit", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation; any Sphinx warning is an error."""
    # autodoc imports every module, including peerkit.testing, hence the test extra.
    session.install("-e", ".[docs,test]")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks (``python -m peerkit.bench``); figures are reported, not asserted."""
    session.install("-e", ".")
    session.run("python", "-m", "peerkit.bench", *session.posargs)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """Fuzz a live broker: 100,000 mutated frames and envelopes, at most 30 minutes
    (``python -m peerkit._stress.fuzz``; e.g. ``-- --inputs 1000000 --max-minutes 120``)."""
    session.install("-e", ".")
    session.run(
        "python",
        "-m",
        "peerkit._stress.fuzz",
        "--inputs",
        "100000",
        "--max-minutes",
        "30",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """Soak a live broker: steady traffic, peers joining and leaving every second, memory
    every 30 s (``python -m peerkit._stress.soak``; ``-- --minutes N``, 10 by default)."""
    session.install("-e", ".")
    session.run("python", "-m", "peerkit._stress.soak", *session.posargs)
