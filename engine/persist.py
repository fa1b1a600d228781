"""What the dispatcher writes to the journal, and how it reads it back.

The key layout is documented in :mod:`engine.journal`. A :class:`Change` gathers the
commands of one step of the dispatcher (a stage's new recipients, an ack, a resolve) so
that they reach Redis in one transaction, together with the queue messages they create;
those messages become sendable when the change is durable.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.api import gateway_pb2
from engine.delivery import Entry, Outbox
from engine.journal import Journal, Op


def _ids_bytes(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<u8").tobytes()


def ids_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


@dataclass
class Change:
    """Commands and queue messages of one step, written together."""

    journal: Journal
    commands: list[tuple] = field(default_factory=list)
    entries: list[tuple[Outbox, Entry]] = field(default_factory=list)
    audit: dict | None = None

    def entry(self, box: Outbox, entry: Entry) -> None:
        """A message queued in ``box``: it goes to the gateway's stream."""
        key = self.journal.key
        fields = {
            "kind": entry.kind,
            "alert": entry.alert_id,
            "stage": entry.stage,
            "header": entry.header.SerializeToString(),
            "ids": b"" if entry.ids is None else _ids_bytes(entry.ids),
        }
        self.commands.append(("sadd", key("gateways"), box.gateway_id))
        self.commands.append(
            ("xadd", key("gateway", box.gateway_id, "queue"), fields, entry.stream_id)
        )
        self.entries.append((box, entry))

    def notified(self, alert_id: str, gateway: int, ids: np.ndarray) -> None:
        key = self.journal.key("alert", alert_id, "notified", gateway)
        self.commands.append(("append", key, _ids_bytes(ids)))

    def acked_ids(self, alert_id: str, gateway: int, ids: np.ndarray) -> None:
        key = self.journal.key("alert", alert_id, "acked", gateway)
        self.commands.append(("append", key, _ids_bytes(ids)))

    def delete(self, alert_id: str, kind: str, gateway: int) -> None:
        """Deletes one of an alert's id lists (``notified`` or ``acked``)."""
        self.commands.append(("delete", self.journal.key("alert", alert_id, kind, gateway)))

    def forgotten(self, gateway: int, ids: np.ndarray) -> None:
        """Opted-out devices to drop from the gateway's queued messages after a restart."""
        key = self.journal.key("gateway", gateway, "forgotten")
        self.commands.append(("append", key, _ids_bytes(ids)))

    def forget_list_done(self, gateway: int) -> None:
        self.commands.append(("delete", self.journal.key("gateway", gateway, "forgotten")))

    def count(self, alert_id: str, name: str, amount: int) -> None:
        """Adds to a tally of the alert's state hash."""
        if amount:
            key = self.journal.key("alert", alert_id, "state")
            self.commands.append(("hincrby", key, name, int(amount)))

    def state(self, alert_id: str, name: str, value: object) -> None:
        key = self.journal.key("alert", alert_id, "state")
        self.commands.append(("hset", key, name, str(value)))

    def payload_version(self, gateway: int, alert_id: str, version: int) -> None:
        key = self.journal.key("gateway", gateway, "payloads")
        self.commands.append(("hset", key, alert_id, version))

    def removed(self, box: Outbox, entries: list[Entry]) -> None:
        """Messages acked or withdrawn: deleted from the stream."""
        if entries:
            stream = self.journal.key("gateway", box.gateway_id, "queue")
            self.commands.append(("xdel", stream, *[e.stream_id for e in entries]))

    def handover_mark(self, gateway: int, queue_number: int) -> None:
        """Messages of the gateway's queue up to ``queue_number`` may be sent."""
        key = self.journal.key("gateway", gateway, "handed")
        self.commands.append(("set", key, queue_number))

    def acked_upto(self, gateway: int, sequence: int) -> None:
        self.commands.append(("set", self.journal.key("gateway", gateway, "acked"), sequence))

    def log(self, alert_id: str, record: dict) -> None:
        """An accepted alert action, replayed in order at restart."""
        key = self.journal.key
        self.commands.append(("sadd", key("alerts"), alert_id))
        self.commands.append(("rpush", key("alert", alert_id, "log"), json.dumps(record)))

    def op(self, then: Callable[[], None] | None = None) -> Op:
        """The change as a journal op; its messages become sendable once it is durable,
        then ``then`` runs."""
        entries = list(self.entries)

        def durable(_results: list) -> None:
            for box, entry in entries:
                entry.durable = True
                box.wakeup.set()
            if then is not None:
                then()

        return Op(commands=list(self.commands), on_durable=durable, audit=self.audit)


def encode_request(message) -> str:
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode()


def decode_request(cls, text: str):
    return cls.FromString(base64.b64decode(text))


def restore_entry(gateway: int, stream_id: bytes, fields: dict) -> Entry:
    """A queue message as read back from a gateway's stream."""
    kind = int(fields[b"kind"])
    data = fields[b"ids"]
    entry = Entry(
        kind=kind,
        alert_id=fields[b"alert"].decode(),
        header=gateway_pb2.GatewayMessage.FromString(fields[b"header"]),
        stage=int(fields[b"stage"]),
        ids=ids_from_bytes(data) if data else None,
        gateway=gateway,
    )
    entry.queue_number = int(stream_id.split(b"-", 1)[0])
    entry.durable = True
    return entry
