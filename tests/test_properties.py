"""Property tests: the engine against the brute-force oracle.

Random clustered populations and queries at awkward places, then random sequences of
reports, moves, removals, clock steps, expiry and compaction checked step by step
against a model dict. Every comparison allows the documented 1 m band at the boundary
and nothing else.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from oracle import (
    HALF_CIRCUMFERENCE_M,
    Model,
    assert_answer,
    classify,
    haversine_m,
    ring,
    union,
)
from support import (
    EVERYTHING_M,
    PENTAGONS,
    T0,
    FakeClock,
    answer,
    destination,
    places,
    populations,
    queries,
)

import engine

RESOLUTIONS = st.sampled_from([5, 7, 10, 13])


def _loaded_index(population, resolution: int, split: int = 0) -> engine.LocationIndex:
    """An index holding ``population``: the first ``split`` devices compacted into the
    sorted store, the rest in the appended tail, so that queries read both."""
    index = engine.LocationIndex(resolution=resolution, clock=FakeClock(T0))
    p = population
    for part in (slice(0, split), slice(split, None)):
        counts = index.upsert(p.ids[part], p.lat[part], p.lng[part], gateway=p.gateways[part])
        assert counts == (p.ids[part].size, 0, 0)
        if part.start == 0 and split:
            index.compact()
    return index


@given(population=populations(), resolution=RESOLUTIONS, data=st.data())
def test_within_matches_the_oracle(population, resolution, data):
    n = len(population)
    split = data.draw(st.sampled_from([0, n, n // 2]), label="devices compacted")
    index = _loaded_index(population, resolution, split)
    devices = population.positions()
    for _ in range(8):
        lat, lng, radius = data.draw(queries(population), label="query")
        assert_answer(answer(index, lat, lng, radius, T0), ring(devices, lat, lng, radius))


@given(population=populations(max_per_cluster=60), data=st.data())
def test_a_radius_of_half_the_circumference_holds_everyone(population, data):
    index = _loaded_index(population, 10)
    lat, lng = data.draw(places(), label="centre")
    radius = data.draw(st.sampled_from(EVERYTHING_M), label="radius")
    assert sorted(answer(index, lat, lng, radius, T0)) == sorted(population.keys())


@given(
    centre=places(),
    spread=st.sampled_from([300.0, 3_000.0, 60_000.0]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_rings_reaching_round_to_the_antipode_match_the_oracle(centre, spread, seed, data):
    """Radii of nearly half the circumference: the boundary passes close to the
    centre's antipode, where a cluster of devices waits."""
    lat, lng = centre
    alat, alng = -lat, (lng + 360.0) % 360.0 - 180.0
    rng = np.random.default_rng(seed)
    n = 200
    dlat, dlng = destination(alat, alng, spread * np.sqrt(rng.random(n)), rng.uniform(0, 360, n))
    index = engine.LocationIndex(clock=FakeClock(T0))
    index.upsert(np.arange(n), dlat, dlng)
    devices = {(0, i): (float(dlat[i]), float(dlng[i])) for i in range(n)}
    d = haversine_m(lat, lng, dlat, dlng)
    i = data.draw(st.integers(0, n - 1), label="device on the boundary")
    offset = data.draw(st.floats(1.05, 100.0), label="offset") * data.draw(st.sampled_from([-1, 1]))
    radius = min(float(d[i]) + offset, HALF_CIRCUMFERENCE_M - 1e-6)
    note(f"radius {radius} is {HALF_CIRCUMFERENCE_M - radius:.1f} m short of half the world")
    assert_answer(answer(index, lat, lng, radius, T0), ring(devices, lat, lng, radius))


def test_a_large_clustered_population_matches_the_oracle():
    """300,000 devices: a city, a stadium on one spot and a world-wide scatter. Rings
    this large are scanned on several cores and walk coarse cells wholly inside them;
    the answer must still match device for device."""
    rng = np.random.default_rng(20240601)
    city = (39.9042, 116.4074)
    n_city, n_spot, n_world = 200_000, 40_000, 60_000
    clat, clng = destination(
        *city, np.abs(rng.normal(0, 15_000, n_city)), rng.uniform(0, 360, n_city)
    )
    slat, slng = np.full(n_spot, 39.95), np.full(n_spot, 116.30)
    wlat = np.degrees(np.arcsin(rng.uniform(-1, 1, n_world)))
    wlng = rng.uniform(-180, 180, n_world)
    lat = np.concatenate([clat, slat, wlat])
    lng = np.concatenate([clng, slng, wlng])
    n = lat.size
    index = engine.LocationIndex(clock=FakeClock(T0))
    assert index.upsert(np.arange(n, dtype=np.uint64), lat, lng) == (n, 0, 0)
    cases = [
        (*city, 0.0),
        (*city, 25.0),
        (*city, 900.0),
        (*city, 12_000.0),
        (*city, 60_000.0),
        (39.95, 116.30, 0.0),
        (39.95, 116.30, 3_000.0),
        (40.1, 116.7, 20_000.0),
        (0.0, 0.0, 2_000_000.0),
        (-89.0, 10.0, 500_000.0),
        (*city, 15_000_000.0),
    ]
    for lat0, lng0, radius in cases:
        found = index.within(lat0, lng0, radius)
        assert np.unique(found).size == found.size, "a device answered twice"
        must, may, d = classify(lat, lng, lat0, lng0, radius)
        inside = np.zeros(n, dtype=bool)
        inside[found.astype(np.int64)] = True
        missing = np.flatnonzero(must & ~inside)
        extra = np.flatnonzero(inside & ~may)
        assert missing.size == 0, (
            f"{(lat0, lng0, radius)}: missing {missing[:5]} at {d[missing[:5]]}"
        )
        assert extra.size == 0, f"{(lat0, lng0, radius)}: extra {extra[:5]} at {d[extra[:5]]}"


def test_large_batches_with_repeats_keep_the_newest_report():
    """Batches far larger than the engine's parallel threshold, each device reported
    several times in one call with random times, some older than what is held, and
    enough moves to force compactions in the middle of the sequence."""
    rng = np.random.default_rng(7)
    n_keys = 30_000
    clock = FakeClock(T0)
    index = engine.LocationIndex(clock=clock)
    held_seen = np.zeros(n_keys, dtype=np.int64)
    held_lat = np.zeros(n_keys)
    held_lng = np.zeros(n_keys)
    present = np.zeros(n_keys, dtype=bool)
    for round_ in range(4):
        m = 90_000
        keys = rng.integers(0, n_keys, m)
        seen = np.floor(clock.t - rng.integers(0, 600, m)).astype(np.int64)
        lat, lng = destination(31.23, 121.47, rng.uniform(0, 50_000, m), rng.uniform(0, 360, m))
        added, updated, stale = index.upsert(keys.astype(np.uint64), lat, lng, seen_at=seen)
        assert added + updated + stale == m
        # Reference: per key, the newest report (the later one on equal times) unless
        # what is held is newer.
        order = np.lexsort((np.arange(m), seen, keys))
        last = np.r_[keys[order][1:] != keys[order][:-1], True]
        winners = order[last]
        wk = keys[winners]
        take = ~present[wk] | (seen[winners] >= held_seen[wk])
        assert added == int(np.count_nonzero(~present[wk])), f"round {round_}"
        wk, winners = wk[take], winners[take]
        held_seen[wk], held_lat[wk], held_lng[wk] = seen[winners], lat[winners], lng[winners]
        present[wk] = True
        clock.advance(120)

        devices = index.devices()
        order = np.argsort(devices["device_id"])
        ids = devices["device_id"][order].astype(np.int64)
        assert ids.tolist() == np.flatnonzero(present).tolist()
        assert np.array_equal(devices["seen_at"][order], held_seen[ids])
        assert np.all(
            haversine_m(held_lat[ids], held_lng[ids], devices["lat"][order], devices["lng"][order])
            < 0.01
        )
        for radius in (300.0, 5_000.0, 40_000.0):
            found = index.within(31.23, 121.47, radius)
            must, may, _ = classify(held_lat, held_lng, 31.23, 121.47, radius)
            inside = np.zeros(n_keys, dtype=bool)
            inside[found.astype(np.int64)] = True
            assert np.unique(found).size == found.size
            assert not np.any(must & present & ~inside)
            assert not np.any(inside & ~(may & present))


# --- stateful: the index against the model, step by step ------------------------------

TTL = 600
IDS = [0, 1, 2, 3, 41, 2**32, 2**63, 2**64 - 1]
GATEWAYS = [0, 1, 65535]
#: Places the machine works around: the poles, the antimeridian, a city, a pentagon.
ANCHORS = [
    (90.0, 0.0),
    (-90.0, 0.0),
    (0.0, 180.0),
    (-17.7, -180.0),
    (39.9042, 116.4074),
    PENTAGONS[0],
]
OFFSETS_M = [0.0, 0.0, 0.4, 3.0, 40.0, 700.0, 12_000.0, 300_000.0]
RADII_M = [0.0, 1.0, 2.5, 50.0, 1_000.0, 20_000.0, 500_000.0, 5_000_000.0, HALF_CIRCUMFERENCE_M]


@st.composite
def positions(draw: st.DrawFn) -> tuple[float, float]:
    """A point near one of the anchors: often exactly on it, sometimes far."""
    alat, alng = draw(st.sampled_from(ANCHORS))
    offset = draw(st.sampled_from(OFFSETS_M))
    if offset == 0.0:
        return alat, alng
    lat, lng = destination(alat, alng, np.array([offset]), np.array([draw(st.floats(0, 360))]))
    return float(lat[0]), float(lng[0])


reports = st.tuples(
    st.sampled_from(GATEWAYS),
    st.sampled_from(IDS),
    positions(),
    # Seconds relative to the clock: old enough to be stale or expired, up to the
    # 300 s allowed ahead, with fractions that the engine floors.
    st.one_of(st.none(), st.floats(-60.0, 300.0), st.floats(-1.5 * TTL, 300.0)),
)


class IndexMachine(RuleBasedStateMachine):
    """Drives one index and the model with the same calls; after every step the stored
    devices must be identical, and every query must match the oracle."""

    @initialize(resolution=RESOLUTIONS)
    def start(self, resolution):
        self.clock = FakeClock(T0)
        self.index = engine.LocationIndex(ttl_s=TTL, resolution=resolution, clock=self.clock)
        self.model = Model(TTL)
        # One alert runs through the whole sequence.
        self.record = engine.AlertRecord()
        self.notified: set[tuple[int, int]] = set()

    @rule(batch=st.lists(reports, max_size=24))
    def upsert(self, batch):
        rows = []
        for gateway, device_id, (lat, lng), ahead in batch:
            seen_at = self.clock.t if ahead is None else self.clock.t + ahead
            rows.append((gateway, device_id, lat, lng, seen_at))
        if rows:
            gateways, ids, lats, lngs, seens = (list(column) for column in zip(*rows, strict=True))
        else:
            gateways, ids, lats, lngs, seens = [], [], [], [], []
        got = self.index.upsert(
            np.array(ids, dtype=np.uint64),
            lats,
            lngs,
            gateway=np.array(gateways, dtype=np.uint16),
            seen_at=np.array(seens, dtype=np.float64),
        )
        expected = self.model.upsert(rows, self.clock.t)
        assert sum(got) == len(rows), f"{got} for {len(rows)} reports"
        if expected.settled:
            assert got[0] == expected.added, f"{got}, expected {expected.triple()}"
            if len({(g, i) for g, i, *_ in rows}) == len(rows):
                # One report per device: the split is unambiguous.
                assert got == expected.triple()

    @rule(data=st.data())
    def move_known(self, data):
        """Moves a device the index holds: the most important path, so not left to
        the chance of drawing a held key."""
        keys = sorted(self.model.held)
        if not keys:
            return
        gateway, device_id = data.draw(st.sampled_from(keys), label="key")
        lat, lng = data.draw(positions(), label="to")
        got = self.index.upsert([device_id], [lat], [lng], gateway=gateway)
        expected = self.model.upsert([(gateway, device_id, lat, lng, self.clock.t)], self.clock.t)
        if expected.settled:
            assert got == expected.triple()

    @rule(
        ids=st.lists(st.sampled_from(IDS), max_size=4),
        gateway=st.one_of(st.none(), st.sampled_from(GATEWAYS)),
    )
    def remove(self, ids, gateway):
        got = self.index.remove(np.array(ids, dtype=np.uint64), gateway=gateway)
        assert got == self.model.remove(ids, gateway)

    @rule(seconds=st.one_of(st.floats(0.0, 2.0), st.integers(0, 60), st.integers(TTL - 5, TTL + 5)))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def expire(self):
        assert self.index.expire() == self.model.expire(self.clock.t)

    @rule()
    def count(self):
        self.model.expire(self.clock.t)
        assert len(self.index) == len(self.model.held)

    @rule()
    def compact(self):
        self.index.compact()

    @rule(
        centre=st.one_of(st.sampled_from(ANCHORS), positions(), places()),
        radius=st.one_of(st.sampled_from(RADII_M), st.floats(0.0, 1e6)),
        later=st.sampled_from([0.0, 0.0, 0.5, TTL / 2]),
    )
    def query(self, centre, radius, later):
        now = self.clock.t + later
        lat, lng = centre
        assert_answer(
            answer(self.index, lat, lng, radius, now),
            self.model.ring(lat, lng, radius, now),
            f"within({lat}, {lng}, {radius}) at +{later}",
        )

    @precondition(lambda self: self.model.held)
    @rule(data=st.data())
    def query_at_a_device(self, data):
        """Radius 0 and a few metres exactly on a held device, live or not."""
        key = data.draw(st.sampled_from(sorted(self.model.held)), label="key")
        held = self.model.held[key]
        radius = data.draw(st.sampled_from([0.0, 0.3, 2.0]), label="radius")
        expected = self.model.ring(held.lat, held.lng, radius, self.clock.t)
        assert_answer(answer(self.index, held.lat, held.lng, radius), expected)

    @rule(
        centres=st.lists(st.one_of(st.sampled_from(ANCHORS), positions()), min_size=1, max_size=3),
        radius=st.sampled_from(RADII_M),
    )
    def alert(self, centres, radius):
        """Whatever moved, left or expired since the last call, the alert returns exactly
        the live devices inside its rings that it has not notified yet."""
        lats, lngs = [c[0] for c in centres], [c[1] for c in centres]
        out = self.index.new_recipients(self.record, lats, lngs, radius)
        got = [(gateway, int(i)) for gateway, ids in out.items() for i in ids.tolist()]
        assert len(got) == len(set(got)), "a device returned twice in one call"
        got = set(got)
        expected = union(self.model.ring(lat, lng, radius, self.clock.t) for lat, lng in centres)
        assert not got & self.notified, f"notified again: {sorted(got & self.notified)}"
        assert expected.must - self.notified <= got, "missing inside the rings"
        assert got <= expected.may, f"outside the rings: {sorted(got - expected.may)}"
        self.notified |= got
        assert len(self.record) == len(self.notified)

    @invariant()
    def stores_the_same_devices(self):
        """What the engine stores (live or expired, not yet dropped) is what the model
        holds: same keys, same seconds, positions within a centimetre."""
        devices = self.index.devices()
        got = {
            (g, i): (la, ln, s)
            for g, i, la, ln, s in zip(
                devices["gateway"].tolist(),
                devices["device_id"].tolist(),
                devices["lat"].tolist(),
                devices["lng"].tolist(),
                devices["seen_at"].tolist(),
                strict=True,
            )
        }
        assert set(got) == set(self.model.held)
        for key, (lat, lng, seen) in got.items():
            held = self.model.held[key]
            assert seen == held.seen, key
            assert haversine_m(lat, lng, held.lat, held.lng) < 0.01, key


TestIndexMachine = IndexMachine.TestCase


@given(
    held=st.lists(
        st.tuples(st.sampled_from(IDS[:4]), st.integers(-50, 0)),
        max_size=4,
        unique_by=lambda r: r[0],
    ),
    batch=st.lists(
        st.tuples(st.sampled_from(IDS[:4]), st.integers(-60, 10)), min_size=1, max_size=10
    ),
)
def test_counts_follow_devices_not_reports(held, batch):
    """(added, updated, stale): a device is added or updated once per call, every other
    report of it (older, or repeated in the call) is stale, whatever the order."""
    clock = FakeClock(T0)
    index = engine.LocationIndex(clock=clock)
    model = Model(index.ttl_s)
    for device_id, ago in held:
        index.upsert([device_id], [1.0], [1.0], seen_at=T0 + ago)
        model.upsert([(0, device_id, 1.0, 1.0, T0 + ago)], T0)
    rows = [(0, device_id, 2.0 + k, 3.0, T0 + t) for k, (device_id, t) in enumerate(batch)]
    got = index.upsert(
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        seen_at=[r[4] for r in rows],
    )
    assert got == model.upsert(rows, T0).triple()
    for key, held_ in model.held.items():
        assert answer(index, held_.lat, held_.lng, 0.0).count(key) == 1


def test_poles_and_antimeridian_stay_consistent_under_many_moves():
    """A fixed walk of moves back and forth across the antimeridian and over a pole,
    with compactions in between: no position is ever answered from two places."""
    clock = FakeClock(T0)
    index = engine.LocationIndex(clock=clock, resolution=13)
    walk = [
        (0.0, 179.99999),
        (0.0, -179.99999),
        (0.0, 180.0),
        (89.99999, 0.0),
        (90.0, 0.0),
        (89.99999, 180.0),
        (-90.0, 0.0),
        (0.0, -180.0),
    ]
    n = 50
    for step, (lat, lng) in enumerate(walk * 3):
        clock.advance(1)
        index.upsert(np.arange(n), np.full(n, lat), np.full(n, lng))
        if step % 5 == 4:
            index.compact()
        everyone = {(0, i) for i in range(n)}
        assert set(answer(index, lat, lng, 0.0)) == everyone
        for other in {w for w in walk if haversine_m(*w, lat, lng) > 10.0}:
            assert answer(index, *other, 1.0) == []
        assert len(index) == n
