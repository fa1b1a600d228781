"""The per-gateway Outbox on its own, without gRPC: sequence numbers, cumulative acks,
resending after a reconnect, the window, withdrawing and pacing.

Pacing reads ``time.monotonic`` through ``engine.delivery.time``; the tests that pace
swap that module for a clock they move by hand, so no test depends on real time.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from engine import delivery
from engine.api import gateway_pb2
from engine.delivery import (
    KIND_ALERT,
    KIND_CLOSED,
    KIND_RECIPIENTS,
    Entry,
    Outbox,
)


class Calls:
    """The outbox's callbacks, recorded."""

    def __init__(self) -> None:
        self.sent: list[Entry] = []
        self.acked: list[Entry] = []

    def on_sent(self, entry: Entry) -> None:
        self.sent.append(entry)

    def on_acked(self, entry: Entry, latency_s: float) -> None:
        assert latency_s >= 0
        self.acked.append(entry)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def box(calls: Calls) -> Outbox:
    return Outbox(7, calls.on_sent, calls.on_acked)


def entry(alert_id: str = "a", kind: int = KIND_RECIPIENTS, devices: int = 3) -> Entry:
    header = gateway_pb2.GatewayMessage(kind=kind, alert_id=alert_id)
    ids = np.arange(devices, dtype=np.uint64) if kind == KIND_RECIPIENTS else None
    return Entry(kind, alert_id, header, stage=1 if ids is not None else 0, ids=ids)


def send_all(box: Outbox, connection) -> list[Entry]:
    """Everything the connection may send now."""
    out = []
    while (item := box.next_message(connection))[0] is not None:
        out.append(item[0])
    return out


def parsed(item: Entry) -> gateway_pb2.GatewayMessage:
    return gateway_pb2.GatewayMessage.FromString(item.data)


def test_sequence_numbers_are_given_at_the_first_send(box, calls):
    entries = [entry(), entry(), entry()]
    for item in entries:
        box.put(item)
    assert [e.sequence for e in entries] == [0, 0, 0]

    connection = box.attach(0.0, 64)
    first = box.next_message(connection)
    assert first == (entries[0], 0.0)
    assert entries[0].sequence == 1 and parsed(entries[0]).sequence == 1
    assert [e.sequence for e in entries[1:]] == [0, 0]
    assert send_all(box, connection) == entries[1:]
    assert [parsed(e).sequence for e in entries] == [1, 2, 3]
    assert calls.sent == entries
    assert box.next_message(connection) == (None, math.inf)
    assert (len(box.queued), len(box.unacked), box.pending()) == (0, 3, 3)


def test_withdrawing_leaves_no_gap_in_the_numbers(box):
    keep, gone, later = entry("a"), entry("b"), entry("a")
    for item in (keep, gone, later):
        box.put(item)
    assert box.withdraw("b", KIND_RECIPIENTS) == [gone]
    connection = box.attach(0.0, 64)
    assert send_all(box, connection) == [keep, later]
    assert (keep.sequence, later.sequence, gone.sequence) == (1, 2, 0)


def test_acks_are_cumulative(box, calls):
    entries = [entry() for _ in range(4)]
    for item in entries:
        box.put(item)
    connection = box.attach(0.0, 64)
    send_all(box, connection)

    box.ack(2)
    assert calls.acked == entries[:2]
    assert list(box.unacked) == entries[2:] and box.acked == 2
    box.ack(2)  # the same ack again changes nothing
    assert calls.acked == entries[:2]
    box.ack(4)
    assert calls.acked == entries and not box.unacked and box.pending() == 0


def test_acks_behind_or_beyond_are_refused(box):
    for _ in range(3):
        box.put(entry())
    connection = box.attach(0.0, 64)
    send_all(box, connection)
    with pytest.raises(ValueError, match="beyond the last message sent, 3"):
        box.ack(4)
    box.ack(2)
    with pytest.raises(ValueError, match="behind the last ack, 2"):
        box.ack(1)
    assert box.acked == 2 and len(box.unacked) == 1


def test_an_ack_before_anything_is_sent_is_refused_unless_zero(box):
    box.put(entry())
    box.ack(0)
    with pytest.raises(ValueError, match="beyond"):
        box.ack(1)


def test_a_new_connection_resends_from_the_last_ack(box, calls):
    entries = [entry() for _ in range(4)]
    for item in entries[:3]:
        box.put(item)
    old = box.attach(0.0, 64)
    send_all(box, old)
    box.ack(1)
    data = [e.data for e in entries[:3]]

    new = box.attach(0.0, 64)
    assert old.replaced and box.connection is new
    assert box.next_message(old) == (None, math.inf), "a replaced stream sends nothing"
    assert send_all(box, new) == entries[1:3]
    assert [e.data for e in entries[:3]] == data, "resent with the same number and bytes"
    assert calls.sent == entries[:3], "a resend is not a first send"

    box.put(entries[3])
    assert send_all(box, new) == [entries[3]] and entries[3].sequence == 4
    box.detach(old)
    assert box.connection is new
    box.detach(new)
    assert box.connection is None


def test_an_ack_ahead_of_the_resend_goes_on_after_it(box):
    entries = [entry() for _ in range(6)]
    for item in entries:
        box.put(item)
    send_all(box, box.attach(0.0, 64))  # 1..6 out; the stream drops without acks

    new = box.attach(0.0, 1)
    assert box.next_message(new)[0] is entries[0]
    box.ack(3)  # the gateway had handled 1..3 on the old stream
    assert box.next_message(new)[0] is entries[3]
    box.ack(4)
    assert send_all(box, new) == [entries[4]]
    box.ack(5)
    assert send_all(box, new) == [entries[5]]


def test_the_window_limits_what_is_unacked(box):
    entries = [entry() for _ in range(5)]
    for item in entries:
        box.put(item)
    connection = box.attach(0.0, 2)
    assert send_all(box, connection) == entries[:2]
    assert box.next_message(connection) == (None, math.inf)
    box.ack(1)
    assert send_all(box, connection) == [entries[2]]
    box.ack(3)
    assert send_all(box, connection) == entries[3:]


def test_withdraw_removes_only_unsent_entries_of_that_alert_and_kind(box):
    sent = entry("a")
    box.put(sent)
    send_all(box, box.attach(0.0, 64))
    queued_a, closed_a, queued_b, payload_a = (
        entry("a"),
        entry("a", KIND_CLOSED),
        entry("b"),
        entry("a", KIND_ALERT),
    )
    for item in (queued_a, closed_a, queued_b, payload_a):
        box.put(item)

    assert box.withdraw("a", KIND_RECIPIENTS) == [queued_a]
    assert list(box.unacked) == [sent]
    assert list(box.queued) == [closed_a, queued_b, payload_a]
    assert box.withdraw("a", KIND_RECIPIENTS) == []


def test_devices_ahead_counts_up_to_the_last_entry_of_a_stage(box):
    assert box.devices_ahead("a", 1) is None
    for item in (entry("a", devices=5), entry("b", devices=7), entry("a", devices=2)):
        box.put(item)
    box.put(entry("b", devices=11))
    assert box.devices_ahead("a", 1) == 14
    assert box.devices_ahead("b", 1) == 25
    assert box.devices_ahead("a", 2) is None


class HandClock:
    """Stands in for the ``time`` module inside engine.delivery."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def hand(monkeypatch) -> HandClock:
    clock = HandClock()
    monkeypatch.setattr(delivery, "time", clock)
    return clock


def test_pacing_waits_when_the_bucket_is_empty(box, hand):
    for _ in range(4):
        box.put(entry(devices=5))
    connection = box.attach(10.0, 64)  # ten devices a second, a second's worth at once
    connection.refilled = hand.now
    assert len(send_all(box, connection)) == 2
    item, wait_s = box.next_message(connection)
    assert item is None and wait_s == pytest.approx(0.5)

    hand.now += 0.25
    assert box.next_message(connection)[1] == pytest.approx(0.25)
    hand.now += 0.25
    assert box.next_message(connection)[0] is not None
    assert box.next_message(connection)[0] is None


def test_a_batch_larger_than_the_bucket_leaves_it_in_debt(box, hand):
    box.put(entry(devices=30))
    box.put(entry(devices=5))
    connection = box.attach(10.0, 64)
    connection.refilled = hand.now
    assert box.next_message(connection)[0] is not None, "a full bucket lets a big batch go"
    item, wait_s = box.next_message(connection)
    # 20 devices of debt, then 5 more: 2.5 s at ten a second.
    assert item is None and wait_s == pytest.approx(2.5)


def test_messages_without_devices_are_not_paced(box, hand):
    box.put(entry(devices=10))
    box.put(entry(kind=KIND_CLOSED))
    connection = box.attach(10.0, 64)
    connection.refilled = hand.now
    assert len(send_all(box, connection)) == 2


def test_a_put_wakes_a_waiting_sender(box):
    async def scenario() -> int:
        box.wakeup.clear()
        waiter = asyncio.ensure_future(box.wakeup.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        box.put(entry())
        await asyncio.wait_for(waiter, 5)
        box.wakeup.clear()
        waiter = asyncio.ensure_future(box.wakeup.wait())
        connection = box.attach(0.0, 64)
        await asyncio.wait_for(waiter, 5)
        send_all(box, connection)
        box.wakeup.clear()
        waiter = asyncio.ensure_future(box.wakeup.wait())
        box.ack(1)
        await asyncio.wait_for(waiter, 5)
        return box.acked

    assert asyncio.run(scenario()) == 1


class Marks:
    """A durable store of hand-over marks that answers when told to."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def record(self, box: Outbox, queue_number: int) -> None:
        self.asked.append(queue_number)


def numbered(box: Outbox, count: int, first: int = 1) -> list[Entry]:
    entries = []
    for number in range(first, first + count):
        item = entry()
        item.queue_number = number
        box.put(item)
        entries.append(item)
    return entries


def test_nothing_is_sent_past_the_hand_over_mark_until_it_is_durable(calls):
    marks = Marks()
    box = Outbox(7, calls.on_sent, calls.on_acked, record_handover=marks.record)
    numbered(box, 5)
    connection = box.attach(0.0, 3)
    assert box.next_message(connection) == (None, math.inf)
    assert marks.asked == [3], "one mark for what the window lets out"
    assert box.next_message(connection) == (None, math.inf)
    assert marks.asked == [3], "asked once while it is being written"

    box.handover_recorded(3)
    assert [e.queue_number for e in send_all(box, connection)] == [1, 2, 3]
    box.ack(2)
    assert send_all(box, connection) == []
    assert marks.asked == [3, 5]
    box.handover_recorded(5)
    assert [e.queue_number for e in send_all(box, connection)] == [4, 5]


def test_a_paced_gateway_marks_one_message_at_a_time(calls):
    marks = Marks()
    box = Outbox(7, calls.on_sent, calls.on_acked, record_handover=marks.record)
    numbered(box, 4)
    connection = box.attach(1e9, 64)
    box.next_message(connection)
    assert marks.asked == [1]


def test_messages_marked_before_a_restart_count_as_sent(box):
    held, fresh = numbered(box, 2)
    held.handed = True
    assert box.withdraw("a", KIND_RECIPIENTS) == [fresh]
    assert list(box.queued) == [held]
