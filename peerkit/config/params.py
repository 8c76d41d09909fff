"""Parameter declarations, type checking and configuration loading (sans-IO).

A configured peer declares its parameters as typed class attributes made with :func:`param`::

    class Amplifier(ConfiguredPeer):
        sampling_rate: int = param(256)
        channels: list[str] = param(["C3", "Cz", "C4"])
        gain: float = param(1.0, doc="analogue gain")

Supported types: ``int``, ``float`` (an int is accepted and converted), ``str``, ``bool``,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``, ``Literal[...]``, unions such as
``T | None``, and ``Any`` (any value msgpack can carry). Every value is checked against the
declared type when it is loaded and when it is set; an error names the parameter and where
the value came from.

Configuration comes in *layers*, lowest precedence first: class defaults, config files (TOML),
constructor arguments, command-line overrides (``-f`` files, then ``-p/-e/-c/-d``; see
:func:`parse_overrides`). A config file has up to four sections::

    [local_params]
    sampling_rate = 512

    [external_params]              # local name = "source.param"
    rate = "amp.sampling_rate"

    [config_sources]               # source name = peer id ("" = bound at launch)
    amp = "amplifier"

    [launch_dependencies]          # name = peer id (or: launch_dependencies = ["a", "b"])
    amp = "amplifier"

A source name that is not listed in ``config_sources`` is taken as a peer id. A name used both
in ``config_sources`` and ``launch_dependencies`` is shared: binding one binds the other (as in
OBCI). Nothing here does I/O except reading the config files named by the caller.
"""

from __future__ import annotations

import inspect
import sys
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import attrs

from .paramtypes import (
    ConfigError,
    OverrideError,
    ParamTypeError,
    UnknownParamError,
    _describe,
    check_supported,
    check_value,
    parse_text,
    type_name,
)

__all__ = [
    "MISSING",
    "ConfigError",
    "ConfigLayer",
    "ExternalRef",
    "OverrideError",
    "Overrides",
    "ParamDecl",
    "ParamTypeError",
    "PeerConfig",
    "Text",
    "UnknownParamError",
    "build_config",
    "check_value",
    "declared_params",
    "load_config_file",
    "merge_overrides",
    "param",
    "parse_overrides",
    "parse_text",
    "type_name",
]

T = TypeVar("T")


class _Missing:
    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: The "no value" marker (a parameter declared without a default).
MISSING: Any = _Missing()


# ----------------------------------------------------------------------------- declarations


class _ParamDescriptor:
    """What :func:`param` returns: a descriptor that reads the peer's current value."""

    def __init__(self, default: Any, doc: str) -> None:
        self.default = default
        self.doc = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.get_param(self.name)  # type: ignore[attr-defined]

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(
            f"{self.name!r} is a configuration parameter of {type(obj).__name__}; change it "
            f"with `await peer.set_param({self.name!r}, value)`"
        )


@overload
def param(default: T, *, doc: str = "") -> T: ...
@overload
def param(*, doc: str = "") -> Any: ...


def param(default: Any = MISSING, *, doc: str = "") -> Any:
    """Declare a configuration parameter on a :class:`~peerkit.ConfiguredPeer` subclass.

    ``sampling_rate: int = param(256)``. Without a default the value must come from a config
    file, the constructor, the command line or an external parameter. Mutable defaults are
    copied per peer. Read the value as ``self.sampling_rate`` or ``get_param(...)``; change it
    with ``await set_param(...)``.
    """
    return _ParamDescriptor(default, doc)


@attrs.frozen
class ParamDecl:
    """One declared parameter: its name, declared type, default (or MISSING) and doc."""

    name: str
    type: Any
    default: Any
    doc: str = ""


_DECLS_ATTR = "__peerkit_params__"


def _annotation(cls: type, name: str) -> Any:
    """The annotation of ``name`` nearest in ``cls``'s MRO, evaluated (MISSING if none).

    Only the parameters' annotations are evaluated, each in its own class's module, so other
    annotations (e.g. names imported only for type checking) never matter.
    """
    for klass in cls.__mro__:
        annotations = inspect.get_annotations(klass)
        if name not in annotations:
            continue
        tp = annotations[name]
        if isinstance(tp, str):
            module = sys.modules.get(klass.__module__)
            globalns = dict(vars(module)) if module is not None else {}
            try:
                tp = eval(tp, globalns, dict(vars(klass)))
            except Exception as exc:
                raise ConfigError(
                    f"cannot evaluate the annotation {annotations[name]!r} of parameter "
                    f"{klass.__qualname__}.{name}: {exc}; use a type importable at module level"
                ) from None
        return tp
    return MISSING


def declared_params(cls: type) -> dict[str, ParamDecl]:
    """The parameters declared on ``cls`` and its bases (cached per class).

    Raises :class:`ConfigError` for a parameter whose type is missing or unsupported, or
    whose default does not match its type.
    """
    cached = cls.__dict__.get(_DECLS_ATTR)
    if cached is not None:
        return dict(cached)
    descriptors: dict[str, _ParamDescriptor] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, _ParamDescriptor):
                descriptors[name] = value
            elif name in descriptors:
                del descriptors[name]  # overridden by a plain attribute
    decls: dict[str, ParamDecl] = {}
    for name, desc in descriptors.items():
        tp = _annotation(cls, name)
        if tp is MISSING:
            if desc.default is MISSING or desc.default is None:
                raise ConfigError(
                    f"parameter {cls.__qualname__}.{name} needs a type annotation, "
                    f"e.g. `{name}: int = param(...)`"
                )
            tp = type(desc.default)
        if typing.get_origin(tp) is typing.ClassVar:
            raise ConfigError(f"parameter {cls.__qualname__}.{name} cannot be a ClassVar")
        check_supported(tp, f"{cls.__qualname__}.{name}")
        default = desc.default
        if default is not MISSING:
            default = check_value(tp, default, name=name, source=f"default of {cls.__qualname__}")
        decls[name] = ParamDecl(name, tp, default, desc.doc)
    type.__setattr__(cls, _DECLS_ATTR, decls)
    return dict(decls)


@attrs.frozen
class Text:
    """A value given as text (command line): parsed with the declared type when loaded."""

    text: str
    source: str = "command line"


def load_value(decl: ParamDecl, value: Any, source: str) -> Any:
    """Check (or, for :class:`Text`, parse) ``value`` for the declared parameter."""
    if isinstance(value, Text):
        return parse_text(decl.type, value.text, name=decl.name, source=value.source)
    return check_value(decl.type, value, name=decl.name, source=source)


# ----------------------------------------------------------------------------- layers


def _as_mapping(value: Any, what: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} ({source}) must be a mapping, got {_describe(value)}")
    for k in value:
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{what} ({source}): names must be non-empty strings, got {k!r}")
    return dict(value)


def _str_map(value: Any, what: str, source: str, *, allow_empty: bool) -> dict[str, str]:
    out = _as_mapping(value, what, source)
    for k, v in out.items():
        if not isinstance(v, str) or (not v and not allow_empty):
            raise ConfigError(f"{what} ({source}): {k!r} must map to a string, got {_describe(v)}")
    return out


def _deps_map(value: Any, source: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        raise ConfigError(
            f"launch_dependencies ({source}) must be a mapping name -> peer id or a list of "
            f"peer ids, got the string {value!r}"
        )
    if isinstance(value, Sequence):
        out = {}
        for v in value:
            if not isinstance(v, str) or not v:
                raise ConfigError(
                    f"launch_dependencies ({source}): peer ids must be non-empty strings, "
                    f"got {_describe(v)}"
                )
            out[v] = v
        return out
    return _str_map(value, "launch_dependencies", source, allow_empty=True)


@attrs.frozen
class ConfigLayer:
    """One layer of configuration (a file, the constructor, the command line)."""

    source: str
    local_params: Mapping[str, Any] = attrs.field(factory=dict)
    external_params: Mapping[str, str] = attrs.field(factory=dict)
    config_sources: Mapping[str, str] = attrs.field(factory=dict)
    launch_dependencies: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_args(
        cls,
        source: str,
        local_params: Any = None,
        external_params: Any = None,
        config_sources: Any = None,
        launch_dependencies: Any = None,
    ) -> ConfigLayer:
        """Validate the shapes of the four sections and build a layer."""
        return cls(
            source,
            _as_mapping(local_params, "local_params", source),
            _str_map(external_params, "external_params", source, allow_empty=False),
            _str_map(config_sources, "config_sources", source, allow_empty=True),
            _deps_map(launch_dependencies, source),
        )


_SECTIONS = ("local_params", "external_params", "config_sources", "launch_dependencies")


def load_config_file(path: str | Path) -> ConfigLayer:
    """Read a TOML config file into a :class:`ConfigLayer` (:class:`ConfigError` if bad)."""
    p = Path(path)
    source = f"config file {str(p)!r}"
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source} has unknown sections or keys {', '.join(map(repr, unknown))}; "
            f"expected {', '.join(_SECTIONS)}"
        )
    return ConfigLayer.from_args(source, *(data.get(s) for s in _SECTIONS))


# ----------------------------------------------------------------------------- resolved config


@attrs.frozen
class ExternalRef:
    """An external parameter: ``source`` (name as written), ``peer_id`` and ``param``."""

    source: str
    peer_id: str
    param: str

    def __str__(self) -> str:
        return f"{self.peer_id}.{self.param}"


def _split_ref(ref: str, name: str, source: str) -> tuple[str, str]:
    src, dot, remote = ref.rpartition(".")
    if not dot or not src or not remote.isidentifier():
        raise ConfigError(
            f"external parameter {name!r} ({source}): {ref!r} is not of the form "
            "'source.param' (e.g. 'amp.sampling_rate')"
        )
    return src, remote


@attrs.define
class PeerConfig:
    """A peer's configuration after merging every layer (see :func:`build_config`)."""

    peer_id: str
    decls: dict[str, ParamDecl]
    #: the current value of each parameter (an external one keeps its default, or MISSING,
    #: until it is resolved)
    values: dict[str, Any]
    #: where each value came from (for error messages)
    sources: dict[str, str]
    #: local name → where it comes from
    external: dict[str, ExternalRef]
    config_sources: dict[str, str]
    #: dependency name → peer id
    launch_dependencies: dict[str, str]

    def unresolved(self) -> list[str]:
        """External parameters that have no value yet."""
        return [n for n in self.external if self.values.get(n, MISSING) is MISSING]

    def local_values(self) -> dict[str, Any]:
        """The values of the parameters that are not external."""
        return {n: v for n, v in self.values.items() if n not in self.external}


def _unknown(name: str, decls: Mapping[str, ParamDecl], what: str, source: str) -> ConfigError:
    known = ", ".join(sorted(decls)) or "(none declared)"
    return UnknownParamError(
        f"unknown parameter {name!r} in {what} ({source}); the declared parameters are: {known}"
    )


def build_config(
    decls: Mapping[str, ParamDecl], peer_id: str, layers: Iterable[ConfigLayer]
) -> PeerConfig:
    """Merge ``layers`` (lowest precedence first) over the declared defaults.

    Setting a name as a local value removes an external definition from a lower layer and the
    other way round. Raises :class:`ConfigError` for unknown names, wrong types, an unbound
    config source, a self-reference or a parameter left without any value.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, d in decls.items():
        values[name] = _copy(d.default)
        sources[name] = "class default"
    ext_raw: dict[str, tuple[str, str, str]] = {}  # local -> (source name, remote, layer)
    cfg_sources: dict[str, str] = {}
    deps: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.local_params.items():
            if name not in decls:
                raise _unknown(name, decls, "local_params", layer.source)
            values[name] = load_value(decls[name], value, layer.source)
            sources[name] = value.source if isinstance(value, Text) else layer.source
            ext_raw.pop(name, None)
        for name, ref in layer.external_params.items():
            if name not in decls:
                raise _unknown(name, decls, "external_params", layer.source)
            src, remote = _split_ref(ref, name, layer.source)
            ext_raw[name] = (src, remote, layer.source)
        for src, pid in layer.config_sources.items():
            cfg_sources[src] = pid
            if src in deps and src not in layer.launch_dependencies:
                deps[src] = pid
        for dep, pid in layer.launch_dependencies.items():
            deps[dep] = pid
            if dep in cfg_sources and dep not in layer.config_sources:
                cfg_sources[dep] = pid
    # shared names: an empty binding takes the other's
    for name in set(cfg_sources) & set(deps):
        if not cfg_sources[name]:
            cfg_sources[name] = deps[name]
        elif not deps[name]:
            deps[name] = cfg_sources[name]
    external: dict[str, ExternalRef] = {}
    for name, (src, remote, layer_source) in ext_raw.items():
        pid = cfg_sources.get(src, src)
        if not pid:
            raise ConfigError(
                f"external parameter {name!r} ({layer_source}) comes from config source "
                f"{src!r}, which is not bound to a peer; bind it with `-c {src} PEER_ID` or "
                f"config_sources={{{src!r}: 'peer_id'}}"
            )
        if pid == peer_id:
            raise ConfigError(
                f"external parameter {name!r} ({layer_source}) refers to the peer itself "
                f"({peer_id!r}); use a local parameter"
            )
        external[name] = ExternalRef(src, pid, remote)
        sources[name] = f"external {src}.{remote} ({layer_source})"
    for dep, pid in deps.items():
        if not pid:
            raise ConfigError(
                f"launch dependency {dep!r} is not bound to a peer; bind it with "
                f"`-d {dep} PEER_ID` or launch_dependencies={{{dep!r}: 'peer_id'}}"
            )
        if pid == peer_id:
            raise ConfigError(f"peer {peer_id!r} cannot be its own launch dependency ({dep!r})")
    missing = [n for n, v in values.items() if v is MISSING and n not in external]
    if missing:
        raise ConfigError(
            f"parameter{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} of "
            f"{peer_id!r} {'have' if len(missing) > 1 else 'has'} no value: declare a default, "
            "or give one in a config file, local_params or `-p NAME VALUE`"
        )
    return PeerConfig(peer_id, dict(decls), values, sources, external, cfg_sources, deps)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- command line

_OPTIONS: dict[str, tuple[str, int]] = {
    "-p": ("local_params", 2),
    "--local-params": ("local_params", 2),
    "--local_params": ("local_params", 2),
    "-e": ("external_params", 2),
    "--external-params": ("external_params", 2),
    "--external_params": ("external_params", 2),
    "-c": ("config_sources", 2),
    "--config-sources": ("config_sources", 2),
    "--config_sources": ("config_sources", 2),
    "-d": ("launch_dependencies", 2),
    "--launch-dependencies": ("launch_dependencies", 2),
    "--launch_dependencies": ("launch_dependencies", 2),
    "-f": ("config_files", 1),
    "--config-file": ("config_files", 1),
    "--config_file": ("config_files", 1),
}


@attrs.frozen
class Overrides:
    """Command-line overrides (``-p/-e/-c/-d/-f``), the highest-precedence configuration.

    Pass them to the constructor as ``config_overrides=``; :func:`parse_overrides` makes
    them. Their layers (:meth:`layers`) come after the constructor arguments: first the
    ``-f`` files in order, then ``-p/-e/-c/-d``, so ``-f`` beats the constructor arguments
    and ``-p`` beats ``-f``.
    """

    config_files: tuple[str, ...] = ()
    local_params: Mapping[str, Any] = attrs.field(factory=dict)
    external_params: Mapping[str, str] = attrs.field(factory=dict)
    config_sources: Mapping[str, str] = attrs.field(factory=dict)
    launch_dependencies: Mapping[str, str] = attrs.field(factory=dict)

    def layers(self) -> list[ConfigLayer]:
        """The ``-f`` files, then the ``-p/-e/-c/-d`` options, as configuration layers."""
        out = [load_config_file(f) for f in self.config_files]
        out.append(
            ConfigLayer.from_args(
                "command line",
                self.local_params,
                self.external_params,
                self.config_sources,
                self.launch_dependencies,
            )
        )
        return out

    def merged(self, later: Overrides) -> Overrides:
        """These overrides followed by ``later`` ones (later names win, files add up)."""
        return Overrides(
            (*self.config_files, *later.config_files),
            {**self.local_params, **later.local_params},
            {**self.external_params, **later.external_params},
            {**self.config_sources, **later.config_sources},
            {**self.launch_dependencies, **later.launch_dependencies},
        )


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """Parse OBCI-style overrides into :class:`~peerkit.ConfiguredPeer` constructor arguments.

    ``-p name value`` (local parameter; the text is parsed with the declared type when the
    peer is built), ``-e name source.param``, ``-c source peer_id``, ``-d name peer_id``,
    ``-f file`` (repeatable; files load in order). Long forms: ``--local-params``,
    ``--external-params``, ``--config-sources``, ``--launch-dependencies``,
    ``--config-file``. Later occurrences win. Returns ``{"config_overrides": Overrides(...)}``
    (use it as ``Peer(url, id, **parse_overrides(argv))``): overrides rank above the
    constructor's ``config_files`` and ``local_params`` etc., the ``-f`` files below the
    other options. :class:`OverrideError` for anything else in ``argv``.
    """
    files: list[str] = []
    maps: dict[str, dict[str, Any]] = {
        "local_params": {},
        "external_params": {},
        "config_sources": {},
        "launch_dependencies": {},
    }
    i = 0
    args = list(argv)
    while i < len(args):
        opt = args[i]
        if opt not in _OPTIONS:
            raise OverrideError(
                f"unknown override {opt!r}; expected -p NAME VALUE, -e NAME SOURCE.PARAM, "
                "-c SOURCE PEER_ID, -d NAME PEER_ID or -f FILE"
            )
        key, nargs = _OPTIONS[opt]
        vals = args[i + 1 : i + 1 + nargs]
        if len(vals) < nargs or any(v in _OPTIONS for v in vals[:1]):
            usage = {
                "local_params": "NAME VALUE",
                "external_params": "NAME SOURCE.PARAM",
                "config_sources": "SOURCE PEER_ID",
                "launch_dependencies": "NAME PEER_ID",
                "config_files": "FILE",
            }[key]
            raise OverrideError(f"{opt} needs {nargs} value{'s' if nargs > 1 else ''}: {usage}")
        i += 1 + nargs
        if key == "config_files":
            files.append(vals[0])
            continue
        name, value = vals
        if not name:
            raise OverrideError(f"{opt}: the name must not be empty")
        if key == "local_params":
            maps[key][name] = Text(value, f"command line -p {name}")
        elif key == "external_params":
            _split_ref(value, name, f"command line {opt}")
            maps[key][name] = value
        else:
            if not value:
                raise OverrideError(f"{opt} {name}: the peer id must not be empty")
            maps[key][name] = value
    return {"config_overrides": Overrides(tuple(files), **maps)}


def merge_overrides(*kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge constructor-argument dicts (e.g. an args file and :func:`parse_overrides`);
    later ones win per name, ``config_files`` are concatenated, ``config_overrides`` merged."""
    out: dict[str, Any] = {}
    for kw in kwargs:
        for key, value in kw.items():
            if value is None:
                out.setdefault(key, None)
            elif key == "config_files":
                out[key] = [*(out.get(key) or ()), *value]
            elif key == "config_overrides" and isinstance(out.get(key), Overrides):
                out[key] = out[key].merged(value)
            elif key in _SECTIONS:
                base = out.get(key) or {}
                if not isinstance(value, Mapping) or not isinstance(base, Mapping):
                    # lists of dependency ids
                    base = _deps_map(base, "merge") if key == "launch_dependencies" else base
                    value = _deps_map(value, "merge") if key == "launch_dependencies" else value
                out[key] = {**base, **value}
            else:
                out[key] = value
    return out
