"""Threads: the core releases the GIL, so queries run while batches are applied. A
reader must see each batch entirely or not at all, and one alert must never hand the
same device to two concurrent callers.

Nothing here measures time. Threads run a fixed amount of work; the readers keep
going until the writer is done, so they overlap it for as long as it lasts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from support import T0, FakeClock, destination

import engine

#: More devices than the engine applies on one thread, so batches take the parallel path.
N = 20_000
BEIJING = (39.9042, 116.4074)
SHANGHAI = (31.2304, 121.4737)
#: Each cluster fits in a 2 km ring; a 900 km ring around the midpoint holds both.
CLUSTER_M = 2_000.0
MIDPOINT = (35.6, 118.9)
BOTH_M = 900_000.0
#: Minimum reads per reader, so readers run even if the writer finishes first.
MIN_READS = 40
#: A join that has not returned after this long is a deadlock, not a slow machine.
HANG_S = 600.0


def cluster(centre, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return destination(*centre, CLUSTER_M * np.sqrt(rng.random(n)), rng.uniform(0, 360, n))


def run_together(*workers: Callable[[], None]) -> None:
    """Runs workers on their own threads from a common start; re-raises the first
    failure of any of them in the test's thread."""
    start = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def wrap(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            try:
                work()
            except BaseException as error:
                errors.append(error)

        return run

    threads = [threading.Thread(target=wrap(w), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
    assert not any(t.is_alive() for t in threads), "a thread never finished: deadlock?"
    if errors:
        raise errors[0]


def test_a_batch_moving_everyone_is_seen_whole():
    """All N devices hop between Beijing and Shanghai in single batches, with
    compactions in between. Each ring sees nobody or everybody, and one call looking at
    both cities (two centres, or one ring around both) always sees exactly N."""
    clock = FakeClock(T0)
    index = engine.LocationIndex(clock=clock)
    ids = np.arange(N, dtype=np.uint64)
    at_beijing = cluster(BEIJING, N, 1)
    at_shanghai = cluster(SHANGHAI, N, 2)
    index.upsert(ids, *at_beijing)
    done = threading.Event()
    seen_counts: set[tuple[int, int]] = set()

    def writer() -> None:
        try:
            for hop in range(30):
                clock.advance(1)
                index.upsert(ids, *(at_shanghai if hop % 2 == 0 else at_beijing))
                if hop % 7 == 6:
                    index.compact()
        finally:
            done.set()

    def ring_reader() -> None:
        reads = 0
        while not done.is_set() or reads < MIN_READS:
            a = index.within(*BEIJING, CLUSTER_M)
            b = index.within(*SHANGHAI, CLUSTER_M)
            assert a.size in (0, N) and b.size in (0, N), f"torn: {a.size} + {b.size}"
            for found in (a, b):
                if found.size:
                    assert np.array_equal(np.sort(found), ids)
            seen_counts.add((a.size, b.size))
            reads += 1

    def union_reader() -> None:
        reads = 0
        while not done.is_set() or reads < MIN_READS:
            out = index.new_recipients(
                engine.AlertRecord(),
                [BEIJING[0], SHANGHAI[0]],
                [BEIJING[1], SHANGHAI[1]],
                CLUSTER_M,
            )
            assert sum(v.size for v in out.values()) == N
            assert index.within(*MIDPOINT, BOTH_M).size == N
            _, keys = index.within_keys(*MIDPOINT, BOTH_M)
            assert np.unique(keys).size == N
            reads += 1

    run_together(writer, ring_reader, union_reader)
    # Sanity of the test itself: readers saw at least one whole city.
    assert seen_counts & {(N, 0), (0, N)}


def test_concurrent_writers_on_separate_devices_never_lose_one():
    """Two writers each move their own half of the devices around (with some stale
    reports mixed in) while a reader counts everyone in a ring holding every place
    they move to. The count never wavers, and the end state is each writer's last
    word."""
    clock = FakeClock(T0 + 1_000)
    index = engine.LocationIndex(clock=clock)
    halves = [np.arange(0, N, 2, dtype=np.uint64), np.arange(1, N, 2, dtype=np.uint64)]
    places = [cluster(BEIJING, N // 2, 3), cluster(SHANGHAI, N // 2, 4)]
    for half in halves:
        index.upsert(half, *places[0], seen_at=T0)
    done = [threading.Event(), threading.Event()]
    final = {}

    def writer(which: int) -> Callable[[], None]:
        def run() -> None:
            try:
                half = halves[which]
                for hop in range(25):
                    seen = T0 + 1 + hop
                    lat, lng = places[(hop + which) % 2]
                    index.upsert(half, lat, lng, seen_at=seen)
                    # A late duplicate from a slow gateway: older, so ignored.
                    added, updated, stale = index.upsert(
                        half[:100], lat[:100] * 0, lng[:100] * 0, seen_at=seen - 1
                    )
                    assert (added, updated, stale) == (0, 0, 100)
                    final[which] = (lat, lng, int(seen))
            finally:
                done[which].set()

        return run

    def reader() -> None:
        reads = 0
        while not all(d.is_set() for d in done) or reads < MIN_READS:
            assert index.within(*MIDPOINT, BOTH_M).size == N
            reads += 1

    run_together(writer(0), writer(1), reader)
    devices = index.devices()
    for which, half in enumerate(halves):
        lat, lng, seen = final[which]
        mask = np.isin(devices["device_id"], half)
        order = np.argsort(devices["device_id"][mask])
        assert np.array_equal(devices["device_id"][mask][order], half)
        assert np.all(devices["seen_at"][mask] == seen)
        assert np.allclose(devices["lat"][mask][order], lat, atol=1e-6)
        assert np.allclose(devices["lng"][mask][order], lng, atol=1e-6)


def test_two_callers_of_one_alert_never_share_a_device():
    """Two nodes fan out the same alert, sharing one record, while devices keep moving
    and arriving. Between them each device is returned at most once, and the record
    holds exactly what they returned."""
    clock = FakeClock(T0)
    index = engine.LocationIndex(clock=clock)
    ids = np.arange(N, dtype=np.uint64)
    lat, lng = cluster(BEIJING, N, 5)
    index.upsert(ids, lat, lng, gateway=ids % 3)
    record = engine.AlertRecord()
    done = threading.Event()
    returned: list[list[tuple[int, int]]] = [[], []]

    def ingest() -> None:
        try:
            rng = np.random.default_rng(6)
            for step in range(40):
                clock.advance(1)
                movers = rng.choice(N, 4_000, replace=False).astype(np.uint64)
                mlat, mlng = cluster(BEIJING, movers.size, 100 + step)
                index.upsert(movers, mlat, mlng, gateway=movers % 3)
                newcomers = np.arange(N + 100 * step, N + 100 * (step + 1), dtype=np.uint64)
                index.upsert(newcomers, *cluster(BEIJING, 100, 200 + step), gateway=7)
        finally:
            done.set()

    def caller(which: int) -> Callable[[], None]:
        def run() -> None:
            radius = 50.0
            calls = 0
            while not done.is_set() or calls < MIN_READS:
                out = index.new_recipients(record, *BEIJING, radius)
                for gateway, found in out.items():
                    returned[which].extend((gateway, int(i)) for i in found.tolist())
                radius = min(radius * 1.2, CLUSTER_M)
                calls += 1

        return run

    run_together(ingest, caller(0), caller(1))
    everything = returned[0] + returned[1]
    assert len(everything) == len(set(everything)), "a device was handed out twice"
    held = set()
    for gateway in record.gateways():
        held.update((int(gateway), int(i)) for i in record.ids(gateway).tolist())
    assert held == set(everything)
    # Once the threads are done, one more call tops the record up, and then everyone
    # inside the ring is in it.
    last = index.new_recipients(record, *BEIJING, CLUSTER_M)
    topped_up = {(g, int(i)) for g, v in last.items() for i in v.tolist()}
    assert not topped_up & held
    gateways, found = index.within_keys(*BEIJING, CLUSTER_M)
    inside = set(zip(gateways.tolist(), found.tolist(), strict=True))
    assert inside <= held | topped_up
