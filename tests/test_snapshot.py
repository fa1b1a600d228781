"""Snapshots of the live locations: round trip, expiry, opt-outs, atomic replacement,
refused files, permissions, and the Snapshotter's schedule and coalescing."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from oracle import haversine_m

from engine import snapshot
from engine.clock import ManualClock
from engine.index import LocationIndex
from engine.snapshot import (
    SnapshotError,
    SnapshotInfo,
    Snapshotter,
    load_snapshot,
    write_snapshot,
)

T0 = 1_800_000_000.0
TTL_S = 1800


def _index(clock: ManualClock) -> LocationIndex:
    return LocationIndex(ttl_s=TTL_S, clock=clock.now)


def _fill(index: LocationIndex, n: int, seed: int, seen_at: object) -> dict[str, np.ndarray]:
    """``n`` devices scattered over the globe on three gateways, ids 0..n-1; id 7 is on
    two gateways (two devices)."""
    rng = np.random.default_rng(seed)
    columns = {
        "device_id": np.arange(n, dtype=np.uint64),
        "lat": rng.uniform(-90, 90, n),
        "lng": rng.uniform(-180, 180, n),
        "gateway": rng.integers(0, 3, n).astype(np.uint16),
    }
    index.upsert(columns["device_id"], columns["lat"], columns["lng"], columns["gateway"], seen_at)
    index.upsert(7, 10.0, 20.0, 65535, T0)
    return columns


def _put(index: LocationIndex, ids: object, lat: float, lng: float, seen_at: float) -> None:
    """Reports devices of gateway 0 all at one place."""
    ids = np.atleast_1d(np.asarray(ids, dtype=np.uint64))
    index.upsert(ids, np.full(ids.size, lat), np.full(ids.size, lng), 0, seen_at)


def _sorted(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((columns["device_id"], columns["gateway"]))
    return {name: values[order] for name, values in columns.items()}


def _file_ids(path: Path) -> set[tuple[int, int]]:
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return set(zip(table["gateway"].to_pylist(), table["device_id"].to_pylist(), strict=True))


def test_round_trip_keeps_every_column_of_the_live_devices(tmp_path):
    clock = ManualClock(T0)
    index = _index(clock)
    seen = T0 - np.arange(3000) % 2500  # some are older than the TTL at T0
    _fill(index, 3000, seed=1, seen_at=seen)
    path = tmp_path / "locations.arrow"

    written = write_snapshot(index, path, now=T0)
    fresh = _index(clock)
    loaded = load_snapshot(fresh, path, now=T0)

    before = index.devices()
    live = before["seen_at"] >= T0 - TTL_S
    before = _sorted({name: values[live] for name, values in before.items()})
    after = _sorted(fresh.devices())
    assert written.devices == loaded.devices == loaded.loaded == live.sum() == fresh.live()
    assert loaded.expired == loaded.ahead == 0
    assert (written.ttl_s, written.resolution) == (loaded.ttl_s, loaded.resolution)
    assert loaded.written_at == T0
    for name in ("gateway", "device_id", "seen_at"):
        np.testing.assert_array_equal(after[name], before[name])
    moved = haversine_m(before["lat"], before["lng"], after["lat"], after["lng"])
    assert moved.max() < 0.01  # the index rounds positions to about 6 mm
    assert _file_ids(path) == set(zip(before["gateway"], before["device_id"], strict=True))


def test_rows_expired_at_load_are_not_loaded(tmp_path):
    clock = ManualClock(T0)
    index = _index(clock)
    _fill(index, 500, seed=2, seen_at=T0 - 1000)
    _put(index, np.arange(500, 600), 1.0, 2.0, T0)
    path = tmp_path / "locations.arrow"
    write_snapshot(index, path, now=T0)

    clock.advance(900)  # the first 500 devices are now past the TTL
    fresh = _index(clock)
    info = load_snapshot(fresh, path, now=clock.now())

    assert (info.devices, info.expired, info.loaded) == (601, 500, 101)
    assert fresh.live() == 101
    assert set(fresh.devices()["device_id"].tolist()) == {7, *range(500, 600)}


def test_rows_ahead_of_a_clock_that_went_back_are_dropped(tmp_path):
    index = _index(ManualClock(T0))
    _fill(index, 50, seed=3, seen_at=T0)
    path = tmp_path / "locations.arrow"
    write_snapshot(index, path, now=T0)

    earlier = ManualClock(T0 - 1000)
    fresh = _index(earlier)
    info = load_snapshot(fresh, path, now=earlier.now())

    assert (info.ahead, info.loaded) == (51, 0)
    assert fresh.live() == 0


def test_loading_into_a_non_empty_index_keeps_the_newest_report(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "LOAD_BATCH", 7)
    clock = ManualClock(T0)
    index = _index(clock)
    _put(index, np.arange(40), 1.0, 1.0, T0 - 10)
    path = tmp_path / "locations.arrow"
    write_snapshot(index, path, now=T0)

    fresh = _index(clock)
    _put(fresh, np.arange(20), 5.0, 5.0, T0)  # newer than the snapshot
    info = load_snapshot(fresh, path, now=T0)

    assert info.loaded == 20
    devices = _sorted(fresh.devices())
    assert devices["device_id"].tolist() == list(range(40))
    assert np.allclose(devices["lat"][:20], 5.0) and np.allclose(devices["lat"][20:], 1.0)


def test_missing_file_is_an_empty_start(tmp_path):
    index = _index(ManualClock(T0))
    info = load_snapshot(index, tmp_path / "none.arrow", now=T0)
    assert info == SnapshotInfo(path=tmp_path / "none.arrow", exists=False)
    assert index.live() == 0


def test_empty_index_round_trips(tmp_path):
    index = _index(ManualClock(T0))
    path = tmp_path / "locations.arrow"
    assert write_snapshot(index, path, now=T0).devices == 0
    info = load_snapshot(_index(ManualClock(T0)), path, now=T0)
    assert (info.exists, info.devices, info.loaded) == (True, 0, 0)


def test_the_file_is_readable_by_its_owner_only(tmp_path):
    index = _index(ManualClock(T0))
    _fill(index, 10, seed=4, seen_at=T0)
    path = tmp_path / "locations.arrow"
    path.write_bytes(b"older")
    path.chmod(0o644)
    mask = os.umask(0)
    try:
        write_snapshot(index, path, now=T0)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# Atomic replacement: <path> is always a whole snapshot.


def _two_snapshots(tmp_path) -> tuple[LocationIndex, Path]:
    """An index of 100 devices whose snapshot is written; then 50 more are added."""
    index = _index(ManualClock(T0))
    _put(index, np.arange(100), 1.0, 1.0, T0)
    path = tmp_path / "locations.arrow"
    write_snapshot(index, path, now=T0)
    _put(index, np.arange(100, 150), 1.0, 1.0, T0)
    return index, path


def test_a_write_failing_halfway_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    index, path = _two_snapshots(tmp_path)
    before = path.read_bytes()

    def crash(file, batch, compression):
        file.write(b"ARROW1\0\0" + b"\x01" * 1000)
        raise OSError("No space left on device")

    monkeypatch.setattr(snapshot, "_write_ipc", crash)
    with pytest.raises(OSError, match="No space left"):
        write_snapshot(index, path, now=T0)

    assert path.read_bytes() == before
    assert not snapshot.tmp_path(path).exists()
    assert load_snapshot(_index(ManualClock(T0)), path, now=T0).loaded == 100


def test_a_failed_sync_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    index, path = _two_snapshots(tmp_path)

    def fail(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(snapshot.os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        write_snapshot(index, path, now=T0)
    monkeypatch.undo()

    assert not snapshot.tmp_path(path).exists()
    assert load_snapshot(_index(ManualClock(T0)), path, now=T0).loaded == 100


def test_a_tmp_left_by_a_crash_is_never_loaded_and_is_deleted(tmp_path):
    index, path = _two_snapshots(tmp_path)
    write_snapshot(index, tmp_path / "other.arrow", now=T0)
    # A crash after the write but before the rename: a whole file, 150 devices.
    os.replace(tmp_path / "other.arrow", snapshot.tmp_path(path))

    assert load_snapshot(_index(ManualClock(T0)), path, now=T0).loaded == 100
    assert not snapshot.tmp_path(path).exists()

    # Without a snapshot, a .tmp is no snapshot either.
    snapshot.tmp_path(path).write_bytes(b"partial")
    path.unlink()
    assert not load_snapshot(_index(ManualClock(T0)), path, now=T0).exists
    assert not snapshot.tmp_path(path).exists()


# Files that are not snapshots.


def _error(index: LocationIndex, path: Path) -> str:
    with pytest.raises(SnapshotError) as caught:
        load_snapshot(index, path, now=T0)
    message = str(caught.value)
    assert str(path) in message and message.endswith("start with an empty index")
    return message


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_a_truncated_file_is_refused(tmp_path, keep):
    _, path = _two_snapshots(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    fresh = _index(ManualClock(T0))
    assert "not a readable Arrow IPC file" in _error(fresh, path)
    assert fresh.live() == 0


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "locations.arrow"
    path.write_bytes(os.urandom(4096))
    assert "not a readable Arrow IPC file" in _error(_index(ManualClock(T0)), path)


def _write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _good_metadata(n: int) -> dict[bytes, bytes]:
    values = {"format": "1", "written_at": str(T0), "ttl_s": "1800", "resolution": "10"}
    values["devices"] = str(n)
    return {b"tuanyuan.snapshot." + k.encode(): v.encode() for k, v in values.items()}


def _table(metadata: dict[bytes, bytes] | None, **override) -> pa.Table:
    columns = {
        "gateway": pa.array([0, 1], pa.uint16()),
        "device_id": pa.array([1, 2], pa.uint64()),
        "lat": pa.array([1.0, 2.0]),
        "lng": pa.array([3.0, 4.0]),
        "seen_at": pa.array([int(T0)] * 2, pa.uint32()),
    }
    columns.update(override)
    return pa.table(columns).replace_schema_metadata(metadata)


def test_a_valid_table_written_by_hand_loads(tmp_path):
    path = tmp_path / "locations.arrow"
    _write_table(path, _table(_good_metadata(2)))
    assert load_snapshot(_index(ManualClock(T0)), path, now=T0).loaded == 2


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_table(None), "not a location snapshot"),
        (
            _table({b"tuanyuan.snapshot.format": b"2"}),
            "format version 2, this engine reads version 1",
        ),
        (_table(_good_metadata(2), lat=pa.array([1, 2], pa.int32())), "lat int32"),
        (_table(_good_metadata(2), seen_at=pa.array([1.0, 2.0])), "seen_at double"),
        (_table(_good_metadata(3)), "2 rows, but the metadata says 3 devices"),
        (_table(_good_metadata(2), lat=pa.array([1.0, None])), "column lat has 1 nulls"),
        (_table(_good_metadata(2), lat=pa.array([1.0, 91.0])), "refused by the index: lat"),
    ],
)
def test_a_file_of_another_shape_is_refused(tmp_path, table, message):
    path = tmp_path / "locations.arrow"
    _write_table(path, table)
    fresh = _index(ManualClock(T0))
    assert message in _error(fresh, path)
    assert fresh.live() == 0


def test_a_missing_folder_fails_the_write_clearly(tmp_path):
    index = _index(ManualClock(T0))
    with pytest.raises(FileNotFoundError, match="missing"):
        write_snapshot(index, tmp_path / "missing" / "locations.arrow", now=T0)


# The Snapshotter.


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_forgotten_devices_are_gone_from_the_file_after_write_now(tmp_path):
    clock = ManualClock(T0)
    index = _index(clock)
    _fill(index, 200, seed=5, seen_at=T0)
    path = tmp_path / "locations.arrow"
    snapshotter = Snapshotter(index, path, clock, interval_s=60)

    async def scenario():
        await snapshotter.write_now("periodic")
        assert (65535, 7) in _file_ids(path)
        index.remove([7, 8, 9])  # every gateway
        return await snapshotter.write_now("forget")

    info = asyncio.run(scenario())
    ids = _file_ids(path)
    assert info.devices == len(ids) == 201 - 4
    assert not {i for _, i in ids} & {7, 8, 9}


def test_the_snapshotter_writes_every_interval_of_its_clock(tmp_path):
    clock = ManualClock(T0)
    index = _index(clock)
    _fill(index, 20, seed=6, seen_at=T0)
    path = tmp_path / "locations.arrow"
    snapshotter = Snapshotter(index, path, clock, interval_s=10)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(snapshotter.run(stop))
        await asyncio.sleep(0.05)
        assert snapshotter.last is None and not path.exists()  # not due yet
        clock.advance(10)
        await _until(lambda: snapshotter.last is not None)
        assert snapshotter.last.written_at == T0 + 10
        _put(index, 1000, 1.0, 1.0, clock.now())
        clock.advance(10)
        await _until(lambda: snapshotter.last.written_at == T0 + 20)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert snapshotter.last.devices == 22
    assert load_snapshot(_index(clock), path, now=clock.now()).loaded == 22


def test_the_schedule_survives_a_failed_write(tmp_path, caplog):
    clock = ManualClock(T0)
    index = _index(clock)
    folder = tmp_path / "later"
    snapshotter = Snapshotter(index, folder / "locations.arrow", clock, interval_s=10)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(snapshotter.run(stop))
        await asyncio.sleep(0.02)
        clock.advance(10)
        await _until(lambda: "not written" in caplog.text)
        folder.mkdir()
        clock.advance(10)
        await _until(lambda: snapshotter.last is not None)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert (folder / "locations.arrow").exists()


def test_concurrent_requests_share_one_write_that_starts_after_them(tmp_path, monkeypatch):
    clock = ManualClock(T0)
    index = _index(clock)
    started, release = threading.Semaphore(0), threading.Event()
    calls: list[int] = []
    running = []

    def slow_write(index, path, *, now):
        running.append(1)
        assert len(running) == 1, "two writes at once"
        calls.append(index.live())
        started.release()
        release.wait(10)
        running.pop()
        return SnapshotInfo(path=Path(path), devices=calls[-1])

    monkeypatch.setattr(snapshot, "write_snapshot", slow_write)
    snapshotter = Snapshotter(index, tmp_path / "locations.arrow", clock)

    async def scenario():
        first = asyncio.create_task(snapshotter.write_now("periodic"))
        await asyncio.to_thread(started.acquire, True, 10)
        # While the first write runs: an opt-out and three requests.
        _put(index, [1, 2, 3], 1.0, 1.0, T0)
        later = [asyncio.create_task(snapshotter.write_now(r)) for r in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        assert len(calls) == 1
        release.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert calls == [0, 3]
    assert first.devices == 0
    assert [info.devices for info in later] == [3, 3, 3]
    assert later[0] is later[1] is later[2]


def test_a_failed_write_reaches_every_waiting_caller(tmp_path):
    clock = ManualClock(T0)
    snapshotter = Snapshotter(_index(clock), tmp_path / "no" / "x.arrow", clock)

    async def scenario():
        return await asyncio.gather(
            snapshotter.write_now("a"), snapshotter.write_now("b"), return_exceptions=True
        )

    results = asyncio.run(scenario())
    assert all(isinstance(r, FileNotFoundError) for r in results)
    assert snapshotter.last is None


def test_load_logs_and_reports(tmp_path, caplog):
    clock = ManualClock(T0)
    index = _index(clock)
    _fill(index, 30, seed=7, seen_at=T0)
    path = tmp_path / "locations.arrow"
    write_snapshot(index, path, now=T0)
    clock.advance(5)
    fresh = _index(clock)
    caplog.set_level("INFO", "engine.snapshot")

    info = asyncio.run(Snapshotter(fresh, path, clock).load())

    assert info.loaded == 31 == fresh.live()
    assert "31 devices (0 expired, 0 ahead of the clock), written 5 s ago" in caplog.text


def test_interval_must_be_positive(tmp_path):
    clock = ManualClock(T0)
    with pytest.raises(ValueError, match="interval_s"):
        Snapshotter(_index(clock), tmp_path / "x", clock, interval_s=0)
