"""Sans-IO tests of parameter declarations, type checking, loading and overrides."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerkit.params import (
    MISSING,
    ConfigError,
    ConfigLayer,
    OverrideError,
    Overrides,
    ParamTypeError,
    Text,
    UnknownParamError,
    build_config,
    check_value,
    declared_params,
    load_config_file,
    merge_overrides,
    param,
    parse_overrides,
    parse_text,
    type_name,
)


class Base:
    rate: int = param(256)
    gain: float = param(1.0, doc="analogue gain")
    name: str = param("amp")
    enabled: bool = param(True)
    channels: list[str] = param(["C3", "Cz"])
    weights: dict[str, float] = param({})
    mode: Literal["fast", "slow"] = param("fast")
    label: str | None = param(None)
    source: int = param()

    def get_param(self, name: str) -> Any:
        return f"value of {name}"


class Child(Base):
    rate: int = param(512)
    extra = param(3)  # type inferred from the default
    gain = 2.0  # a plain attribute hides the parameter


def decls() -> dict[str, Any]:
    return declared_params(Child)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- declarations


def test_declarations_types_defaults_and_inheritance() -> None:
    d = decls()
    assert set(d) == {
        "rate",
        "name",
        "enabled",
        "channels",
        "weights",
        "mode",
        "label",
        "source",
        "extra",
    }
    assert d["rate"].default == 512 and d["rate"].type is int
    assert d["extra"].type is int
    assert d["source"].default is MISSING
    assert type_name(d["channels"].type) == "list[str]"
    assert type_name(d["label"].type) == "str | None"
    assert declared_params(Base)["gain"].doc == "analogue gain"


def test_descriptor_reads_through_get_param_and_refuses_assignment() -> None:
    obj = Child()
    assert obj.rate == "value of rate"  # type: ignore[comparison-overlap]
    with pytest.raises(AttributeError, match=r"set_param\('rate', value\)"):
        obj.rate = 3
    assert isinstance(Child.__dict__["rate"], object)


def test_bad_declarations() -> None:
    class NoType:
        x = param()

    with pytest.raises(ConfigError, match="needs a type annotation"):
        declared_params(NoType)

    class Unsupported:
        x: set[int] = param(set())

    with pytest.raises(ConfigError, match=r"unsupported type set\[int\]"):
        declared_params(Unsupported)

    class BadDefault:
        x: int = param("abc")  # type: ignore[assignment]

    with pytest.raises(ParamTypeError, match=r"'x' \(default of .*BadDefault\).*expected int"):
        declared_params(BadDefault)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("tp", "value", "expected"),
    [
        (int, 3, 3),
        (float, 3, 3.0),
        (float, 2.5, 2.5),
        (bool, False, False),
        (str, "x", "x"),
        (list[int], (1, 2), [1, 2]),
        (tuple[int, ...], [1, 2], (1, 2)),
        (tuple[int, str], [1, "a"], (1, "a")),
        (dict[str, list[float]], {"a": [1, 2.5]}, {"a": [1.0, 2.5]}),
        (int | None, None, None),
        (Literal["a", "b"], "b", "b"),
        (Any, {"k": [1, "x", None]}, {"k": [1, "x", None]}),
    ],
)
def test_check_value_accepts(tp: Any, value: Any, expected: Any) -> None:
    got = check_value(tp, value, name="p", source="test")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("tp", "value", "fragment"),
    [
        (int, "abc", "expected int, got str 'abc'"),
        (int, True, "expected int, got bool"),
        (int, 1.5, "expected int, got float"),
        (bool, 1, "expected bool, got int"),
        (str, 3, "expected str"),
        (list[int], [1, "x"], r"expected int at \[1\]"),
        (dict[str, int], {"a": "b"}, r"expected int at \['a'\]"),
        (tuple[int, int], [1], r"2 items"),
        (Literal["a", "b"], "c", "expected one of 'a', 'b'"),
        (Any, {1, 2}, "cannot travel between peers"),
    ],
)
def test_check_value_rejects_with_name_and_source(tp: Any, value: Any, fragment: str) -> None:
    with pytest.raises(
        ParamTypeError, match=rf"parameter 'p' \(config file x\.toml\): .*{fragment}"
    ):
        check_value(tp, value, name="p", source="config file x.toml")


@pytest.mark.parametrize(
    ("tp", "text", "expected"),
    [
        (int, "12", 12),
        (int, "-3", -3),
        (int, "0x10", 16),
        (int, "012", 12),
        (float, "2.5", 2.5),
        (float, "3", 3.0),
        (bool, "true", True),
        (bool, "0", False),
        (bool, "Yes", True),
        (str, "12", "12"),
        (list[int], "[1, 2, 3]", [1, 2, 3]),
        (dict[str, float], "{gain = 2, off = 0.5}", {"gain": 2.0, "off": 0.5}),
        (int | None, "none", None),
        (int | None, "4", 4),
        (str | None, "none", None),
        (int | str, "12", 12),
        (int | str, "x", "x"),
        (Literal[1, 2], "2", 2),
        (Any, "[1, 2]", [1, 2]),
        (Any, "hello world", "hello world"),
    ],
)
def test_parse_text(tp: Any, text: str, expected: Any) -> None:
    got = parse_text(tp, text, name="p", source="cli")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("tp", "text", "fragment"),
    [
        (int, "abc", "'abc' is not an int"),
        (float, "x", "is not a float"),
        (bool, "maybe", "not a bool"),
        (list[int], "[1, 'a']", "expected int"),
        (list[int], "1, 2", "TOML inline syntax"),
        (Literal["a"], "b", "not one of"),
    ],
)
def test_parse_text_errors(tp: Any, text: str, fragment: str) -> None:
    with pytest.raises(ParamTypeError, match=rf"parameter 'p' \(command line -p p\).*{fragment}"):
        parse_text(tp, text, name="p", source="command line -p p")


@given(st.integers())
def test_parse_int_roundtrip(n: int) -> None:
    assert parse_text(int, str(n), name="n", source="t") == n


@given(st.floats(allow_nan=False))
def test_parse_float_roundtrip(x: float) -> None:
    assert parse_text(float, repr(x), name="x", source="t") == x


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    )
)
def test_check_value_any_is_identity_for_portable_values(value: Any) -> None:
    assert check_value(Any, value, name="v", source="t") == value


def test_nan_text_only_from_nan() -> None:
    assert math.isnan(parse_text(float, "nan", name="x", source="t"))


# ----------------------------------------------------------------------------- files


def test_load_config_file_sections(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "a.toml",
        """
        [local_params]
        rate = 128
        [external_params]
        extra = "amp.sampling_rate"
        [config_sources]
        amp = "amplifier"
        [launch_dependencies]
        amp = ""
        """.replace("        ", ""),
    )
    layer = load_config_file(f)
    assert layer.local_params == {"rate": 128}
    assert layer.external_params == {"extra": "amp.sampling_rate"}
    assert layer.config_sources == {"amp": "amplifier"}
    assert layer.launch_dependencies == {"amp": ""}
    assert str(f) in layer.source


def test_load_config_file_list_dependencies(tmp_path: Path) -> None:
    f = write(tmp_path, "a.toml", 'launch_dependencies = ["amp", "filter"]\n')
    assert load_config_file(f).launch_dependencies == {"amp": "amp", "filter": "filter"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[locals]\nx = 1\n", "unknown sections or keys 'locals'"),
        ("x = = 1", "is not valid TOML"),
        ("local_params = 3\n", "local_params .* must be a mapping"),
        ("[external_params]\nx = 3\n", "'x' must map to a string"),
        ('launch_dependencies = "amp"\n', "a list of peer ids"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, fragment: str) -> None:
    f = write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError, match=fragment):
        load_config_file(f)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- precedence


def test_precedence_of_all_sources(tmp_path: Path) -> None:
    f1 = write(
        tmp_path,
        "one.toml",
        '[local_params]\nrate = 1\nname = "file1"\nenabled = false\nsource = 5\nextra = 10\n',
    )
    # a -f file from the command line ranks above the constructor arguments
    f2 = write(tmp_path, "two.toml", '[local_params]\nrate = 2\nname = "file2"\nextra = 20\n')
    cli = parse_overrides(["-p", "rate", "4", "-f", str(f2)])
    kwargs = merge_overrides(
        {"config_files": [str(f1)], "local_params": {"rate": 3, "mode": "slow", "name": "ctor"}},
        cli,
    )
    layers = [load_config_file(f) for f in kwargs["config_files"]]
    layers.append(ConfigLayer.from_args("constructor argument", kwargs["local_params"]))
    layers += kwargs["config_overrides"].layers()
    cfg = build_config(decls(), "me", layers)
    assert cfg.values["rate"] == 4 and cfg.sources["rate"] == "command line -p rate"
    assert cfg.values["mode"] == "slow" and cfg.sources["mode"] == "constructor argument"
    assert cfg.values["name"] == "file2" and "two.toml" in cfg.sources["name"]
    assert cfg.values["extra"] == 20 and "two.toml" in cfg.sources["extra"]
    assert cfg.values["enabled"] is False and "one.toml" in cfg.sources["enabled"]
    assert cfg.values["source"] == 5 and "one.toml" in cfg.sources["source"]
    assert cfg.values["channels"] == ["C3", "Cz"] and cfg.sources["channels"] == "class default"
    # mutable defaults are copied
    cfg.values["channels"].append("x")
    assert declared_params(Child)["channels"].default == ["C3", "Cz"]


def test_command_line_external_source_and_dependency_override_lower_layers(
    tmp_path: Path,
) -> None:
    f = write(
        tmp_path,
        "ext.toml",
        '[external_params]\nsource = "amp.rate"\n[config_sources]\namp = "a1"\n'
        '[launch_dependencies]\namp = "a1"\n',
    )
    ctor = ConfigLayer.from_args("constructor argument", {"extra": 1}, {"extra": "amp.x"})
    (cli,) = parse_overrides(
        ["-f", str(f), "-e", "extra", "other.y", "-c", "amp", "a2", "-d", "amp", "a3"]
    ).values()
    cfg = build_config(decls(), "me", [ctor, *cli.layers()])
    assert str(cfg.external["source"]) == "a2.rate"  # -c beats the file's binding
    assert str(cfg.external["extra"]) == "other.y"  # -e beats the constructor's
    assert cfg.launch_dependencies == {"amp": "a3"}
    assert "command line" in cfg.sources["extra"]
    (cli,) = parse_overrides(["-p", "source", "8"]).values()
    cfg = build_config(decls(), "me", [load_config_file(f), *cli.layers()])
    assert cfg.values["source"] == 8 and "source" not in cfg.external  # -p beats a file's -e


def test_local_and_external_override_each_other() -> None:
    layers = [
        ConfigLayer.from_args("low", {"source": 1}, {"extra": "amp.rate"}),
        ConfigLayer.from_args("high", {"extra": 7}, {"source": "amp.sampling_rate"}),
    ]
    cfg = build_config(decls(), "me", layers)
    assert cfg.values["extra"] == 7 and "extra" not in cfg.external
    assert str(cfg.external["source"]) == "amp.sampling_rate"
    assert cfg.unresolved() == []  # source has its value 1 as a default until resolved
    assert "source" not in cfg.local_values()


def test_config_sources_bind_external_params_and_dependencies() -> None:
    low = ConfigLayer.from_args(
        "file", {}, {"source": "amp.sampling_rate"}, {"amp": ""}, {"amp": ""}
    )
    cli = ConfigLayer.from_args("cli", config_sources={"amp": "amplifier-7"})
    cfg = build_config(decls(), "me", [low, cli])
    assert cfg.external["source"].peer_id == "amplifier-7"
    assert cfg.launch_dependencies == {"amp": "amplifier-7"}
    # -d binds the shared name too
    cfg = build_config(
        decls(), "me", [low, ConfigLayer.from_args("cli", launch_dependencies={"amp": "a2"})]
    )
    assert cfg.external["source"].peer_id == "a2"
    # a source name not in config_sources is a peer id
    cfg = build_config(decls(), "me", [ConfigLayer.from_args("c", {}, {"source": "gen.x"})])
    assert cfg.external["source"].peer_id == "gen" and cfg.external["source"].param == "x"
    # peer ids with dots
    cfg = build_config(decls(), "me", [ConfigLayer.from_args("c", {}, {"source": "lab.amp.x"})])
    assert cfg.external["source"].peer_id == "lab.amp"


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (
            ConfigLayer.from_args("ctor", {}, {"source": "amp.rate"}, {"amp": ""}),
            "config source 'amp', which is not bound.*-c amp PEER_ID",
        ),
        (ConfigLayer.from_args("ctor", {}, {"source": "me.rate"}), "refers to the peer itself"),
        (ConfigLayer.from_args("ctor", {}, {"source": "norate"}), "not of the form 'source.param'"),
        (ConfigLayer.from_args("ctor", launch_dependencies=["me"]), "its own launch dependency"),
        (ConfigLayer.from_args("ctor", launch_dependencies={"x": ""}), "-d x PEER_ID"),
        (ConfigLayer.from_args("ctor", {"source": "abc"}), r"'source' \(ctor\): expected int"),
    ],
)
def test_config_errors(layer: ConfigLayer, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_config(decls(), "me", [layer])


def test_parameter_without_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'source' of 'me' has no value"):
        build_config(decls(), "me", [])


@pytest.mark.parametrize("section", ["local_params", "external_params"])
def test_unknown_parameter_names_are_errors(section: str) -> None:
    value = 1 if section == "local_params" else "amp.x"
    layer = ConfigLayer.from_args("config file x.toml", **{section: {"sampling": value}})
    with pytest.raises(UnknownParamError, match=rf"'sampling' in {section} \(config file x"):
        build_config(decls(), "me", [layer])


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_all_options() -> None:
    got = parse_overrides(
        [
            "-p",
            "rate",
            "12",
            "--local-params",
            "name",
            "x y",
            "-e",
            "source",
            "amp.sampling_rate",
            "-c",
            "amp",
            "amplifier",
            "-d",
            "amp",
            "amplifier",
            "-f",
            "a.toml",
            "--config_file",
            "b.toml",
            "-p",
            "rate",
            "13",
        ]
    )
    assert got == {
        "config_overrides": Overrides(
            ("a.toml", "b.toml"),
            local_params={
                "rate": Text("13", "command line -p rate"),
                "name": Text("x y", "command line -p name"),
            },
            external_params={"source": "amp.sampling_rate"},
            config_sources={"amp": "amplifier"},
            launch_dependencies={"amp": "amplifier"},
        )
    }


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["-x", "a"], "unknown override '-x'"),
        (["-p", "rate"], "-p needs 2 values: NAME VALUE"),
        (["-f"], "-f needs 1 value: FILE"),
        (["-f", "-p", "a", "b"], "-f needs 1 value"),
        (["-e", "x", "nodot"], "not of the form 'source.param'"),
        (["-c", "amp", ""], "peer id must not be empty"),
        (["peer_id"], "unknown override 'peer_id'"),
    ],
)
def test_parse_overrides_errors(argv: list[str], fragment: str) -> None:
    with pytest.raises(OverrideError if "form" not in fragment else ConfigError, match=fragment):
        parse_overrides(argv)


def test_command_line_values_get_the_declared_type() -> None:
    kw = parse_overrides(
        ["-p", "rate", "12", "-p", "channels", '["O1", "O2"]', "-p", "source", "1"]
    )
    cfg = build_config(decls(), "me", kw["config_overrides"].layers())
    assert cfg.values["rate"] == 12 and cfg.values["channels"] == ["O1", "O2"]
    kw = parse_overrides(["-p", "rate", "abc", "-p", "source", "1"])
    with pytest.raises(
        ParamTypeError, match=r"'rate' \(command line -p rate\): 'abc' is not an int"
    ):
        build_config(decls(), "me", kw["config_overrides"].layers())


def test_merge_overrides() -> None:
    merged = merge_overrides(
        {"config_files": ["a"], "local_params": {"x": 1, "y": 2}, "launch_dependencies": ["p"]},
        {"config_files": ["b"], "local_params": {"x": 3}, "launch_dependencies": {"q": "q2"}},
        {"autostart": False},
    )
    assert merged == {
        "config_files": ["a", "b"],
        "local_params": {"x": 3, "y": 2},
        "launch_dependencies": {"p": "p", "q": "q2"},
        "autostart": False,
    }
    merged = merge_overrides(
        parse_overrides(["-p", "x", "1", "-f", "a", "-c", "s", "p1"]),
        parse_overrides(["-p", "x", "2", "-f", "b", "-d", "d", "p2"]),
    )
    assert merged == {
        "config_overrides": Overrides(
            ("a", "b"),
            {"x": Text("2", "command line -p x")},
            {},
            {"s": "p1"},
            {"d": "p2"},
        )
    }


def test_only_parameter_annotations_are_evaluated() -> None:
    class WithForwardRefs:
        __annotations__ = {"other": "NotDefinedAnywhere", "x": "list[int]", "y": "Undefined"}
        x = param([1])

    assert declared_params(WithForwardRefs)["x"].type == list[int]

    class BadRef:
        __annotations__ = {"y": "Undefined"}
        y = param(1)

    with pytest.raises(ConfigError, match="cannot evaluate the annotation 'Undefined'"):
        declared_params(BadRef)
