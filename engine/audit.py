"""The audit trail: an append-only, hash-chained record of who did what to which alert.

Every entry is a flat mapping of strings (so that it round-trips unchanged through a
Redis stream, a JSON line or a log):

==================  ===============================================================
``seq``             1, 2, 3, ... with no gaps
``at``              engine clock, Unix seconds with 6 decimals
``actor``           the credential's name (:class:`engine.auth.Caller`)
``role``            the credential's role
``peer``            the caller's address, as ``context.peer()`` gives it
``action``          the rpc, e.g. ``CreateAlert``
``alert_id``        the alert acted on (empty when none)
``version``         the alert's version after the action (empty when none)
``request_sha256``  hex SHA-256 of the request's deterministic serialization
                    (:func:`request_sha256`)
``outcome``         ``OK`` or the gRPC status code's name
``prev``            the ``hash`` of the entry before; 64 zeros for the first
``hash``            hex SHA-256 of :func:`canonical` of every other field
==================  ===============================================================

The canonical encoding that ``hash`` covers is the JSON object of all the entry's fields
but ``hash`` (``seq`` and ``prev`` included), keys sorted, separators ``","`` and
``":"``, non-ASCII characters as themselves (``ensure_ascii=False``), encoded in UTF-8.
Since every value is a string, the encoding is unambiguous. Extra fields (beyond those
above) are allowed and covered by the hash like the others.

What the chain proves: editing, removing, inserting or reordering entries anywhere
before the last one is found by :func:`verify`. Cutting entries off the end, or
rewriting the whole tail with new hashes, is not: for that, keep the head hash
(:attr:`VerifyReport.last_hash`) somewhere the engine cannot write, and compare.

One writer per trail: two writers appending to one file or stream would fork the chain,
which :func:`verify` reports as a broken link.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

#: ``prev`` of the first entry.
GENESIS = "0" * 64
#: Fields every entry has, besides ``seq``, ``prev`` and ``hash``.
FIELDS = (
    "at",
    "actor",
    "role",
    "peer",
    "action",
    "alert_id",
    "version",
    "request_sha256",
    "outcome",
)
_CHAIN_FIELDS = ("seq", "prev", "hash")
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Default Redis stream of the trail (the journal's ``<prefix>audit``).
DEFAULT_REDIS_KEY = "tuanyuan:audit"

HASH_MISMATCH = "hash mismatch"
BROKEN_LINK = "broken link"
SEQ_GAP = "gap in seq"
MALFORMED = "malformed entry"


class AuditError(Exception):
    """A trail that cannot be read or continued; the message names the file and line."""


def request_sha256(request) -> str:
    """Hex SHA-256 of a protobuf message's deterministic serialization (or of bytes)."""
    data = request if isinstance(request, bytes) else request.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest()


def canonical(entry: Mapping[str, str]) -> bytes:
    """The bytes ``hash`` covers: every field but ``hash``, as compact sorted JSON."""
    fields = {key: value for key, value in entry.items() if key != "hash"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _text(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        raise TypeError(f"audit field {key}: booleans are ambiguous, give a string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6f}"
    raise TypeError(f"audit field {key}: expected str, int, float or None, got {type(value)}")


def seal(fields: Mapping[str, object], prev_hash: str, seq: int) -> dict[str, str]:
    """The entry of ``fields`` as number ``seq`` after the entry whose hash is
    ``prev_hash``, with its hash. Values become strings: ints in decimal, floats with 6
    decimals, None as empty."""
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise ValueError(f"audit entry lacks {', '.join(missing)}")
    reserved = [name for name in _CHAIN_FIELDS if name in fields]
    if reserved:
        raise ValueError(f"{', '.join(reserved)} are set by seal, not given")
    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be 1 or more, got {seq!r}")
    if not isinstance(prev_hash, str) or not _HEX64.fullmatch(prev_hash):
        raise ValueError(f"prev_hash must be 64 lowercase hex digits, got {prev_hash!r}")
    entry = {key: _text(key, value) for key, value in fields.items()}
    entry["seq"] = str(seq)
    entry["prev"] = prev_hash
    entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()
    return entry


class Chain:
    """Where a trail stands: the next ``seq`` and the hash to link to. Not thread-safe:
    a writer holds one behind its own lock."""

    def __init__(self, seq: int = 0, last_hash: str = GENESIS) -> None:
        self.seq = seq
        self.last_hash = last_hash

    @classmethod
    def after(cls, last_entry: Mapping[str, str] | None) -> Chain:
        """The chain continuing after an existing trail's last entry (None: empty)."""
        if last_entry is None:
            return cls()
        entry = _decoded(last_entry)
        report = verify([entry], first_seq=None, prev_hash=None)
        if not report.ok:
            raise AuditError(f"the last entry cannot be continued: {report.message()}")
        return cls(int(entry["seq"]), entry["hash"])

    def seal(self, fields: Mapping[str, object]) -> dict[str, str]:
        """The next entry; the chain moves past it."""
        entry = seal(fields, self.last_hash, self.seq + 1)
        self.seq += 1
        self.last_hash = entry["hash"]
        return entry


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    #: Entries found intact (all of them when ok; those before the first bad one if not).
    count: int
    #: ``seq`` of the first bad entry (its position's expected seq when unreadable).
    first_bad_seq: int | None = None
    #: HASH_MISMATCH, BROKEN_LINK, SEQ_GAP or MALFORMED.
    reason: str = ""
    detail: str = ""
    #: Hash of the last intact entry: compare with a copy kept elsewhere to catch a
    #: truncated or rewritten tail.
    last_hash: str = GENESIS

    def message(self) -> str:
        if self.ok:
            return f"{self.count} entries intact; head hash {self.last_hash}"
        return (
            f"entry seq {self.first_bad_seq} (after {self.count} intact): {self.reason}: "
            f"{self.detail}"
        )


def _decoded(entry: Mapping) -> dict[str, str]:
    """Redis returns bytes unless asked not to."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in entry.items()
    }


def _problem(
    entry: Mapping[str, str], expected_seq: int | None, expected_prev: str | None
) -> tuple[str, str, int | None] | None:
    """Why an entry does not continue the trail (reason, detail, its seq), or None."""
    missing = [f for f in (*FIELDS, *_CHAIN_FIELDS) if not isinstance(entry.get(f), str)]
    if missing:
        return MALFORMED, f"{', '.join(missing)} missing or not text", None
    try:
        seq = int(entry["seq"])
    except ValueError:
        return MALFORMED, f"seq is not a number: {entry['seq']!r}", None
    if expected_seq is not None and seq != expected_seq:
        detail = f"expected seq {expected_seq}, found {seq} (entries removed or reordered)"
        return SEQ_GAP, detail, seq
    if hashlib.sha256(canonical(entry)).hexdigest() != entry["hash"]:
        return HASH_MISMATCH, "a field was changed after the entry was written", seq
    if expected_prev is not None and entry["prev"] != expected_prev:
        detail = (
            f"prev is {entry['prev'][:16]}..., but the entry before has hash "
            f"{expected_prev[:16]}..."
        )
        return BROKEN_LINK, detail, seq
    return None


def verify(
    entries: Iterable[Mapping[str, str]],
    *,
    first_seq: int | None = 1,
    prev_hash: str | None = GENESIS,
) -> VerifyReport:
    """Checks a trail in order and stops at the first bad entry.

    By default the trail must start at seq 1 after :data:`GENESIS`; give the seq and
    hash of a trusted checkpoint to check a trail that continues from it, or None to
    accept whatever the first entry says.
    """
    count = 0
    expected_seq, expected_prev = first_seq, prev_hash
    last_hash = GENESIS if prev_hash is None else prev_hash
    for raw in entries:
        entry = _decoded(raw)
        problem = _problem(entry, expected_seq, expected_prev)
        if problem is not None:
            reason, detail, seq = problem
            if seq is None:  # unreadable: name the seq it should have had
                seq = expected_seq if expected_seq is not None else count + 1
            return VerifyReport(False, count, seq, reason, detail, last_hash)
        count += 1
        last_hash = entry["hash"]
        expected_seq, expected_prev = int(entry["seq"]) + 1, last_hash
    return VerifyReport(True, count, last_hash=last_hash)


# Sinks and sources.


def _json_line(entry: Mapping[str, str]) -> bytes:
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8") + b"\n"


def _parse_line(line: bytes, path: Path, where: str) -> dict[str, str]:
    try:
        entry = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        entry = None
    if not isinstance(entry, dict):
        raise AuditError(f"{path}: {where} is not a JSON object")
    return entry


def _last_line(file, size: int) -> bytes:
    """The last line of a binary file of ``size`` bytes, without its newline."""
    block, end = 4096, size
    tail = b""
    while end > 0:
        start = max(end - block, 0)
        file.seek(start)
        tail = file.read(end - start) + tail
        end = start
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rpartition(b"\n")[2]
    return tail.rstrip(b"\n")


class AuditFile:
    """A trail in a file of JSON lines, one entry a line (keys sorted).

    Each :meth:`append` writes one line, flushes and fsyncs before returning, so an
    entry that was returned survives a crash. Reopening continues the chain after the
    last line. Where entries can be lost: an action whose process dies before its
    append returns has no entry, and a crash in the middle of a write leaves a partial
    last line, which makes reopening fail (:class:`AuditError`) until an operator
    looks at the file: nothing is ever cut off silently. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = open(self.path, "a+b")  # noqa: SIM115 (kept open; closed by close())
        try:
            size = self._file.seek(0, os.SEEK_END)
            if size and not self._ends_with_newline(size):
                raise AuditError(
                    f"{self.path}: the last line is incomplete (a write cut short by a "
                    "crash?); check it with 'tuanyuan audit verify --file' before appending"
                )
            last = _last_line(self._file, size) if size else b""
            entry = _parse_line(last, self.path, "the last line") if last else None
            try:
                self.chain = Chain.after(entry)
            except AuditError as error:
                raise AuditError(f"{self.path}: {error}") from None
        except BaseException:
            self._file.close()
            raise

    def _ends_with_newline(self, size: int) -> bool:
        self._file.seek(size - 1)
        return self._file.read(1) == b"\n"

    def append(self, fields: Mapping[str, object]) -> dict[str, str]:
        """Seals ``fields`` as the next entry, writes it durably and returns it."""
        with self._lock:
            entry = self.chain.seal(fields)
            self._file.write(_json_line(entry))
            self._file.flush()
            os.fsync(self._file.fileno())
            return entry

    def write_sealed(self, entry: Mapping[str, str]) -> None:
        """Writes an entry sealed elsewhere (e.g. by the journal, which keeps the
        chain), durably. It must continue this file's chain: AuditError otherwise, and
        nothing is written, so the trail never forks."""
        entry = _decoded(entry)
        with self._lock:
            problem = _problem(entry, self.chain.seq + 1, self.chain.last_hash)
            if problem is not None:
                reason, detail, _ = problem
                raise AuditError(
                    f"{self.path}: entry does not continue the trail: {reason}: {detail}"
                )
            self._file.write(_json_line(entry))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.chain = Chain(int(entry["seq"]), entry["hash"])

    def read(self) -> list[dict[str, str]]:
        """Every entry, in order."""
        with self._lock:
            self._file.flush()
            return list(read_file(self.path))

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> AuditFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_file(path: str | os.PathLike) -> Iterator[dict[str, str]]:
    """The entries of a JSON-lines trail, in order; AuditError names a bad line."""
    path = Path(path)
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                yield _parse_line(line, path, f"line {number}")


def read_redis(client, key: str = DEFAULT_REDIS_KEY, page: int = 1000) -> Iterator[dict[str, str]]:
    """The entries of a trail kept in a Redis stream (each stream entry's fields are a
    sealed entry's), read with XRANGE ``page`` entries at a time."""
    start = "-"
    while True:
        batch = client.xrange(key, min=start, max="+", count=page)
        for _id, fields in batch:
            yield _decoded(fields)
        if len(batch) < page:
            return
        last_id = batch[-1][0]
        last_id = last_id.decode() if isinstance(last_id, bytes) else last_id
        start = "(" + last_id  # exclusive: after the last entry read


def last_redis_entry(client, key: str = DEFAULT_REDIS_KEY) -> dict[str, str] | None:
    """The newest entry of a Redis trail, to continue its :class:`Chain`."""
    newest = client.xrevrange(key, max="+", min="-", count=1)
    return _decoded(newest[0][1]) if newest else None
