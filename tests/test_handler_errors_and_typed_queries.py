"""A subscription handler's error: fatal by default, or logged and counted; typed query
results."""

from __future__ import annotations

from typing import assert_type

import pytest
import trio

from peerkit import Broker, Message, Peer, PeerkitError, QueryAnswerUnknown, message
from peerkit.testing import wait_for_condition


@message(type="herr.Reading")
class Reading(Message):
    value: int


@message(type="herr.Add")
class Add(Message):
    a: int
    b: int


@message(type="herr.Sum")
class Sum(Message):
    value: int


def picky(got: list[int]) -> object:
    def handle(msg: Reading) -> None:
        if msg.value % 3 == 0:
            raise ValueError(f"bad reading {msg.value}")
        got.append(msg.value)

    return handle


async def test_by_default_a_handler_error_kills_the_peer(broker: Broker) -> None:
    with trio.fail_after(10):
        got: list[int] = []
        recorder = Peer(broker.url, "recorder")
        with pytest.raises(ValueError, match="bad reading 3"):
            async with recorder, Peer(broker.url, "amp") as amp:
                await recorder.subscribe_for_all_msg_subtype(Reading, picky(got))  # type: ignore[arg-type]
                for v in range(1, 6):
                    await amp.send_message(Reading(value=v))
                await recorder.wait_finished()
        assert got == [1, 2]


async def test_with_log_the_peer_counts_logs_once_per_burst_and_carries_on(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        got: list[int] = []
        async with (
            Peer(broker.url, "recorder", on_handler_error="log") as recorder,
            Peer(broker.url, "amp") as amp,
        ):
            await recorder.subscribe_for_all_msg_subtype(Reading, picky(got))  # type: ignore[arg-type]
            for v in range(1, 31):
                await amp.send_message(Reading(value=v))
            await wait_for_condition(lambda: len(got) + recorder.handler_errors == 30)
            assert recorder.handler_errors == 10
            assert got == [v for v in range(1, 31) if v % 3]
            assert recorder.is_running and recorder.error is None
        reports = [r for r in caplog.records if "handler error(s)" in r.getMessage()]
        assert 1 <= len(reports) < 10  # not one line per error


def test_on_handler_error_is_checked() -> None:
    with pytest.raises(PeerkitError, match="on_handler_error must be 'raise'"):
        Peer("ws://127.0.0.1:1", "p", on_handler_error="ignore")


async def test_typed_query_results(broker: Broker) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "calc") as calc, Peer(broker.url, "asker") as asker:
            await calc.register_query_handler(Add, lambda q: Sum(value=q.a + q.b))
            total = await asker.query(Add(a=1, b=2), reply=Sum)
            assert_type(total, Sum)  # a type checker needs no cast
            assert total.value == 3
            direct = await asker.ask_peer("calc", Add(a=2, b=2), reply=Sum)
            assert_type(direct, Sum)
            assert direct.value == 4
            with pytest.raises(QueryAnswerUnknown, match="answered with Sum, not the Add"):
                await asker.query(Add(a=1, b=1), reply=Add)


async def test_a_subscription_handler_that_cannot_take_a_message_is_refused_at_once(
    broker: Broker,
) -> None:
    with trio.fail_after(10):
        async with Peer(broker.url, "p") as p:
            with pytest.raises(PeerkitError, match=r"subscribing to 'herr\.Reading'"):
                await p.subscribe_for_all_msg_subtype(Reading, lambda: None)  # type: ignore[arg-type]
