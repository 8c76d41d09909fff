"""The Message base, the @message decorator, the registry and the built-in messages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest

import peerkit
from peerkit import messages
from peerkit.errors import DecodeError, PeerkitError, UnknownMessageType
from peerkit.messages import (
    BrokerGoodbyeMsg,
    BrokerShutdownMsg,
    ErrorMsg,
    HeartbeatMsg,
    Message,
    MessagesDropped,
    OkMsg,
    PanickMsg,
    PeerControlMessage,
    PeerReady,
    get_message_class,
    message,
    message_type_of,
    registered_types,
)


@message
class TmSample(Message):
    channel: int
    values: list[float] = attrs.field(factory=list)


@message(type="tm.custom-name")
class TmCustom(Message):
    text: str


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Undo registrations a test makes (the registry is process-global)."""
    saved = dict(messages._REGISTRY)
    try:
        yield
    finally:
        messages._REGISTRY.clear()
        messages._REGISTRY.update(saved)


# ------------------------------------------------------------------ @message classes


def test_message_class_is_attrs_frozen_and_keyword_only() -> None:
    assert attrs.has(TmSample)
    fields = attrs.fields(TmSample)
    assert [f.name for f in fields] == ["sender", "channel", "values"]
    assert all(f.kw_only for f in fields)
    msg = TmSample(channel=3, values=[1.0])
    assert msg.channel == 3
    assert msg.values == [1.0]
    assert msg.sender == ""


def test_positional_arguments_rejected() -> None:
    with pytest.raises(TypeError):
        TmSample(3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        TmCustom("hello")  # type: ignore[misc]
    with pytest.raises(TypeError):
        OkMsg("detail")  # type: ignore[misc]


def test_assignment_rejected() -> None:
    msg = TmSample(channel=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        msg.channel = 2  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        msg.sender = "mallory"  # type: ignore[misc]
    assert msg.channel == 1
    assert msg.sender == ""


def test_missing_required_field_rejected() -> None:
    with pytest.raises(TypeError, match="channel"):
        TmSample()  # type: ignore[call-arg]


def test_messages_compare_and_hash_by_value() -> None:
    assert TmSample(channel=1, values=[2.0]) == TmSample(channel=1, values=[2.0])
    assert TmSample(channel=1) != TmSample(channel=2)
    assert TmSample(channel=1, sender="a") != TmSample(channel=1, sender="b")
    assert hash(OkMsg(detail="x")) == hash(OkMsg(detail="x"))


def test_subtype_is_sender() -> None:
    msg = TmSample(channel=1, sender="amp-1")
    assert msg.subtype == "amp-1"
    assert TmSample(channel=1).subtype == ""
    assert attrs.evolve(msg, sender="other").subtype == "other"


def test_public_names() -> None:
    assert peerkit.Message is Message
    assert peerkit.message is message


# ------------------------------------------------------------------ registry


def test_registered_by_class_name() -> None:
    assert get_message_class("TmSample") is TmSample
    assert TmSample.message_type() == "TmSample"
    assert message_type_of(TmSample) == "TmSample"
    assert message_type_of(TmSample(channel=1)) == "TmSample"
    assert registered_types()["TmSample"] is TmSample


def test_registered_by_explicit_type() -> None:
    assert get_message_class("tm.custom-name") is TmCustom
    assert TmCustom.message_type() == "tm.custom-name"
    assert message_type_of(TmCustom(text="x")) == "tm.custom-name"
    # The class name is not registered when a type is given.
    with pytest.raises(UnknownMessageType):
        get_message_class("TmCustom")


def test_unknown_type_name() -> None:
    with pytest.raises(UnknownMessageType, match=r"'tm\.nope'") as info:
        get_message_class("tm.nope")
    assert isinstance(info.value, DecodeError)
    assert isinstance(info.value, PeerkitError)
    assert "import the module" in str(info.value)


def test_registered_types_is_a_copy(clean_registry: None) -> None:
    snapshot = registered_types()
    snapshot["tm.injected"] = TmSample
    with pytest.raises(UnknownMessageType):
        get_message_class("tm.injected")


def _define_taken_a() -> type[Message]:
    @message(type="tm.taken")
    class TakenA(Message):
        x: int = 0

    return TakenA


def _define_taken_b() -> type[Message]:
    @message(type="tm.taken")
    class TakenB(Message):
        y: int = 0

    return TakenB


def test_different_class_under_taken_name_refused(clean_registry: None) -> None:
    first = _define_taken_a()
    with pytest.raises(PeerkitError) as info:
        _define_taken_b()
    text = str(info.value)
    assert f"{__name__}._define_taken_a.<locals>.TakenA" in text
    assert f"{__name__}._define_taken_b.<locals>.TakenB" in text
    assert "'tm.taken'" in text
    assert "@message(type=" in text
    # The first registration stands.
    assert get_message_class("tm.taken") is first
    assert first.message_type() == "tm.taken"


def test_class_name_clash_refused(clean_registry: None) -> None:
    # A second class that happens to be called TmSample (another qualname) is refused.
    def define() -> None:
        @message
        class TmSample(Message):
            other: str = ""

    with pytest.raises(PeerkitError, match="already registered"):
        define()
    assert get_message_class("TmSample") is globals()["TmSample"]


def _define_same() -> type[Message]:
    @message(type="tm.redefined")
    class Same(Message):
        value: int = 0

    return Same


def test_redefining_same_module_and_qualname_allowed(clean_registry: None) -> None:
    first = _define_same()
    second = _define_same()  # e.g. a module reloaded
    assert first is not second
    assert (first.__module__, first.__qualname__) == (second.__module__, second.__qualname__)
    assert get_message_class("tm.redefined") is second
    assert second.message_type() == "tm.redefined"


def test_unregistered_subclass_message_type_raises_with_hint() -> None:
    class Undecorated(TmSample):
        pass

    with pytest.raises(PeerkitError, match=r"@peerkit\.message") as info:
        Undecorated.message_type()
    assert "Undecorated" in str(info.value)
    with pytest.raises(PeerkitError, match="not a registered message"):
        message_type_of(Undecorated)
    # The registered parent is unaffected.
    assert TmSample.message_type() == "TmSample"


def test_plain_message_subclass_message_type_raises() -> None:
    class Plain(Message):
        pass

    with pytest.raises(PeerkitError, match="Plain is not a registered message"):
        Plain.message_type()
    with pytest.raises(PeerkitError):
        Message.message_type()


def test_decorated_subclass_of_a_message_inherits_fields(clean_registry: None) -> None:
    @message(type="tm.sample2")
    class TmSample2(TmSample):
        extra: str = ""

    msg = TmSample2(channel=1, extra="e")
    assert [f.name for f in attrs.fields(TmSample2)] == ["sender", "channel", "values", "extra"]
    assert TmSample2.message_type() == "tm.sample2"
    assert TmSample.message_type() == "TmSample"
    assert msg.channel == 1


@pytest.mark.parametrize("target", [int, object, attrs.define(type("Plain", (), {})), 42])
def test_message_decorates_only_message_subclasses(target: Any, clean_registry: None) -> None:
    before = registered_types()
    with pytest.raises(PeerkitError, match=r"subclasses of peerkit\.Message"):
        message(target)
    assert registered_types() == before


@pytest.mark.parametrize(
    ("bad", "why"), [("", "non-empty string"), (3, "non-empty string"), ("a\udc80", "UTF-8")]
)
def test_bad_type_names_refused(bad: Any, why: str, clean_registry: None) -> None:
    before = registered_types()

    with pytest.raises(PeerkitError, match=why):

        @message(type=bad)
        class BadName(Message):
            pass

    assert registered_types() == before


# ------------------------------------------------------------------ built-ins


def _field_defaults(cls: type[Message]) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in attrs.fields(cls):
        if f.default is attrs.NOTHING:
            out[f.name] = "REQUIRED"
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            out[f.name] = f.default.factory()  # type: ignore[attr-defined]
        else:
            out[f.name] = f.default
    return out


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (OkMsg, {"sender": "", "detail": ""}),
        (ErrorMsg, {"sender": "", "code": "REQUIRED", "details": ""}),
        (HeartbeatMsg, {"sender": ""}),
        (PeerControlMessage, {"sender": "", "peer_id": "REQUIRED", "action": "REQUIRED"}),
        (PeerReady, {"sender": ""}),
        (
            PanickMsg,
            {"sender": "", "message": "", "error_type": "", "was_essential": True},
        ),
        (BrokerGoodbyeMsg, {"sender": "", "error_msg": None}),
        (BrokerShutdownMsg, {"sender": "", "msg": "Shut down all peers."}),
        (MessagesDropped, {"sender": "", "count": "REQUIRED"}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_builtin_messages(cls: type[Message], fields: dict[str, object]) -> None:
    assert issubclass(cls, Message)
    assert _field_defaults(cls) == fields
    assert cls.message_type() == cls.__name__
    assert get_message_class(cls.__name__) is cls
    assert all(f.kw_only for f in attrs.fields(cls))


def test_builtin_messages_construct() -> None:
    assert ErrorMsg(code="bad", details="why").code == "bad"
    assert PanickMsg(message="boom", error_type="ValueError").was_essential is True
    assert BrokerGoodbyeMsg(error_msg="died").error_msg == "died"
    assert MessagesDropped(count=7).count == 7
    assert BrokerShutdownMsg().msg == "Shut down all peers."


@pytest.mark.parametrize("action", ["start", "stop", "close", "impedance_check", "START", "x y"])
def test_peer_control_message_any_action(action: str) -> None:
    msg = PeerControlMessage(peer_id="p1", action=action)
    assert (msg.peer_id, msg.action) == ("p1", action)
    assert messages.CONTROL_ACTIONS == ("start", "stop", "close")


@pytest.mark.parametrize("action", ["", "bad\naction", "\x00", None, 1, b"start"])
def test_peer_control_message_invalid_actions(action: Any) -> None:
    with pytest.raises(messages.MessageFieldError, match="non-empty printable string") as info:
        PeerControlMessage(peer_id="p1", action=action)
    # a PeerkitError (peerkit ctl reports it), and still a ValueError as before
    assert isinstance(info.value, PeerkitError)
    assert isinstance(info.value, ValueError)


def test_peer_control_message_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        PeerControlMessage("p1", "start")  # type: ignore[misc]
