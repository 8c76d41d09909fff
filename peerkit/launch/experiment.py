"""Experiment files: parse and validate the TOML description of an experiment (no trio).

An experiment file names the peers to run and how they depend on each other::

    [broker]                      # optional; defaults: 127.0.0.1, a free port
    host = "127.0.0.1"
    port = 0

    [launcher]                    # optional
    ready_timeout = 30.0          # seconds for every peer to become ready
    grace_period = 5.0            # seconds each peer gets to stop before it is killed

    [peers.amplifier]
    class = "demo_peers:SyntheticAmplifier"   # module:Class
    essential = true              # default; false: a failure is reported, the rest go on
    mode = "process"              # default; or "inprocess" (a trio task in the launcher)
    restart = "on-failure"        # default "never"; or "always" (a clean end too)
    max_restarts = 3              # at most this many restarts...
    restart_window = 60.0         # ...within this many seconds, else it has failed for good
    restart_delay = 0.5           # back-off before the first restart, doubled each time...
    max_restart_delay = 10.0      # ...up to this
    config_files = ["amp.toml"]   # relative to the experiment file
    [peers.amplifier.local_params]
    sampling_rate = 512

    [peers.filter]
    class = "demo_peers:LowPassFilter"
    [peers.filter.external_params]
    sampling_rate = "amp.sampling_rate"
    [peers.filter.config_sources]
    amp = "amplifier"
    [peers.filter.launch_dependencies]
    amp = "amplifier"

:func:`load_experiment` checks the whole file before anything starts: unknown keys, values of
the wrong type, classes that cannot be imported, parameters the classes do not declare or
that have the wrong type, dependencies on peers the file does not define, and dependency
cycles. Every problem found is listed in one :class:`ExperimentError`.

The experiment file's directory is put on ``sys.path`` (and the launcher puts it on the
children's ``PYTHONPATH``), so peer modules next to the file import as ``module:Class``.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from .._checks import is_positive_seconds
from ..config.configured import ConfiguredPeer
from ..config.params import (
    ConfigError,
    ConfigLayer,
    ExternalRef,
    build_config,
    declared_params,
    load_config_file,
)
from ..errors import PeerkitError
from ..peer import Peer

__all__ = [
    "CONFIG_SERVER_ID",
    "LAUNCHER_ID",
    "RESERVED_IDS",
    "Experiment",
    "ExperimentError",
    "PeerSpec",
    "RestartPolicy",
    "import_class",
    "load_experiment",
    "parse_experiment",
    "start_order",
]

#: Peer id of the config server the launcher runs.
CONFIG_SERVER_ID = "config_server"
#: Peer id the launcher itself uses on the broker.
LAUNCHER_ID = "launcher"
#: Ids an experiment cannot give its peers.
RESERVED_IDS = frozenset({"broker", CONFIG_SERVER_ID, LAUNCHER_ID})

_TOP_KEYS = ("broker", "launcher", "peers")
_BROKER_KEYS = ("host", "port")
_LAUNCHER_KEYS = ("ready_timeout", "grace_period")
_CONFIG_KEYS = (
    "config_files",
    "local_params",
    "external_params",
    "config_sources",
    "launch_dependencies",
)
_RESTART_KEYS = ("restart", "max_restarts", "restart_window", "restart_delay", "max_restart_delay")
_PEER_KEYS = ("class", "essential", "mode", *_RESTART_KEYS, *_CONFIG_KEYS)
_MODES = ("process", "inprocess")
_RESTARTS = ("never", "on-failure", "always")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_GRACE_PERIOD = 5.0


class ExperimentError(PeerkitError):
    """The experiment file is invalid; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid:\n{lines}")


@attrs.frozen(kw_only=True)
class RestartPolicy:
    """When the launcher restarts a peer that ended, and how fast (a peer's ``restart`` keys).

    ``restart``: ``"never"`` (the default), ``"on-failure"`` (after a failure: a non-zero
    exit, a signal, an exception, a panic) or ``"always"`` (after a clean end too; never
    after the launcher itself stopped the peer). At most ``max_restarts`` restarts within
    any ``restart_window`` seconds; one more failure and the peer has failed for good. The
    ``n``-th restart of the window waits ``restart_delay * 2**(n-1)`` seconds, at most
    ``max_restart_delay`` (:meth:`delay`), so a peer that keeps crashing slows down, and
    one that ran quietly for a whole window starts again from ``restart_delay``.
    """

    restart: Literal["never", "on-failure", "always"] = "never"
    max_restarts: int = 3
    restart_window: float = 60.0
    restart_delay: float = 0.5
    max_restart_delay: float = 10.0

    def applies(self, failed: bool) -> bool:
        """Whether an end (a failure if ``failed``, else a clean end) calls for a restart."""
        return self.restart == "always" or (self.restart == "on-failure" and failed)

    def delay(self, n: int) -> float:
        """The back-off before the ``n``-th restart within the window (``n`` from 1)."""
        exponent = min(max(n - 1, 0), 64)  # 2**64 * any delay is past any cap
        return min(self.restart_delay * 2.0**exponent, self.max_restart_delay)

    def describe(self) -> str:
        """``on-failure, at most 3 within 60 s`` (for messages)."""
        if self.restart == "never":
            return "never restarted"
        return f"{self.restart}, at most {self.max_restarts} within {self.restart_window:g} s"


@attrs.frozen(kw_only=True)
class PeerSpec:
    """One peer of an experiment, validated."""

    peer_id: str
    #: ``module:Class`` as written in the file
    class_path: str
    peer_class: type[Peer]
    essential: bool = True
    mode: Literal["process", "inprocess"] = "process"
    #: what the launcher does when the peer ends
    restart: RestartPolicy = RestartPolicy()
    #: absolute paths
    config_files: tuple[Path, ...] = ()
    local_params: Mapping[str, Any] = attrs.field(factory=dict)
    external_params: Mapping[str, str] = attrs.field(factory=dict)
    config_sources: Mapping[str, str] = attrs.field(factory=dict)
    launch_dependencies: Mapping[str, str] = attrs.field(factory=dict)
    #: peer ids this peer waits for (launch dependencies and config sources), file order
    dependencies: tuple[str, ...] = ()
    #: external parameters after merging config files and the table: local name → source
    external_refs: Mapping[str, ExternalRef] = attrs.field(factory=dict)

    @property
    def configured(self) -> bool:
        """Whether the class is a :class:`~peerkit.ConfiguredPeer` (it takes parameters)."""
        return issubclass(self.peer_class, ConfiguredPeer)

    def config_kwargs(self) -> dict[str, Any]:
        """Constructor arguments carrying the configuration (JSON-compatible values)."""
        if not self.configured:
            return {}
        return {
            "config_files": [str(p) for p in self.config_files],
            "local_params": dict(self.local_params),
            "external_params": dict(self.external_params),
            "config_sources": dict(self.config_sources),
            "launch_dependencies": dict(self.launch_dependencies),
        }


@attrs.frozen(kw_only=True)
class Experiment:
    """A validated experiment file."""

    #: the file it was read from (None when built from a dict)
    path: Path | None
    #: the file's directory: relative paths start here, modules import from here
    directory: Path
    host: str = "127.0.0.1"
    port: int = 0
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    grace_period: float = DEFAULT_GRACE_PERIOD
    #: peer id → spec, in file order
    peers: Mapping[str, PeerSpec] = attrs.field(factory=dict)
    #: start order: every peer after the peers it depends on (file order otherwise)
    order: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The file's stem (``demo`` for ``demo.toml``), or ``experiment``."""
        return self.path.stem if self.path is not None else "experiment"


# ----------------------------------------------------------------------------- loading


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; :class:`ExperimentError` lists every problem.

    Puts the file's directory on ``sys.path`` so that its peer classes can be imported.
    """
    p = Path(path).resolve()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ExperimentError(str(path), [f"no such file: {p}"]) from None
    except OSError as exc:
        raise ExperimentError(str(path), [f"cannot read it: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_experiment(data, p.parent, path=p)


def parse_experiment(
    data: Mapping[str, Any], directory: str | Path, *, path: Path | None = None
) -> Experiment:
    """Validate already-parsed TOML ``data``; relative paths are taken from ``directory``."""
    directory = Path(directory).resolve()
    source = str(path) if path is not None else "experiment"
    problems: list[str] = []
    _unknown_keys(data, _TOP_KEYS, "", problems)

    broker = _table(data, "broker", "", problems)
    _unknown_keys(broker, _BROKER_KEYS, "broker.", problems)
    host = broker.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        problems.append(f"broker.host must be a non-empty string, got {host!r}")
        host = "127.0.0.1"
    port = broker.get("port", 0)
    if not _is_int(port) or not 0 <= port <= 65535:
        problems.append(f"broker.port must be an integer in 0..65535, got {port!r}")
        port = 0

    launcher = _table(data, "launcher", "", problems)
    _unknown_keys(launcher, _LAUNCHER_KEYS, "launcher.", problems)
    ready_timeout = _seconds(launcher, "ready_timeout", DEFAULT_READY_TIMEOUT, problems)
    grace_period = _seconds(launcher, "grace_period", DEFAULT_GRACE_PERIOD, problems)

    peers_table = _table(data, "peers", "", problems)
    if not peers_table:
        problems.append("no peers: add at least one [peers.<peer_id>] table")
    _add_to_sys_path(directory)
    specs: dict[str, PeerSpec] = {}
    for peer_id, table in peers_table.items():
        spec = _parse_peer(peer_id, table, directory, source, problems)
        if spec is not None:
            specs[peer_id] = spec

    ids = set(peers_table)
    for spec in specs.values():
        for dep in spec.dependencies:
            if dep not in ids:
                problems.append(
                    f"peers.{spec.peer_id} depends on {dep!r}, which is not a peer of this "
                    f"experiment{_suggest(dep, ids)}"
                )
            elif dep in specs and not specs[dep].configured:
                problems.append(
                    f"peers.{spec.peer_id} depends on {dep!r}, whose class "
                    f"{specs[dep].class_path} is not a ConfiguredPeer: only configured peers "
                    "tell the config server when they are ready"
                )
    _check_external_params(specs, problems)
    deps = {pid: [d for d in s.dependencies if d in specs] for pid, s in specs.items()}
    try:
        order = tuple(start_order(deps))
    except _Cycle as cycle:
        problems.append(
            "dependency cycle: "
            + " -> ".join(cycle.path)
            + " (launch_dependencies and config_sources must not form a loop)"
        )
    if problems:
        raise ExperimentError(source, problems)
    return Experiment(
        path=path,
        directory=directory,
        host=host,
        port=port,
        ready_timeout=ready_timeout,
        grace_period=grace_period,
        peers=specs,
        order=order,
    )


def _parse_peer(
    peer_id: str, table: object, directory: Path, source: str, problems: list[str]
) -> PeerSpec | None:
    where = f"peers.{peer_id}"
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table ([{where}]), got {table!r}")
        return None
    if not _ID_RE.fullmatch(peer_id) or len(peer_id) > 200:
        problems.append(
            f"{where}: invalid peer id {peer_id!r}; use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    elif peer_id in RESERVED_IDS:
        problems.append(f"{where}: the peer id {peer_id!r} is reserved for the launcher")
    _unknown_keys(table, _PEER_KEYS, f"{where}.", problems)
    start = len(problems)  # problems from here on leave no usable spec

    class_path = table.get("class")
    peer_class: type[Peer] | None = None
    if class_path is None:
        problems.append(f'{where}: missing class = "module:Class"')
    elif not isinstance(class_path, str):
        problems.append(f'{where}.class must be a string "module:Class", got {class_path!r}')
    else:
        try:
            peer_class = import_class(class_path)
        except PeerkitError as exc:
            problems.append(f"{where}.class: {exc}")

    essential = table.get("essential", True)
    if not isinstance(essential, bool):
        problems.append(f"{where}.essential must be true or false, got {essential!r}")
    mode = table.get("mode", "process")
    if mode not in _MODES:
        problems.append(f"{where}.mode must be {' or '.join(map(repr, _MODES))}, got {mode!r}")
    restart = _restart_policy(table, where, problems)

    files_raw = table.get("config_files", [])
    if isinstance(files_raw, str):
        files_raw = [files_raw]
    config_files: list[Path] = []
    if not isinstance(files_raw, list) or not all(isinstance(f, str) for f in files_raw):
        problems.append(f"{where}.config_files must be a list of paths, got {files_raw!r}")
    else:
        for f in files_raw:
            p = (directory / f).resolve()
            if not p.is_file():
                problems.append(f"{where}.config_files: {f!r} does not exist (looked for {p})")
            config_files.append(p)
    sections = {key: table.get(key) for key in _CONFIG_KEYS[1:]}
    if len(problems) > start or peer_class is None or not isinstance(class_path, str):
        return None

    given = [k for k in _CONFIG_KEYS if table.get(k)]
    dependencies: list[str] = []
    if issubclass(peer_class, ConfiguredPeer):
        try:
            layer = ConfigLayer.from_args(f"{source} [{where}]", *sections.values())
            layers = [load_config_file(f) for f in config_files]
            config = build_config(declared_params(peer_class), peer_id, [*layers, layer])
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            return None
        external_refs = config.external
        dependencies = list(config.launch_dependencies.values())
        dependencies += [ref.peer_id for ref in config.external.values()]
        dependencies += [pid for pid in config.config_sources.values() if pid]
        local = layer.local_params
        external = layer.external_params
        config_sources = layer.config_sources
        launch_dependencies = layer.launch_dependencies
    elif given:
        problems.append(
            f"{where}: {class_path} is not a ConfiguredPeer, so it takes no "
            f"{', '.join(given)}; derive it from peerkit.ConfiguredPeer to give it parameters"
        )
        return None
    else:
        local, external, config_sources, launch_dependencies = {}, {}, {}, {}
        external_refs = {}
    return PeerSpec(
        peer_id=peer_id,
        class_path=class_path,
        peer_class=peer_class,
        essential=essential,
        mode=mode,
        restart=restart,
        config_files=tuple(config_files),
        local_params=dict(local),
        external_params=dict(external),
        config_sources=dict(config_sources),
        launch_dependencies=dict(launch_dependencies),
        dependencies=tuple(dict.fromkeys(d for d in dependencies if d != peer_id)),
        external_refs=dict(external_refs),
    )


def _restart_policy(table: Mapping[str, Any], where: str, problems: list[str]) -> RestartPolicy:
    """The peer's restart keys, checked; the defaults stand in for a bad value."""
    default = RestartPolicy()
    restart = table.get("restart", default.restart)
    if restart not in _RESTARTS:
        choices = ", ".join(f'"{r}"' for r in _RESTARTS)
        hint = _suggest(restart, _RESTARTS) if isinstance(restart, str) else ""
        problems.append(f"{where}.restart must be one of {choices}, got {restart!r}{hint}")
        restart = "on-failure"  # so the other keys are still checked
    given = [k for k in _RESTART_KEYS[1:] if k in table]
    if restart == "never" and given:
        for key in given:
            problems.append(
                f'{where}.{key} has no effect with restart = "never" (the default); add '
                f'restart = "on-failure" or "always" to {where}, or remove {key}'
            )
        return default
    max_restarts = table.get("max_restarts", default.max_restarts)
    if not _is_int(max_restarts) or max_restarts < 0:
        problems.append(
            f"{where}.max_restarts must be a whole number, 0 or more, got {max_restarts!r}"
        )
        max_restarts = default.max_restarts
    seconds: dict[str, float] = {}
    for key in _RESTART_KEYS[2:]:
        value = table.get(key, getattr(default, key))
        if not is_positive_seconds(value):
            problems.append(f"{where}.{key} must be a positive number of seconds, got {value!r}")
            value = getattr(default, key)
        seconds[key] = float(value)
    if seconds["max_restart_delay"] < seconds["restart_delay"]:
        problems.append(
            f"{where}.max_restart_delay ({seconds['max_restart_delay']:g} s) must be at least "
            f"restart_delay ({seconds['restart_delay']:g} s): it caps the back-off"
        )
    return RestartPolicy(restart=restart, max_restarts=max_restarts, **seconds)


def _check_external_params(specs: Mapping[str, PeerSpec], problems: list[str]) -> None:
    """An external parameter must name a parameter its source peer's class declares."""
    for spec in specs.values():
        for name, ref in spec.external_refs.items():
            src = specs.get(ref.peer_id)
            if src is None:
                continue  # reported as an unknown dependency
            if not src.configured:
                problems.append(
                    f"peers.{spec.peer_id}: external parameter {name!r} comes from "
                    f"{ref.peer_id!r}, which is not a ConfiguredPeer and has no parameters"
                )
                continue
            known = declared_params(src.peer_class)
            if ref.param not in known:
                problems.append(
                    f"peers.{spec.peer_id}: external parameter {name!r} comes from {ref}, but "
                    f"{src.class_path} has no parameter {ref.param!r}"
                    f"{_suggest(ref.param, known)}"
                )


# ----------------------------------------------------------------------------- classes


def import_class(path: str) -> type[Peer]:
    """Import ``module:Class`` (``module.Class`` is accepted too) and check it is a peer class.

    Raises :class:`~peerkit.PeerkitError` with a message saying what to change.
    """
    if ":" in path:
        module_name, _, qualname = path.partition(":")
    else:
        module_name, _, qualname = path.rpartition(".")
    if not module_name or not qualname:
        raise PeerkitError(f'{path!r} is not of the form "module:Class"')
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PeerkitError(
            f"cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "is it on the import path? (the experiment file's directory is)"
        ) from None
    obj: Any = module
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        names = [n for n in vars(module) if not n.startswith("_")]
        raise PeerkitError(
            f"module {module_name!r} has no {qualname!r}{_suggest(qualname, names)}"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, Peer)):
        raise PeerkitError(f"{path!r} is not a subclass of peerkit.Peer")
    return obj


def _add_to_sys_path(directory: Path) -> None:
    entry = str(directory)
    if entry not in sys.path:
        sys.path.insert(0, entry)


# ----------------------------------------------------------------------------- order


class _Cycle(ValueError):
    def __init__(self, path: list[str]) -> None:
        super().__init__(" -> ".join(path))
        self.path = path


def start_order(dependencies: Mapping[str, Iterable[str]]) -> list[str]:
    """Order peers so that each comes after the peers it depends on (stable: ties keep the
    mapping's order). Raises ``ValueError`` naming the cycle if there is one."""
    deps = {node: list(ds) for node, ds in dependencies.items()}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        mark = state.get(node)
        if mark == 2:
            return
        if mark == 1:
            raise _Cycle([*path[path.index(node) :], node])
        state[node] = 1
        for dep in deps.get(node, ()):
            visit(dep, [*path, node])
        state[node] = 2
        order.append(node)

    for node in deps:
        visit(node, [])
    return order


# ----------------------------------------------------------------------------- helpers


def _table(data: Mapping[str, Any], key: str, prefix: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"{prefix}{key} must be a table ([{prefix}{key}]), got {value!r}")
        return {}
    return value


def _unknown_keys(
    table: Mapping[str, Any], known: Iterable[str], prefix: str, problems: list[str]
) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            problems.append(
                f"unknown key {prefix}{key}{_suggest(key, known)} "
                f"(allowed here: {', '.join(known)})"
            )


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seconds(table: Mapping[str, Any], key: str, default: float, problems: list[str]) -> float:
    value = table.get(key, default)
    if not is_positive_seconds(value):
        problems.append(f"launcher.{key} must be a positive number of seconds, got {value!r}")
        return default
    return float(value)
