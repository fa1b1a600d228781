"""Per-gateway delivery queues: ordered, acknowledged, resumable, paced.

Each gateway has one :class:`Outbox`. Messages wait in ``queued`` until a connection sends
them; sending gives a message the gateway's next sequence number and moves it to
``unacked``, where it stays until the gateway acks that number (acks are cumulative).
A new connection starts again after the last ack, so a gateway that drops its stream
receives every message it had not acknowledged. Messages that never left the engine can
be withdrawn (an alert closed before they went out); sequence numbers are given at the
first send, so withdrawing leaves no gap.

With a durable journal, no message leaves before the queue knows it may have: the
outbox records a hand-over mark (the highest queue number that may have been sent)
through ``record_handover`` and waits until it is durable before sending past it. After a
restart, the messages at or below the mark are ``handed``: they count as sent (a resolve
does not withdraw them and their devices get the follow-up), though they wait in
``queued`` to be sent again like any unacknowledged message.

Everything here runs on the server's event loop thread; nothing is shared with other
threads, so there are no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from engine import wire
from engine.api import gateway_pb2

#: Messages a gateway may leave unacknowledged unless it asks for another window.
DEFAULT_WINDOW = 64
#: Largest window a gateway may ask for.
MAX_WINDOW = 4096

KIND_ALERT = gateway_pb2.MESSAGE_KIND_ALERT
KIND_RECIPIENTS = gateway_pb2.MESSAGE_KIND_RECIPIENTS
KIND_CLOSED = gateway_pb2.MESSAGE_KIND_CLOSED
KIND_FOLLOW_UP = gateway_pb2.MESSAGE_KIND_FOLLOW_UP

_DEVICE_IDS_FIELD = gateway_pb2.GatewayMessage.DESCRIPTOR.fields_by_name["device_ids"].number


@dataclass(eq=False)
class Entry:
    """One message for one gateway. ``header`` holds every field but the sequence number
    and the device ids, which are added when it is first sent."""

    kind: int
    alert_id: str
    header: gateway_pb2.GatewayMessage
    stage: int = 0
    ids: np.ndarray | None = None
    gateway: int = 0
    sequence: int = 0
    data: bytes = b""
    sent_at: float = 0.0
    #: Sendable: written to the journal (always, without Redis).
    durable: bool = True
    #: The gateway's number of this message in its queue (from 1), given when it is
    #: queued; unlike the sequence number it never changes.
    queue_number: int = 0
    #: May have been handed over before a restart: it counts as sent.
    handed: bool = False

    @property
    def stream_id(self) -> str:
        """Its id in the gateway's Redis stream."""
        return f"{self.queue_number}-0"

    @property
    def devices(self) -> int:
        return 0 if self.ids is None else int(self.ids.size)

    def encode(self, sequence: int) -> bytes:
        self.sequence = sequence
        self.header.sequence = sequence
        tail = b"" if self.ids is None else wire.packed(_DEVICE_IDS_FIELD, self.ids)
        self.data = self.header.SerializeToString() + tail
        return self.data


@dataclass(eq=False)
class Connection:
    """One Subscribe stream of a gateway."""

    rate: float  # devices a second, 0 for no limit
    window: int
    sent_upto: int  # highest sequence sent on this stream
    replaced: bool = False
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)


class Outbox:
    """The delivery queue of one gateway.

    ``on_sent(entry)`` is called the first time an entry goes out; ``on_acked(entry,
    latency_s)`` when the gateway acknowledges it; the alerts use them to count
    progress. ``record_handover(outbox, queue_number)``, when given, makes a hand-over
    mark durable and then calls :meth:`handover_recorded`; without it (no durable
    journal) messages go out without a mark.
    """

    def __init__(
        self,
        gateway_id: int,
        on_sent: Callable[[Entry], None],
        on_acked: Callable[[Entry, float], None],
        on_ack: Callable[[int, list[Entry]], None] | None = None,
        record_handover: Callable[[Outbox, int], None] | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.queued: deque[Entry] = deque()
        self.unacked: deque[Entry] = deque()
        self.next_sequence = 1
        self.acked = 0
        self.connection: Connection | None = None
        self.wakeup = asyncio.Event()
        #: Payload version each alert's ALERT message was last queued with.
        self.payload_versions: dict[str, int] = {}
        #: Queue number of the next message (its stream id), from 1.
        self.next_queue_id = 1
        #: Opted-out devices were dropped from queued messages (see Dispatcher.forget).
        self.has_forgotten = False
        #: Messages up to this queue number may have been sent (durable).
        self.handover_mark = 0
        self._mark_wanted = 0  # the mark being recorded, 0 when none is
        self._record_handover = record_handover
        self._on_sent = on_sent
        self._on_acked = on_acked
        self._on_ack = on_ack

    # Queueing (from the alerts).

    def put(self, entry: Entry) -> None:
        self.queued.append(entry)
        self.wakeup.set()

    def withdraw(self, alert_id: str, kind: int) -> list[Entry]:
        """Removes the queued entries of one alert and kind that were never sent."""
        kept, removed = deque(), []
        for entry in self.queued:
            mine = entry.alert_id == alert_id and entry.kind == kind and not entry.handed
            (removed if mine else kept).append(entry)
        self.queued = kept
        return removed

    def pending(self) -> int:
        """Messages queued or sent but not acknowledged."""
        return len(self.queued) + len(self.unacked)

    # Connections.

    def attach(self, rate: float, window: int) -> Connection:
        """A new stream: it replaces any other and starts after the last ack."""
        if self.connection is not None:
            self.connection.replaced = True
        self.connection = Connection(rate=rate, window=window, sent_upto=self.acked)
        self.connection.tokens = self._burst(self.connection)
        self.wakeup.set()
        return self.connection

    def detach(self, connection: Connection) -> None:
        if self.connection is connection:
            self.connection = None

    @staticmethod
    def _burst(connection: Connection) -> float:
        return max(connection.rate, 1.0)

    def next_message(self, connection: Connection) -> tuple[Entry | None, float]:
        """The next entry to send on ``connection`` and 0, or ``None`` and the seconds to
        wait before trying again (``inf``: until something changes)."""
        if connection.replaced:
            return None, float("inf")
        # An ack may run ahead of what this stream has resent (the gateway handled those
        # messages on an earlier stream): go on after the ack, never index backwards.
        connection.sent_upto = max(connection.sent_upto, self.acked)
        if connection.sent_upto - self.acked >= connection.window:
            return None, float("inf")
        index = connection.sent_upto - self.acked
        if index < len(self.unacked):
            entry = self.unacked[index]
        elif self.queued and self.queued[0].durable:
            entry = self.queued[0]
            if self._record_handover is not None and entry.queue_number > self.handover_mark:
                self._want_mark(connection)
                return None, float("inf")  # until the mark is durable
        else:
            return None, float("inf")  # nothing queued, or not written to Redis yet

        # Pacing: a token bucket refilled at the declared rate, holding a second's worth.
        if connection.rate > 0 and entry.devices:
            now = time.monotonic()
            connection.tokens = min(
                self._burst(connection),
                connection.tokens + (now - connection.refilled) * connection.rate,
            )
            connection.refilled = now
            # A batch larger than the bucket goes out once the bucket is full and leaves
            # it in debt, so the average rate holds whatever the batch size.
            need = min(entry.devices, self._burst(connection))
            if connection.tokens < need:
                return None, (need - connection.tokens) / connection.rate
            connection.tokens -= entry.devices

        if index >= len(self.unacked):
            self.queued.popleft()
            entry.encode(self.next_sequence)
            self.next_sequence += 1
            entry.sent_at = time.monotonic()
            self.unacked.append(entry)
            self._on_sent(entry)
        connection.sent_upto = entry.sequence
        return entry, 0.0

    def _want_mark(self, connection: Connection) -> None:
        """Asks for a hand-over mark covering what ``connection`` may send now: the
        durable queued messages that fit in its window, or only the first one when the
        gateway is paced (the rest would wait, and must not count as sent meanwhile)."""
        if self._mark_wanted:
            return
        room = connection.window - (connection.sent_upto - self.acked)
        if connection.rate > 0:
            room = 1
        upto = 0
        for entry in self.queued:
            if room <= 0 or not entry.durable:
                break
            upto = entry.queue_number
            room -= 1
        self._mark_wanted = upto
        self._record_handover(self, upto)

    def handover_recorded(self, queue_number: int) -> None:
        """The hand-over mark ``queue_number`` is durable: messages up to it may go."""
        self.handover_mark = max(self.handover_mark, queue_number)
        self._mark_wanted = 0
        self.wakeup.set()

    def ack(self, sequence: int) -> None:
        """Acknowledges every message up to ``sequence``; raises ``ValueError`` for a
        number behind the last ack or beyond the last message sent."""
        if sequence < self.acked:
            raise ValueError(f"ack {sequence} is behind the last ack, {self.acked}")
        last_sent = self.next_sequence - 1
        if sequence > last_sent:
            raise ValueError(f"ack {sequence} is beyond the last message sent, {last_sent}")
        now = time.monotonic()
        done = []
        while self.unacked and self.unacked[0].sequence <= sequence:
            entry = self.unacked.popleft()
            done.append(entry)
            self._on_acked(entry, now - entry.sent_at)
        self.acked = sequence
        if self._on_ack is not None and done:
            self._on_ack(sequence, done)
        self.wakeup.set()

    def devices_ahead(self, alert_id: str, stage: int) -> int | None:
        """Devices to hand over before the last queued entry of one alert's stage is
        sent, that entry included; ``None`` when none of it is queued."""
        total, through = 0, None
        for entry in self.queued:
            total += entry.devices
            if (
                entry.alert_id == alert_id
                and entry.stage == stage
                and entry.kind == KIND_RECIPIENTS
            ):
                through = total
        return through


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp
