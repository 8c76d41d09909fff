"""Mistakes caught where they are made: an undecorated message class, a message field of the
wrong type, a handler whose signature cannot take a message."""

from __future__ import annotations

import enum
import functools
from typing import Any, Literal

import attrs
import msgpack
import pytest

from peerkit import Message, PeerkitError, codec, message
from peerkit._handlers import HandlerSignatureError, check_handler
from peerkit.messages import MessageFieldError

# ------------------------------------------------------------------ undecorated Message classes


def test_undecorated_message_says_to_decorate_it() -> None:
    class Forgotten(Message):
        value: int = 0

    with pytest.raises(PeerkitError, match=r"not decorated: put @peerkit.message") as info:
        Forgotten(value=1)  # type: ignore[call-arg]
    assert "class Forgotten(...)" in str(info.value)
    with pytest.raises(PeerkitError, match="not decorated"):
        Forgotten()
    # used without building one: the registry's own message
    with pytest.raises(PeerkitError, match=r"decorate it with @peerkit\.message"):
        Forgotten.message_type()


def test_undecorated_subclass_of_a_decorated_message() -> None:
    @message(type="tem.Base")
    class Base(Message):
        x: int = 0

    class Child(Base):
        y: int = 0

    assert Base(x=1).x == 1
    with pytest.raises(PeerkitError, match=r"Child subclasses peerkit\.Message but is not"):
        Child(x=1)


def test_decorating_removes_the_guard() -> None:
    @message(type="tem.Fine")
    class Fine(Message):
        x: int = 0

    assert Fine(x=2).x == 2
    assert Fine().x == 0

    @message(type="tem.FineChild")
    class FineChild(Fine):
        y: str = ""

    assert FineChild(x=1, y="a") == FineChild(x=1, y="a")


# ------------------------------------------------------------------ field types at construction


@attrs.frozen
class Point:
    x: float
    y: float


class Colour(enum.Enum):
    red = "red"


@message(type="tem.Typed")
class Typed(Message):
    i: int = 0
    f: float = 0.0
    s: str = ""
    b: bool = False
    raw: bytes = b""
    ints: list[int] = attrs.field(factory=list)
    names: dict[str, int] = attrs.field(factory=dict)
    pair: tuple[int, str] = (0, "")
    maybe: int | None = None
    either: int | str = 0
    point: Point | None = None
    mode: Literal["fast", "slow"] = "fast"
    colour: Colour = Colour.red
    anything: Any = None


GOOD: list[dict[str, Any]] = [
    {},
    {"i": 3, "f": 1.5, "s": "x", "b": True, "raw": b"\x00"},
    {"f": 2},  # an int for a float, as the codec accepts
    {"raw": bytearray(b"ab")},
    {"ints": [1, 2], "names": {"a": 1}, "pair": (1, "a")},
    {"ints": (1, 2)},  # a tuple for a list: sent as an array
    {"maybe": None, "either": "text", "point": Point(x=1, y=2), "mode": "slow"},
    {"anything": object()},
    {"ints": ["not checked inside: the receiver's decoder checks elements"]},
]

BAD: list[tuple[dict[str, Any], str]] = [
    ({"i": "3"}, r"Typed.i must be an int \(it is declared `i: int`\), got str '3'"),
    ({"i": True}, "Typed.i must be an int"),
    ({"i": 1.0}, "Typed.i must be an int"),
    ({"f": "1.5"}, "Typed.f must be a float"),
    ({"f": False}, "Typed.f must be a float"),
    ({"s": b"x"}, "Typed.s must be a str"),
    ({"b": 1}, "Typed.b must be a bool"),
    ({"raw": "text"}, "Typed.raw must be bytes"),
    ({"ints": "123"}, "Typed.ints must be a list"),
    ({"ints": None}, "Typed.ints must be a list"),
    ({"names": [("a", 1)]}, "Typed.names must be a dict"),
    ({"maybe": "1"}, "Typed.maybe must be an int or None"),
    ({"either": 1.5}, "Typed.either must be an int or a str"),
    ({"point": (1, 2)}, "Typed.point must be a Point or None"),
    ({"mode": "medium"}, "Typed.mode must be 'fast' or 'slow'"),
    ({"colour": "red"}, "Typed.colour must be a Colour"),
]


@pytest.mark.parametrize("fields", GOOD)
def test_good_fields_accepted_and_still_travel(fields: dict[str, Any]) -> None:
    msg = Typed(**fields)
    for name, value in fields.items():
        assert getattr(msg, name) is value


@pytest.mark.parametrize(("fields", "words"), BAD)
def test_wrong_field_type_fails_at_construction(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(MessageFieldError, match=words) as info:
        Typed(**fields)
    assert "convert the value, or change the field's annotation" in str(info.value)
    assert isinstance(info.value, PeerkitError)
    assert isinstance(info.value, TypeError)


def test_evolve_is_checked_too() -> None:
    msg = Typed(i=1)
    with pytest.raises(MessageFieldError):
        attrs.evolve(msg, i="2")


def test_long_values_are_shortened_in_the_error() -> None:
    with pytest.raises(MessageFieldError) as info:
        Typed(i="x" * 500)
    assert len(str(info.value)) < 300


def test_user_post_init_runs_after_the_checks() -> None:
    seen: list[int] = []

    @message(type="tem.Hooked")
    class Hooked(Message):
        n: int

        def __attrs_post_init__(self) -> None:
            seen.append(self.n)
            if self.n < 0:
                raise ValueError("n must not be negative")

    Hooked(n=1)
    with pytest.raises(MessageFieldError):
        Hooked(n="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        Hooked(n=-1)
    assert seen == [1, -1]

    @message(type="tem.HookedChild")
    class HookedChild(Hooked):
        extra: str = ""

    HookedChild(n=2, extra="e")  # inherits the user's hook, checks its own field too
    with pytest.raises(MessageFieldError, match=r"HookedChild\.extra"):
        HookedChild(n=3, extra=3)  # type: ignore[arg-type]
    assert seen == [1, -1, 2]


def test_forward_reference_resolved_at_first_construction() -> None:
    @message(type="tem.Forward")
    class Forward(Message):
        later: LaterDefined | None = None

    assert Forward().later is None
    assert Forward(later=LaterDefined(v=1)).later == LaterDefined(v=1)
    with pytest.raises(MessageFieldError, match=r"Forward\.later must be a LaterDefined"):
        Forward(later=1)  # type: ignore[arg-type]


@attrs.frozen
class LaterDefined:
    v: int


def test_decoding_still_reports_wrong_types_from_the_network() -> None:
    body = codec.encode_body(Typed(i=1))
    assert codec.decode_body(Typed, body, "a") == Typed(sender="a", i=1)
    with pytest.raises(codec.DecodeError, match="Typed"):
        codec.decode_body(Typed, msgpack.packb({"i": "1"}), "a")


# ------------------------------------------------------------------ handler signatures


def one(msg: object) -> None:
    pass


async def one_async(msg: object) -> None:
    pass


def with_default(msg: object, extra: int = 0) -> None:
    pass


def star(*args: object) -> None:
    pass


def two(msg: object, other: object) -> None:
    pass


def none() -> None:
    pass


def kw_required(msg: object, *, flag: bool) -> None:
    pass


def kw_optional(msg: object, *, flag: bool = False) -> None:
    pass


def keyword_only_msg(*, msg: object) -> None:
    pass


class Holder:
    def method(self, msg: object) -> None:
        pass

    async def amethod(self, msg: object) -> None:
        pass

    def no_self() -> None:  # type: ignore[misc]  # the mistake under test
        pass

    @staticmethod
    def static(msg: object) -> None:
        pass

    @classmethod
    def klass(cls, msg: object) -> None:
        pass


class CallableOne:
    def __call__(self, msg: object) -> None:
        pass


class CallableNone:
    def __call__(self) -> None:
        pass


ACCEPTED: list[Any] = [
    one,
    one_async,
    with_default,
    star,
    kw_optional,
    lambda m: None,
    Holder().method,
    Holder().amethod,
    Holder.static,
    Holder.klass,
    CallableOne(),
    functools.partial(two, "bound first"),
    functools.partial(kw_required, flag=True),
    print,  # a built-in: judged by its signature when it has one, trusted otherwise
    len,
    dict.fromkeys,
]

REFUSED: list[tuple[Any, str]] = [
    (none, "takes exactly one positional argument"),
    (lambda: None, "takes exactly one positional argument"),
    (two, "give its other parameters defaults"),
    (kw_required, "give its other parameters defaults"),
    (keyword_only_msg, "make `msg` a positional parameter"),
    (Holder().no_self, "is a method: give it `self` first"),
    (Holder.method, "pass the bound method"),
    (CallableNone(), "takes exactly one positional argument"),
    (functools.partial(one, "already bound"), "takes exactly one positional argument"),
    ("not callable", "must be a function or method taking the message"),
    (None, "must be a function or method taking the message"),
]


@pytest.mark.parametrize("handler", ACCEPTED)
def test_handler_accepted(handler: Any) -> None:
    check_handler(handler, "subscribe_for_all_msg_subtype(Typed)")


@pytest.mark.parametrize(("handler", "hint"), REFUSED)
def test_handler_refused_with_the_fix(handler: Any, hint: str) -> None:
    with pytest.raises(HandlerSignatureError, match=hint) as info:
        check_handler(handler, "subscribe_for_all_msg_subtype(Typed)")
    text = str(info.value)
    assert text.startswith("subscribe_for_all_msg_subtype(Typed): ")
    assert isinstance(info.value, PeerkitError)
    assert isinstance(info.value, TypeError)


def test_handler_error_names_the_handler_and_its_signature() -> None:
    with pytest.raises(HandlerSignatureError) as info:
        check_handler(two, "register_query_handler(Typed)")
    assert "two(msg: 'object', other: 'object')" in str(info.value)
