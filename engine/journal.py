"""The journal: every change of durable state, written to Redis in order.

The engine's state (alerts, who each alert notified, the gateways' queues and acks, the
audit trail) lives in memory and is written ahead to Redis. Changes are :class:`Op`s,
written by one task in the order they were made, many to a ``MULTI``/``EXEC``
transaction, so Redis always holds a prefix of the engine's history. What an op makes
possible happens only once the op is durable: an alert is accepted (and the caller
answered) after its op is written, and a recipient message can be sent only after it is
in its gateway's stream, and only once its gateway's hand-over mark covers it. So a crash
loses nothing that anyone outside was told about, and a restarted engine knows which
messages may have reached a gateway.

Each transaction also stores its number under ``journal``. When a write fails without
an answer (the connection dropped), the writer reads that number once Redis is back to
learn whether the transaction was applied, so a retry never applies one twice.

Redis down: the journal says so at once (:attr:`Journal.available`), so new alerts are
refused with UNAVAILABLE instead of waiting; queued changes wait in memory (ingest and
queries go on) and are written in order when Redis is back. Without Redis (the embedded
default) ops are durable as soon as they are made, and nothing survives a restart.

One engine writes under a prefix at a time, and the journal enforces it with a lease:
the ``owner`` key names the engine (host, process, a random token) and lapses
:data:`LEASE_S` seconds after its last renewal. Every transaction watches it, checks it
is still this engine's and renews it, so once another engine holds the prefix nothing
of this one is written again: it stops (:class:`PrefixTaken`). An idle engine renews it
every third of the lease. At start, an engine takes a free or lapsed lease; it takes one
at once from a process of the same host that is gone (a restart after a crash);
otherwise it waits one lease for the holder to lapse and then gives up, naming it.

Keys, under a prefix (``tuanyuan:`` by default):

=============================  ======  ===================================================
``alerts``                     set     alert ids
``alert:{id}:log``             list    accepted actions (create, update, resolve, expire)
``alert:{id}:state``           hash    stage start times and delivery tallies
``alert:{id}:notified:{gw}``   string  ids notified, 8 bytes each (little-endian)
``alert:{id}:acked:{gw}``      string  ids acknowledged by the gateway, 8 bytes each
``gateways``                   set     gateway ids with a queue
``gateway:{gw}:queue``         stream  messages not yet acknowledged, in order
``gateway:{gw}:acked``         string  the gateway's last acknowledged sequence number
``gateway:{gw}:handed``        string  queue number up to which messages may have been sent
``gateway:{gw}:payloads``      hash    alert id -> payload version queued to the gateway
``gateway:{gw}:forgotten``     string  opted-out ids to drop from its queued messages
``audit``                      stream  the hash-chained audit trail
``audit:head``                 string  ``seq hash`` of the last audit entry
``journal``                    string  number of the last transaction applied
``owner``                      string  ``host pid token`` of the engine holding the lease
=============================  ======  ===================================================
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import WatchError

_LOG = logging.getLogger("engine.journal")

#: Ops written in one transaction at most.
MAX_OPS_PER_WRITE = 512
#: Seconds between two attempts while Redis is unreachable, at most.
MAX_BACKOFF_S = 2.0
#: Seconds an engine's lease on its prefix lasts after its last renewal.
LEASE_S = 5.0
GENESIS = "0" * 64
#: What a caller refused while its change was queued or being written is told.
_MAYBE = (
    "the change takes effect only if Redis applied it before the failure; GetAlert shows "
    "whether it did"
)


class StoreUnavailable(Exception):
    """Redis cannot be reached; the change was not made."""


class PrefixTaken(StoreUnavailable):
    """Another engine holds the lease on the key prefix: this one may not write there."""


def _holder_of(value: bytes) -> tuple[str, int | None]:
    """The host and process id a lease names."""
    host, _, rest = value.decode(errors="replace").partition(" ")
    pid = rest.partition(" ")[0]
    return host, int(pid) if pid.isdigit() else None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(eq=False)
class Op:
    """One change. ``commands`` are Redis commands as ``(method, *args)``;
    ``on_durable(results)`` runs on the event loop once they are applied, with their
    results in order. ``audit`` holds the fields of an audit entry to seal and append in
    the same transaction."""

    commands: list[tuple] = field(default_factory=list)
    on_durable: Callable[[list], None] | None = None
    audit: dict | None = None
    #: Set for changes a caller waits for (alert actions).
    future: asyncio.Future | None = None
    #: The caller was told UNAVAILABLE: if the op turns out to have been applied it
    #: still takes effect; otherwise (not applied, or never tried) it is dropped.
    abandoned: bool = False


@dataclass
class Restored:
    """Everything :meth:`Journal.load` read back."""

    alerts: dict[str, dict] = field(default_factory=dict)
    gateways: dict[int, dict] = field(default_factory=dict)
    audit_seq: int = 0
    audit_head: str = GENESIS


class Journal:
    """Writes :class:`Op` s in order to Redis at ``url``, or nowhere when ``url`` is
    ``None``. ``seal(fields, prev_hash, seq)`` turns audit fields into a chained entry;
    ``audit_sink(entry)`` receives each sealed entry when there is no Redis."""

    def __init__(
        self,
        url: str | None,
        *,
        prefix: str = "tuanyuan:",
        seal: Callable[[dict, str, int], dict] | None = None,
        audit_sink: Callable[[dict], None] | None = None,
        on_availability: Callable[[bool], None] | None = None,
        on_taken: Callable[[str], None] | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.available = True
        self.audit_seq = 0
        self.audit_head = GENESIS
        self._seal = seal
        self._audit_sink = audit_sink
        self._on_availability = on_availability
        self._on_taken = on_taken
        self.lease_s = lease_s
        self._holder = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}".encode()
        #: Why this engine lost its prefix to another; None while it holds it.
        self.taken: str | None = None
        self._queue: asyncio.Queue[Op] = asyncio.Queue()
        #: Changes whose callers wait in :meth:`commit`.
        self._waiting: set[Op] = set()
        self._redis = None
        self._writer: asyncio.Task | None = None
        self._batch = 0
        self._closing = False
        self.written_ops = 0
        self.failed_writes = 0

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    @property
    def durable(self) -> bool:
        """Whether changes survive a restart (Redis is configured)."""
        return self.url is not None

    # Life cycle.

    async def start(self) -> Restored:
        """Connects, reads the state back, and starts writing."""
        restored = Restored()
        if self.url is not None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(
                self.url, socket_timeout=2.0, socket_connect_timeout=1.0
            )
            try:
                await self._acquire()
                restored = await self._load()
            except PrefixTaken:
                await self._redis.aclose()
                raise
            except Exception as error:
                await self._redis.aclose()
                raise StoreUnavailable(f"cannot read the state from {self.url}: {error}") from None
            self._batch = int(await self._redis.get(self.key("journal")) or 0)
            self.audit_seq, self.audit_head = restored.audit_seq, restored.audit_head
        self._writer = asyncio.get_running_loop().create_task(self._write_forever())
        return restored

    async def close(self, timeout_s: float = 5.0) -> None:
        """Writes what is queued (for up to ``timeout_s`` seconds), then disconnects."""
        self._closing = True
        self._queue.put_nowait(Op())  # wakes the writer
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, timeout_s)
            except TimeoutError:
                _LOG.error(
                    "journal: %d changes not written to Redis at shutdown", self._queue.qsize()
                )
                self._writer.cancel()
        if self._redis is not None:
            if self.taken is None:
                await self._release()
            await self._redis.aclose()

    # The lease.

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    async def _acquire(self) -> None:
        """Takes the lease on the prefix, or raises :class:`PrefixTaken`."""
        r, key = self._redis, self.key("owner")
        waiting_since = None
        while True:
            if await r.set(key, self._holder, nx=True, px=self._lease_ms):
                if waiting_since is not None:
                    _LOG.warning(
                        "journal: the lease on prefix %r lapsed after %.1f s; this engine "
                        "holds it now",
                        self.prefix,
                        time.monotonic() - waiting_since,
                    )
                return
            current = await r.get(key)
            if current is None:
                continue  # it lapsed just now
            host, pid = _holder_of(current)
            if (
                host == socket.gethostname()
                and pid not in (None, os.getpid())
                and _process_gone(pid)
            ):
                if await self._replace(key, current):
                    _LOG.warning(
                        "journal: took the lease on prefix %r from process %d of this host, "
                        "which is gone",
                        self.prefix,
                        pid,
                    )
                    return
                continue
            holder = f"process {pid} on {host}"
            if waiting_since is None:
                waiting_since = time.monotonic()
                _LOG.warning(
                    "journal: prefix %r of %s is held by %s (lease ends in %.1f s unless "
                    "renewed); waiting for it to lapse",
                    self.prefix,
                    self.url,
                    holder,
                    max(0, await r.pttl(key)) / 1000,
                )
            elif time.monotonic() - waiting_since > self.lease_s + 1.0:
                raise PrefixTaken(
                    f"another engine, {holder}, writes under the prefix {self.prefix!r} of "
                    f"{self.url} and keeps renewing its lease; stop it, or give this engine "
                    "another --redis-prefix"
                )
            await asyncio.sleep(min(0.1, self.lease_s / 10))

    async def _replace(self, key: str, expected: bytes) -> bool:
        """Sets this engine's lease if ``key`` still holds ``expected``."""
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.get(key) != expected:
                    return False
                pipe.multi()
                pipe.set(key, self._holder, px=self._lease_ms)
                await pipe.execute()
                return True
            except WatchError:
                return False

    async def _release(self) -> None:
        """Gives the lease up at shutdown, so that a successor starts at once."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self.key("owner"))
                if await pipe.get(self.key("owner")) == self._holder:
                    pipe.multi()
                    pipe.delete(self.key("owner"))
                    await pipe.execute()
        except Exception as error:  # it lapses by itself
            _LOG.warning("journal: the lease on prefix %r was not released: %s", self.prefix, error)

    def _lost_prefix(self, holder: bytes, ops: list[Op]) -> None:
        host, pid = _holder_of(holder)
        self.taken = (
            f"another engine, process {pid} on {host}, took the prefix {self.prefix!r} of "
            f"{self.url}; this engine wrote nothing after that and stops"
        )
        _LOG.critical(
            "journal: %s (%d changes unwritten)", self.taken, len(ops) + self._queue.qsize()
        )
        self.available = False
        for op in [*ops, *self._waiting]:
            if op.future is not None and not op.future.done():
                op.future.set_exception(PrefixTaken(self.taken))
        if self._on_availability is not None:
            self._on_availability(False)
        if self._on_taken is not None:
            self._on_taken(self.taken)

    # Submitting changes.

    def submit(self, op: Op) -> None:
        """Queues a change; ``on_durable`` runs once it is written."""
        if self._redis is None:
            self._apply_locally(op)
        else:
            self._queue.put_nowait(op)

    def write(self, op: Op) -> asyncio.Future:
        """Queues a change that is never dropped, however long Redis is away, and
        returns a future done once it is durable (at once without Redis)."""
        future = asyncio.get_running_loop().create_future()
        if self._redis is None:
            self._apply_locally(op)
            future.set_result(None)
            return future
        op.future = future
        self._queue.put_nowait(op)
        return future

    async def commit(self, op: Op, timeout_s: float = 5.0) -> None:
        """Writes a change a caller waits for; raises :class:`StoreUnavailable` at once
        when Redis is known to be down or turns out to be while the change waits or is
        written, or when the write does not complete in time. A change refused while it
        was being written takes effect later only if Redis did apply it; one refused
        before it was written never does."""
        if self._redis is None:
            self._apply_locally(op)
            return
        if self.taken is not None:
            raise PrefixTaken(self.taken)
        if not self.available:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable; nothing was changed")
        op.future = asyncio.get_running_loop().create_future()
        self._waiting.add(op)
        self._queue.put_nowait(op)
        try:
            await asyncio.wait_for(asyncio.shield(op.future), timeout_s)
        except TimeoutError:
            op.abandoned = True
            raise StoreUnavailable(
                f"Redis at {self.url} did not confirm in {timeout_s:g} s; {_MAYBE}"
            ) from None
        finally:
            self._waiting.discard(op)

    def _apply_locally(self, op: Op) -> None:
        if op.audit is not None and self._seal is not None:
            entry = self._seal(op.audit, self.audit_head, self.audit_seq + 1)
            self.audit_seq, self.audit_head = self.audit_seq + 1, entry["hash"]
            if self._audit_sink is not None:
                self._audit_sink(entry)
        if op.on_durable is not None:
            op.on_durable([None] * len(op.commands))

    # Writing.

    async def _write_forever(self) -> None:
        while self.taken is None:
            try:
                ops = [await asyncio.wait_for(self._queue.get(), self.lease_s / 3)]
            except TimeoutError:
                if self._redis is not None:
                    await self._write([])  # nothing to write: renew the lease
                continue
            while len(ops) < MAX_OPS_PER_WRITE and not self._queue.empty():
                ops.append(self._queue.get_nowait())
            dropped = sum(1 for op in ops if op.abandoned)
            if dropped:
                # Refused before they were written: they must never take effect.
                _LOG.warning(
                    "journal: %d alert change(s) dropped unwritten: their callers were told "
                    "UNAVAILABLE",
                    dropped,
                )
            ops = [
                op for op in ops if not op.abandoned and (op.commands or op.audit or op.on_durable)
            ]
            if ops:
                await self._write(ops)
            if self._closing and self._queue.empty():
                return

    async def _write(self, ops: list[Op]) -> None:
        self._batch += 1
        number = self._batch
        backoff = 0.05
        # An attempt failed without an answer, so it may have been applied: Redis is
        # asked (the ``journal`` number) before anything is written again, so that no
        # transaction is ever applied twice.
        unsure = False
        while True:
            if unsure:
                applied = await self._was_applied(number)
                if applied is None:  # Redis cannot tell yet: ask again later
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                unsure = False
                if applied:
                    results = None  # applied, but the results (stream ids) are unknown
                    break
                # Not applied: drop the changes nobody waits for any more, try again.
                kept = [op for op in ops if not op.abandoned]
                if len(kept) != len(ops):
                    _LOG.warning(
                        "journal: %d alert change(s) dropped: Redis did not apply them "
                        "and their callers were told UNAVAILABLE",
                        len(ops) - len(kept),
                    )
                    ops = kept
                if not ops:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            seq, head = self.audit_seq, self.audit_head
            sealed = []
            pipe = self._redis.pipeline(transaction=True)
            try:
                # The transaction applies only if the lease is still this engine's and
                # nobody touches it before EXEC.
                owner = self.key("owner")
                await pipe.watch(owner)
                holder = await pipe.get(owner)
                if holder is not None and holder != self._holder:
                    self._lost_prefix(holder, ops)
                    return
                if holder is None:
                    _LOG.warning(
                        "journal: the lease on prefix %r had lapsed and nobody took it; "
                        "renewed with this transaction",
                        self.prefix,
                    )
                pipe.multi()
                for op in ops:
                    for method, *args in op.commands:
                        getattr(pipe, method)(*args)
                    if op.audit is not None:
                        seq += 1
                        entry = self._seal(op.audit, head, seq)
                        head = entry["hash"]
                        sealed.append(entry)
                        pipe.xadd(self.key("audit"), entry)
                if sealed:
                    pipe.set(self.key("audit:head"), f"{seq} {head}")
                pipe.set(self.key("journal"), number)
                pipe.set(owner, self._holder, px=self._lease_ms)
                results = await pipe.execute()
                break
            except WatchError:
                continue  # the lease changed hands or lapsed: nothing was applied; look again
            except Exception as error:  # connection errors and timeouts of every kind
                self.failed_writes += 1
                self._set_available(False, error)
                unsure = True
            finally:
                await pipe.reset()
        self._set_available(True)
        self.audit_seq, self.audit_head = seq, head
        self.written_ops += len(ops)
        position = 0
        for op in ops:
            count = len(op.commands)
            part = results[position : position + count] if results is not None else [None] * count
            position += count
            if op.on_durable is not None:
                op.on_durable(part)
            if op.future is not None and not op.future.done():
                op.future.set_result(None)
            if op.abandoned:
                _LOG.warning(
                    "journal: an alert change refused as UNAVAILABLE was applied after all"
                )

    async def _was_applied(self, number: int) -> bool | None:
        """Whether transaction ``number`` is in Redis; ``None`` when Redis cannot tell."""
        try:
            last = int(await self._redis.get(self.key("journal")) or 0)
        except Exception:
            return None
        return last >= number

    def _set_available(self, available: bool, error: Exception | None = None) -> None:
        if available == self.available:
            return
        self.available = available
        if available:
            _LOG.warning(
                "journal: Redis at %s is reachable again; %d changes queued",
                self.url,
                self._queue.qsize(),
            )
        else:
            _LOG.error(
                "journal: Redis at %s is unreachable (%s); new alerts are refused, other "
                "changes wait in memory",
                self.url,
                error,
            )
            # Callers waiting for a change hear so now rather than at their timeout.
            for op in self._waiting:
                if not op.future.done():
                    op.abandoned = True
                    op.future.set_exception(
                        StoreUnavailable(f"Redis at {self.url} is unreachable ({error}); {_MAYBE}")
                    )
        if self._on_availability is not None:
            self._on_availability(available)

    # Reading back.

    async def _load(self) -> Restored:
        r = self._redis
        restored = Restored()
        for raw in await r.smembers(self.key("alerts")):
            alert_id = raw.decode()
            state = await r.hgetall(self.key("alert", alert_id, "state"))
            alert = {
                "log": await r.lrange(self.key("alert", alert_id, "log"), 0, -1),
                "state": {k.decode(): v.decode() for k, v in state.items()},
                "notified": {},
                "acked": {},
            }
            for kind in ("notified", "acked"):
                pattern = self.key("alert", alert_id, kind, "*")
                async for name in r.scan_iter(match=pattern, count=1000):
                    gateway = int(name.decode().rsplit(":", 1)[1])
                    alert[kind][gateway] = await r.get(name) or b""
            restored.alerts[alert_id] = alert
        for raw in await r.smembers(self.key("gateways")):
            gateway = int(raw)
            entries, start = [], "-"
            while page := await r.xrange(self.key("gateway", gateway, "queue"), start, count=1000):
                entries.extend(page)
                start = "(" + page[-1][0].decode()
            try:
                info = await r.xinfo_stream(self.key("gateway", gateway, "queue"))
                last_id = int(_text(info["last-generated-id"]).split("-")[0])
            except Exception:  # no stream yet
                last_id = 0
            payloads = await r.hgetall(self.key("gateway", gateway, "payloads"))
            restored.gateways[gateway] = {
                "acked": int(await r.get(self.key("gateway", gateway, "acked")) or 0),
                "handed": int(await r.get(self.key("gateway", gateway, "handed")) or 0),
                "last_id": last_id,
                "entries": entries,
                "payloads": {k.decode(): int(v) for k, v in payloads.items()},
                "forgotten": await r.get(self.key("gateway", gateway, "forgotten")) or b"",
            }
        head = await r.get(self.key("audit:head"))
        if head:
            seq, digest = head.decode().split()
            restored.audit_seq, restored.audit_head = int(seq), digest
        return restored


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
