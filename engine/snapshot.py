"""Snapshots of the live locations, so that a restarted engine is not blind.

The index lives in memory. Every ``interval_s`` seconds, at shutdown and right after
devices opt out, :class:`Snapshotter` writes the live devices (one row per device: its
latest position only, never a history) to one Arrow IPC file; at start the engine loads
it back into the empty index. Reports older than the time-to-live are dropped on both
sides, so a snapshot never revives a device the index would have forgotten.

The file is replaced atomically: it is written to ``<path>.tmp`` in the same folder,
flushed and synced, renamed over ``<path>``, and the folder is synced. ``<path>`` is
therefore always a complete snapshot (the previous or the new one); a ``.tmp`` left by
a crash is never read, and is deleted by the next write or load since it may hold
devices that have opted out since. Files are readable by their owner only (0600).

Format (version 1): one record batch, columns ``gateway`` (uint16), ``device_id``
(uint64), ``lat``, ``lng`` (float64 degrees, as the index holds them: within a
centimetre of what was reported) and ``seen_at`` (uint32 Unix seconds), no nulls,
uncompressed so that loading maps the columns without copying them. The schema metadata
carries the format version, ``written_at`` (Unix seconds), the index's ``ttl_s`` and
H3 ``resolution``, and the device count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.clock import Clock
from engine.index import LocationIndex

_LOG = logging.getLogger("engine.snapshot")

#: Version of the file layout; a reader refuses any other.
FORMAT_VERSION = 1

#: Buffer compression: None or "lz4". Measured at 10 million devices on 2 shared cores
#: (bench/snapshot.py, two runs): uncompressed, 300 MB, written in 6.4-9.9 s, loaded in
#: 13.8-23.3 s; lz4, 219 MB, 7.0-11.0 s and 16.0-23.4 s. Uncompressed columns are
#: mapped, not copied; nearly all of the load is the index's bulk upsert.
COMPRESSION: str | None = None

#: Devices per upsert when loading into an index that already holds devices (an empty
#: index takes the whole file in one call: its bulk path sorts once).
LOAD_BATCH = 1_000_000

#: Seconds a report may be ahead of the clock (``MAX_FUTURE_S`` in core_rs/src/lib.rs);
#: rows further ahead would make the index refuse the whole batch.
_MAX_FUTURE_S = 300

_META_PREFIX = b"tuanyuan.snapshot."

_ASIDE = "move the file aside to start with an empty index"

SCHEMA = pa.schema(
    [
        pa.field("gateway", pa.uint16(), nullable=False),
        pa.field("device_id", pa.uint64(), nullable=False),
        pa.field("lat", pa.float64(), nullable=False),
        pa.field("lng", pa.float64(), nullable=False),
        pa.field("seen_at", pa.uint32(), nullable=False),
    ]
)


class SnapshotError(Exception):
    """A snapshot file cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What a write or a load did.

    ``devices`` counts the rows of the file (written, or read at load); at load,
    ``expired`` rows were older than the time-to-live, ``ahead`` rows were more than
    300 s ahead of the clock (it went back since the write) and were dropped too, and
    ``loaded`` devices were added to or refreshed in the index. ``seconds`` is real
    (wall) time spent; ``written_at``, ``ttl_s`` and ``resolution`` come from the file.
    ``exists`` is False when there was no file to load (a first start).
    """

    path: Path
    exists: bool = True
    devices: int = 0
    expired: int = 0
    ahead: int = 0
    loaded: int = 0
    bytes: int = 0
    seconds: float = 0.0
    written_at: float | None = None
    ttl_s: int | None = None
    resolution: int | None = None


def tmp_path(path: Path) -> Path:
    """Where a snapshot is written before it replaces ``path``."""
    return path.with_name(path.name + ".tmp")


# Writing.


def write_snapshot(
    index: LocationIndex,
    path: str | os.PathLike,
    *,
    now: float,
    compression: str | None = COMPRESSION,
) -> SnapshotInfo:
    """Writes the devices of ``index`` live at ``now`` (Unix seconds; the index's clock)
    to ``path``, replacing it atomically.

    Blocking, seconds at ten million devices: call it from a worker thread. The index
    holds its read lock while its devices are copied out (queries go on, ingest waits
    for that copy only, not for the file).

    Raises:
        OSError: the file could not be written (folder missing, disk full, ...); the
            previous snapshot is intact and no ``.tmp`` is left behind.
    """
    started = time.perf_counter()
    path = Path(path)
    # devices() gives rows in slot order, by cell for most of them, which the bulk load
    # at start sorts almost for free; it builds the columns without holding the GIL.
    columns = index.devices()
    live = columns["seen_at"] >= now - index.ttl_s
    if not live.all():
        columns = {name: values[live] for name, values in columns.items()}
    count = int(columns["device_id"].size)
    metadata = {
        "format": str(FORMAT_VERSION),
        "written_at": repr(float(now)),
        "ttl_s": str(index.ttl_s),
        "resolution": str(index.resolution),
        "devices": str(count),
    }
    schema = SCHEMA.with_metadata({_META_PREFIX + k.encode(): v for k, v in metadata.items()})
    batch = pa.record_batch([pa.array(columns[f.name], f.type) for f in SCHEMA], schema=schema)

    # A .tmp from a crashed write may hold devices that opted out since: it goes first.
    # O_EXCL also refuses to write through a symlink planted at the .tmp path.
    tmp = tmp_path(path)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as file:
            _write_ipc(file, batch, compression)
            file.flush()
            os.fsync(file.fileno())
            size = os.fstat(file.fileno()).st_size
        os.replace(tmp, path)
    except BaseException:
        # Never leave a partial file: <path> is untouched until os.replace succeeds.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return SnapshotInfo(
        path=path,
        devices=count,
        bytes=size,
        seconds=time.perf_counter() - started,
        written_at=float(now),
        ttl_s=index.ttl_s,
        resolution=index.resolution,
    )


def _write_ipc(file, batch: pa.RecordBatch, compression: str | None) -> None:
    """Writes ``batch`` as an Arrow IPC file to an open binary file."""
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(file, batch.schema, options=options) as writer:
        writer.write_batch(batch)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Loading.


def load_snapshot(index: LocationIndex, path: str | os.PathLike, *, now: float) -> SnapshotInfo:
    """Loads the snapshot at ``path`` into ``index``: the rows live at ``now`` (Unix
    seconds; the index's clock) are upserted, newest report winning as always.

    Fastest into an empty index: one bulk upsert, nearly all of the time (14 to 23 s at
    ten million devices on 2 shared cores). Into a non-empty one, rows go in batches of
    :data:`LOAD_BATCH`. A missing
    file gives an info with ``exists=False``. A ``<path>.tmp`` left by a crashed write
    is deleted, never read.

    Raises:
        SnapshotError: the file is not a complete snapshot of this format (truncated,
            corrupt, another schema or version, values out of range), naming the file
            and the problem. Nothing is loaded then, except when the index refuses
            values in a later batch of a non-empty index.
    """
    started = time.perf_counter()
    path = Path(path)
    tmp_path(path).unlink(missing_ok=True)
    if not path.exists():
        return SnapshotInfo(path=path, exists=False)

    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            meta = _check_schema(path, reader.schema)
            table = reader.read_all()
            size = source.size()
            columns = _columns(path, table, meta)
            info = _load_columns(index, path, columns, meta, now, size)
    except (pa.ArrowException, OSError) as error:
        raise SnapshotError(
            f"snapshot {path}: not a readable Arrow IPC file ({_first_line(error)}); {_ASIDE}"
        ) from error
    except SnapshotError as error:
        raise SnapshotError(f"{error}; {_ASIDE}") from None
    return dataclasses.replace(info, seconds=time.perf_counter() - started)


def _check_schema(path: Path, schema: pa.Schema) -> dict[str, str]:
    """The snapshot metadata, once the schema is the expected one."""
    raw = schema.metadata or {}
    meta = {
        k[len(_META_PREFIX) :].decode(): v.decode()
        for k, v in raw.items()
        if k.startswith(_META_PREFIX)
    }
    if "format" not in meta:
        raise SnapshotError(
            f"snapshot {path}: an Arrow file without {_META_PREFIX.decode()}format metadata "
            "is not a location snapshot"
        )
    if meta["format"] != str(FORMAT_VERSION):
        raise SnapshotError(
            f"snapshot {path}: format version {meta['format']}, this engine reads version "
            f"{FORMAT_VERSION}"
        )
    got = [(f.name, f.type) for f in schema]
    wanted = [(f.name, f.type) for f in SCHEMA]
    if got != wanted:
        described = ", ".join(f"{name} {kind}" for name, kind in got)
        expected = ", ".join(f"{name} {kind}" for name, kind in wanted)
        raise SnapshotError(f"snapshot {path}: columns are ({described}), expected ({expected})")
    for key in ("written_at", "ttl_s", "resolution", "devices"):
        if key not in meta:
            raise SnapshotError(f"snapshot {path}: metadata {key} is missing")
    try:
        float(meta["written_at"]), int(meta["ttl_s"]), int(meta["resolution"])
        int(meta["devices"])
    except ValueError:
        raise SnapshotError(f"snapshot {path}: metadata is not numeric: {meta}") from None
    return meta


def _columns(path: Path, table: pa.Table, meta: dict[str, str]) -> dict[str, np.ndarray]:
    """The table's columns as numpy arrays (views of the mapped file when uncompressed
    and in one record batch)."""
    if table.num_rows != int(meta["devices"]):
        raise SnapshotError(
            f"snapshot {path}: {table.num_rows} rows, but the metadata says "
            f"{meta['devices']} devices"
        )
    columns = {}
    for field in SCHEMA:
        column = table.column(field.name)
        if column.null_count:
            raise SnapshotError(
                f"snapshot {path}: column {field.name} has {column.null_count} nulls"
            )
        chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        columns[field.name] = chunk.to_numpy(zero_copy_only=False)
    return columns


def _load_columns(
    index: LocationIndex,
    path: Path,
    columns: dict[str, np.ndarray],
    meta: dict[str, str],
    now: float,
    size: int,
) -> SnapshotInfo:
    """Drops the rows the index would refuse or forget and upserts the others."""
    seen = columns["seen_at"]
    rows = int(seen.size)
    expired_rows = seen < now - index.ttl_s
    ahead_rows = seen > now + _MAX_FUTURE_S
    keep = ~(expired_rows | ahead_rows)
    expired, ahead = int(expired_rows.sum()), int(ahead_rows.sum())
    if not keep.all():
        columns = {name: values[keep] for name, values in columns.items()}
    del expired_rows, ahead_rows, keep

    n = int(columns["device_id"].size)
    step = n if index.live(now=now) == 0 else LOAD_BATCH
    loaded = 0
    for start in range(0, n, max(step, 1)):
        part = slice(start, start + step)
        try:
            added, updated, _ = index.upsert(
                columns["device_id"][part],
                columns["lat"][part],
                columns["lng"][part],
                columns["gateway"][part],
                columns["seen_at"][part].astype(np.float64),
            )
        except ValueError as error:
            raise SnapshotError(
                f"snapshot {path}: rows {start} to {min(start + step, n) - 1} refused by the "
                f"index: {error}"
            ) from None
        loaded += added + updated
    return SnapshotInfo(
        path=path,
        devices=rows,
        expired=expired,
        ahead=ahead,
        loaded=loaded,
        bytes=size,
        written_at=float(meta["written_at"]),
        ttl_s=int(meta["ttl_s"]),
        resolution=int(meta["resolution"]),
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# The schedule.


class Snapshotter:
    """Writes the snapshot of ``index`` to ``path`` every ``interval_s`` seconds of
    ``clock`` (:meth:`run`) and on request (:meth:`write_now`), one write at a time,
    each in a worker thread so the event loop does not wait for it.

    Requests made while a write runs are served together by one write that starts after
    it: a device forgotten before :meth:`write_now` is called is absent from the file
    once it returns, within two write times at most (a running write finishing, then
    one more): 13 to 20 s at ten million devices on 2 cores, see :data:`COMPRESSION`.
    """

    def __init__(
        self, index: LocationIndex, path: str | os.PathLike, clock: Clock, interval_s: float = 60
    ) -> None:
        if not (isinstance(interval_s, int | float) and interval_s > 0):
            raise ValueError(f"interval_s must be a number of seconds above 0, got {interval_s!r}")
        self.index = index
        self.path = Path(path)
        self.clock = clock
        self.interval_s = float(interval_s)
        #: The last successful write, if any.
        self.last: SnapshotInfo | None = None
        self._pending: asyncio.Future | None = None
        self._reasons: list[str] = []
        self._writer: asyncio.Task | None = None

    async def load(self) -> SnapshotInfo:
        """Loads the snapshot into the index (in a worker thread) and logs what it did.

        Raises:
            SnapshotError: see :func:`load_snapshot`.
        """
        info = await asyncio.to_thread(load_snapshot, self.index, self.path, now=self.clock.now())
        if not info.exists:
            _LOG.info("no snapshot at %s: starting with an empty index", self.path)
            return info
        age = self.clock.now() - (info.written_at or 0.0)
        _LOG.info(
            "snapshot loaded from %s: %d devices (%d expired, %d ahead of the clock), written "
            "%.0f s ago, %.1f MB in %.2f s (%.0f devices/s)",
            self.path,
            info.loaded,
            info.expired,
            info.ahead,
            age,
            info.bytes / 1e6,
            info.seconds,
            info.devices / info.seconds if info.seconds else 0.0,
        )
        if info.ahead:
            _LOG.warning(
                "snapshot %s: %d devices dropped, seen more than %d s after now: did the "
                "clock go back?",
                self.path,
                info.ahead,
                _MAX_FUTURE_S,
            )
        return info

    async def run(self, stop: asyncio.Event) -> None:
        """Writes every ``interval_s`` seconds until ``stop`` is set. A failed write is
        logged and retried at the next tick. Does not write at stop: the caller writes
        once ingest has stopped (``write_now("shutdown")``)."""
        due = self.clock.now() + self.interval_s
        while await self._sleep_until(due, stop):
            # A failed write is logged by the writer; the next tick tries again.
            with contextlib.suppress(Exception):
                await self.write_now("periodic")
            due += self.interval_s
            if due < self.clock.now():  # writes slower than the interval: skip ticks
                due = self.clock.now() + self.interval_s

    async def write_now(self, reason: str) -> SnapshotInfo:
        """Writes a snapshot that starts after this call, and returns its info.

        At most one write runs and one waits: calls made while a write runs share the
        next one.

        Raises:
            OSError: the write failed (logged); the previous snapshot is intact.
        """
        loop = asyncio.get_running_loop()
        if self._pending is None:
            self._pending = loop.create_future()
            # Mark a failure as retrieved even when every caller has gone.
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._reasons.append(reason)
        pending = self._pending
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending())
        return await asyncio.shield(pending)

    async def _write_pending(self) -> None:
        """Runs the waiting write, and the one requested meanwhile, until none waits."""
        while self._pending is not None:
            pending, reasons = self._pending, self._reasons
            self._pending, self._reasons = None, []
            reason = ", ".join(dict.fromkeys(reasons))
            try:
                info = await asyncio.to_thread(
                    write_snapshot, self.index, self.path, now=self.clock.now()
                )
            except Exception as error:
                _LOG.error("snapshot %s not written (%s): %s", self.path, reason, error)
                pending.set_exception(error)
                continue
            self.last = info
            _LOG.info(
                "snapshot written (%s): %d devices, %.1f MB in %.2f s to %s",
                reason,
                info.devices,
                info.bytes / 1e6,
                info.seconds,
                self.path,
            )
            pending.set_result(info)

    async def _sleep_until(self, when: float, stop: asyncio.Event) -> bool:
        """Waits until ``when`` on the clock; False if ``stop`` was set first."""
        sleeper = asyncio.ensure_future(self.clock.sleep_until(when))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((sleeper, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()
        return not stop.is_set()
