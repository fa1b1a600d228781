"""Unit tests of LocationIndex: geometry at awkward places, keys, liveness, and the
refusal of bad input (which must name the culprit and leave the index untouched)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from oracle import EARTH_RADIUS_M, HALF_CIRCUMFERENCE_M, assert_answer, haversine_m, ring
from support import T0, answer, destination

import engine

BEIJING = (39.9042, 116.4074)


def keys_at(index: engine.LocationIndex, lat: float, lng: float, radius: float, now=None):
    """Set of keys answered, after the shared consistency checks of `answer`."""
    found = answer(index, lat, lng, radius, now)
    assert len(found) == len(set(found)), "within_keys answered a device twice"
    return set(found)


# --- options and constants ------------------------------------------------------------


def test_earth_radius_is_the_documented_mean_radius():
    assert engine.EARTH_RADIUS_M == 6371008.8 == EARTH_RADIUS_M


def test_options_are_exposed(clock):
    index = engine.LocationIndex(ttl_s=60, resolution=7, clock=clock)
    assert (index.ttl_s, index.resolution) == (60, 7)
    default = engine.LocationIndex()
    assert (default.ttl_s, default.resolution) == (1800, 10)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": -5}, "ttl_s"),
        ({"ttl_s": 2**32}, "ttl_s"),
        ({"ttl_s": "60"}, "ttl_s"),
        ({"resolution": 4}, "resolution"),
        ({"resolution": 14}, "resolution"),
        ({"resolution": 10.0}, "resolution"),
        ({"resolution": True}, "resolution"),
    ],
)
def test_bad_options_are_refused_by_name(options, name):
    with pytest.raises(ValueError, match=name):
        engine.LocationIndex(**options)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        engine.LocationIndex(1800)


def test_an_empty_index_answers_nothing(index):
    assert len(index) == 0
    found = index.within(*BEIJING, 1e9)
    assert found.dtype == np.uint64 and found.size == 0
    gateways, ids = index.within_keys(0.0, 0.0, 0.0)
    assert gateways.size == ids.size == 0
    assert all(column.size == 0 for column in index.devices().values())
    assert index.expire() == 0 and index.live() == 0


# --- geometry at awkward places -------------------------------------------------------

AWKWARD = [
    (0.0, 0.0),
    (90.0, 0.0),
    (-90.0, 123.0),
    (0.0, 180.0),
    (0.0, -180.0),
    (-45.0, 179.9999999),
    (12.5, -179.9999999),
    (89.9999999, 10.0),
    (2.300882, -5.24539),  # an H3 pentagon
    BEIJING,
]


@pytest.mark.parametrize(("lat", "lng"), AWKWARD)
def test_a_device_exactly_at_the_centre_is_found_with_radius_zero(index, lat, lng):
    index.upsert([7], [lat], [lng])
    # A neighbour 3 m away must not be swept in by the rounding that keeps radius 0 safe.
    nlat, nlng = destination(lat, lng, np.array([3.0]), np.array([90.0 if abs(lat) < 89 else 180]))
    index.upsert([8], nlat, nlng)
    assert keys_at(index, lat, lng, 0.0) == {(0, 7)}
    assert keys_at(index, lat, lng, 0.5) == {(0, 7)}
    assert keys_at(index, float(nlat[0]), float(nlng[0]), 0.0) == {(0, 8)}
    assert keys_at(index, lat, lng, 4.0) == {(0, 7), (0, 8)}


@pytest.mark.parametrize("pole", [90.0, -90.0])
def test_every_longitude_at_a_pole_is_the_same_place(index, pole):
    lngs = [-180.0, -90.0, 0.0, 45.5, 179.0, 180.0]
    index.upsert(np.arange(len(lngs)), [pole] * len(lngs), lngs)
    for lng in (0.0, 17.0, -180.0, 180.0):
        assert keys_at(index, pole, lng, 0.0) == {(0, i) for i in range(len(lngs))}


@pytest.mark.parametrize("pole", [90.0, -90.0])
def test_rings_around_a_pole_are_round(index, pole):
    """Rings at a pole cover every longitude: devices 556 m from the pole are inside a
    1 km ring whatever their longitude, devices 2.2 km away are outside."""
    sign = math.copysign(1.0, pole)
    lngs = np.linspace(-180.0, 180.0, 73)
    near = np.full(lngs.size, sign * 89.995)  # 556 m from the pole
    far = np.full(lngs.size, sign * 89.98)  # 2,224 m
    index.upsert(np.arange(lngs.size), near, lngs)
    index.upsert(1000 + np.arange(lngs.size), far, lngs)
    expected = {(0, i) for i in range(lngs.size)}
    for lng in (0.0, 180.0, -77.0):
        assert keys_at(index, pole, lng, 1000.0) == expected
    assert keys_at(index, pole, 0.0, 3000.0) == expected | {(0, 1000 + i) for i in range(73)}


def test_rings_cross_the_antimeridian(index):
    # Two devices 0.0002 degrees of longitude apart across the antimeridian (21.9 m).
    index.upsert([1, 2], [10.0, 10.0], [179.9999, -179.9999])
    d = float(haversine_m(10.0, 179.9999, 10.0, -179.9999))
    assert 21.0 < d < 23.0
    assert keys_at(index, 10.0, 180.0, 15.0) == {(0, 1), (0, 2)}
    assert keys_at(index, 10.0, -180.0, 15.0) == {(0, 1), (0, 2)}
    assert keys_at(index, 10.0, 180.0, 5.0) == set()
    assert keys_at(index, 10.0, 179.9999, d + 1.5) == {(0, 1), (0, 2)}
    assert keys_at(index, 10.0, 179.9999, d - 1.5) == {(0, 1)}
    assert keys_at(index, 10.0, -179.9999, d - 1.5) == {(0, 2)}


def test_longitude_180_and_minus_180_are_the_same_place(index):
    index.upsert([1, 2], [33.0, 33.0], [180.0, -180.0])
    assert keys_at(index, 33.0, 180.0, 0.0) == {(0, 1), (0, 2)}
    assert keys_at(index, 33.0, -180.0, 0.0) == {(0, 1), (0, 2)}


def test_many_devices_on_one_spot(index):
    """Thousands of phones at one address (a stadium): far more than one cell is ever
    tested device by device, so the covering has to cope with an indivisible crowd."""
    n = 5000
    index.upsert(np.arange(n), np.full(n, BEIJING[0]), np.full(n, BEIJING[1]))
    lat3, lng3 = destination(*BEIJING, np.array([3.0]), np.array([45.0]))
    index.upsert([n], lat3, lng3)
    crowd = {(0, i) for i in range(n)}
    assert keys_at(index, *BEIJING, 0.0) == crowd
    assert keys_at(index, *BEIJING, 1.5) == crowd
    assert keys_at(index, *BEIJING, 4.5) == crowd | {(0, n)}
    assert index.within(*BEIJING, 0.0).size == n


@pytest.mark.parametrize("radius", [HALF_CIRCUMFERENCE_M, HALF_CIRCUMFERENCE_M + 1.0, 1e9])
def test_a_radius_of_half_the_circumference_answers_everything(index, radius):
    rng = np.random.default_rng(3)
    n = 3000
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    lng = rng.uniform(-180.0, 180.0, n)
    index.upsert(np.arange(n), lat, lng)
    # Plus a device exactly antipodal to the centre, the farthest possible.
    index.upsert([n], [-BEIJING[0]], [BEIJING[1] - 180.0])
    assert keys_at(index, *BEIJING, radius) == {(0, i) for i in range(n + 1)}


def test_the_antipode_is_outside_a_ring_10_km_short_of_it(index):
    index.upsert([1], [-BEIJING[0]], [BEIJING[1] - 180.0])
    assert keys_at(index, *BEIJING, HALF_CIRCUMFERENCE_M - 10_000.0) == set()


@pytest.mark.parametrize("from_antipode", [111.2, 300.0, 1_000.0, 3_000.0, 30_000.0])
def test_ring_boundary_is_decided_to_the_metre_near_the_antipode(index, from_antipode):
    """Rings of nearly half the circumference put their boundary close to the centre's
    antipode; the promise of 1 m holds there too. A device ``from_antipode`` metres from
    the antipode of (0, 0) must be outside a ring 5 m shorter than its distance and
    inside one 5 m longer."""
    lat, lng = destination(0.0, 180.0, np.array([from_antipode]), np.array([90.0]))
    index.upsert([1], lat, lng)
    d = float(haversine_m(0.0, 0.0, lat[0], lng[0]))
    assert HALF_CIRCUMFERENCE_M - d == pytest.approx(from_antipode, abs=0.01)
    assert keys_at(index, 0.0, 0.0, d - 5.0) == set()
    assert keys_at(index, 0.0, 0.0, d + 5.0) == {(0, 1)}


def test_a_device_111_m_from_the_antipode_is_inside_a_ring_50_m_short_of_half_the_world(index):
    """The smallest case of the one above: (0, 179.999) is 20,015,003 m from (0, 0),
    61 m inside a ring of half the circumference minus 50 m."""
    index.upsert([1], [0.0], [179.999])
    assert float(haversine_m(0.0, 0.0, 0.0, 179.999)) < HALF_CIRCUMFERENCE_M - 50.0 - 60.0
    assert keys_at(index, 0.0, 0.0, HALF_CIRCUMFERENCE_M - 50.0) == {(0, 1)}


# --- keys -----------------------------------------------------------------------------


def test_gateways_never_collide(index):
    """One id on three gateways is three phones in three places."""
    index.upsert([5], [10.0], [10.0], gateway=0)
    index.upsert([5], [10.0], [10.001], gateway=1)
    index.upsert([5], [-60.0], [10.0], gateway=65535)
    assert len(index) == 3
    assert keys_at(index, 10.0, 10.0, 500.0) == {(0, 5), (1, 5)}
    # `within` returns ids only: the id appears once per device.
    assert sorted(index.within(10.0, 10.0, 500.0).tolist()) == [5, 5]
    assert index.remove([5], gateway=1) == 1
    assert keys_at(index, 10.0, 10.0, 500.0) == {(0, 5)}
    assert keys_at(index, -60.0, 10.0, 1.0) == {(65535, 5)}
    assert index.remove([5]) == 2
    assert len(index) == 0


def test_the_extreme_ids_and_gateway_round_trip(index):
    top = 2**64 - 1
    ids = np.array([0, top, 2**63], dtype=np.uint64)
    index.upsert(ids, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], gateway=[0, 65535, 65535])
    assert keys_at(index, 1.0, 2.0, 0.0) == {(0, 0), (65535, top), (65535, 2**63)}
    devices = index.devices()
    assert sorted(zip(devices["gateway"].tolist(), devices["device_id"].tolist(), strict=True)) == [
        (0, 0),
        (65535, 2**63),
        (65535, top),
    ]


def test_plain_python_ints_and_numpy_scalars_are_accepted(index):
    index.upsert(3, 1.5, 2.5, gateway=np.uint16(9), seen_at=int(T0))
    index.upsert(np.uint64(4), np.float32(1.5), np.int64(2), gateway=9)
    assert keys_at(index, 1.5, 2.5, 1.0) == {(9, 3)}
    assert keys_at(index, 1.5, 2.0, 1.0) == {(9, 4)}


def test_one_gateway_for_all_or_one_per_device(index):
    index.upsert([1, 2, 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], gateway=4)
    index.upsert([1, 2, 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], gateway=[5, 6, 7])
    assert keys_at(index, 0.0, 0.0, 0.0) == {(4, 1), (4, 2), (4, 3), (5, 1), (6, 2), (7, 3)}


# --- moves, staleness, time -----------------------------------------------------------


def test_a_move_leaves_nothing_behind(index, clock):
    """The old place must never answer again, whether the move stays in its H3 cell,
    goes next door or across the world, and whether or not the store was compacted."""
    index.upsert([1], *BEIJING)
    stops = [(39.90421, 116.40741), (39.9100, 116.4074), (-33.86, 151.2), BEIJING]
    previous = BEIJING
    for i, (lat, lng) in enumerate(stops):
        clock.advance(1)
        assert index.upsert([1], lat, lng) == (0, 1, 0)
        if i == 1:
            index.compact()
        if previous != (lat, lng):
            assert (0, 1) not in keys_at(index, *previous, 0.5)
        assert keys_at(index, lat, lng, 0.0) == {(0, 1)}
        assert len(index) == 1
        previous = (lat, lng)


def test_an_older_report_is_ignored_and_counted_stale(index, clock):
    index.upsert([1], *BEIJING, seen_at=T0)
    assert index.upsert([1], [0.0], [0.0], seen_at=T0 - 10) == (0, 0, 1)
    assert keys_at(index, *BEIJING, 0.0) == {(0, 1)}
    assert keys_at(index, 0.0, 0.0, 1e5) == set()
    assert index.devices()["seen_at"].tolist() == [int(T0)]
    # An equal time is not older: the report is applied.
    assert index.upsert([1], [0.0], [0.0], seen_at=T0) == (0, 1, 0)
    assert keys_at(index, 0.0, 0.0, 0.0) == {(0, 1)}


def test_times_are_kept_to_the_whole_second(index):
    """Two reports within the same second are equal times, so the later one in the
    call wins even though its fraction is smaller; and a held report at .7 does not
    make a later report at .2 of the same second stale."""
    index.upsert([1, 1], [1.0, 2.0], [0.0, 0.0], seen_at=[T0 + 0.7, T0 + 0.2])
    assert keys_at(index, 2.0, 0.0, 0.0) == {(0, 1)}
    assert index.devices()["seen_at"].tolist() == [int(T0)]
    index.upsert([2], [3.0], [0.0], seen_at=T0 + 0.7)
    assert index.upsert([2], [4.0], [0.0], seen_at=T0 + 0.2) == (0, 1, 0)
    assert keys_at(index, 4.0, 0.0, 0.0) == {(0, 2)}


@pytest.mark.parametrize(
    ("times", "winner"),
    [
        ([5, 1, 3], 0),
        ([1, 3, 5], 2),
        ([5, 1, 5], 2),  # equal times: the later report
        ([4, 4, 4], 2),
        ([2, 9, 1], 1),
    ],
)
@pytest.mark.parametrize("known", [False, True])
def test_the_newest_report_of_a_call_wins(index, times, winner, known):
    if known:
        index.upsert([1], [-50.0], [-50.0], seen_at=T0 - 100)
    lats = [10.0, 20.0, 30.0]
    index.upsert([1, 1, 1], lats, [0.0, 0.0, 0.0], seen_at=[T0 + t for t in times])
    assert keys_at(index, lats[winner], 0.0, 0.0) == {(0, 1)}
    for i, lat in enumerate(lats):
        if i != winner:
            assert keys_at(index, lat, 0.0, 1000.0) == set()
    assert keys_at(index, -50.0, -50.0, 1000.0) == set()
    assert index.devices()["seen_at"].tolist() == [int(T0) + times[winner]]


@pytest.mark.parametrize("times", [[1, 3, 5], [5, 3, 1], [2, 2, 2]])
def test_repeats_in_a_call_count_as_one_device_new(index, times):
    counts = index.upsert([1, 1, 1], [10.0, 20.0, 30.0], [0.0] * 3, seen_at=[T0 + t for t in times])
    assert counts == (1, 0, 2)


@pytest.mark.parametrize("times", [[1, 3, 5], [5, 3, 1], [2, 2, 2]])
def test_repeats_in_a_call_count_as_one_device_known(index, times):
    """`updated` counts devices moved or refreshed, and repeats of a device within a
    call are stale: a known device reported three times is one update and two stale
    reports, whatever the order of the times (as for a new device: (1, 0, 2))."""
    index.upsert([1], [-50.0], [-50.0], seen_at=T0 - 100)
    counts = index.upsert([1, 1, 1], [10.0, 20.0, 30.0], [0.0] * 3, seen_at=[T0 + t for t in times])
    assert counts == (0, 1, 2)


def test_a_report_is_live_for_exactly_ttl_seconds(clock):
    index = engine.LocationIndex(ttl_s=60, clock=clock)
    index.upsert([1], *BEIJING, seen_at=T0 + 0.999)  # kept as T0
    assert keys_at(index, *BEIJING, 1.0, now=T0 + 60) == {(0, 1)}
    assert keys_at(index, *BEIJING, 1.0, now=T0 + 60.001) == set()
    assert index.live(now=T0 + 60) == 1
    # The clock is the default `now`.
    clock.t = T0 + 60
    assert keys_at(index, *BEIJING, 1.0) == {(0, 1)}
    assert len(index) == 1
    clock.t = T0 + 61
    assert keys_at(index, *BEIJING, 1.0) == set()
    assert len(index) == 0


def test_expire_drops_and_counts(clock):
    index = engine.LocationIndex(ttl_s=100, clock=clock)
    index.upsert([1, 2, 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], seen_at=[T0 - 50, T0 - 150, T0])
    assert index.expire(now=T0) == 1
    assert index.expire(now=T0) == 0
    assert index.devices()["device_id"].size == 2
    assert index.expire(now=T0 + 60) == 1
    assert keys_at(index, 0.0, 0.0, 0.0, now=T0 + 60) == {(0, 3)}
    assert index.live(now=T0 + 101) == 0
    assert index.devices()["device_id"].size == 0


def test_a_device_back_after_expiry_is_new_again(clock):
    index = engine.LocationIndex(ttl_s=100, clock=clock)
    index.upsert([1], [0.0], [0.0])
    clock.advance(150)
    assert index.expire() == 1
    assert index.upsert([1], [1.0], [1.0]) == (1, 0, 0)
    assert keys_at(index, 1.0, 1.0, 0.0) == {(0, 1)}


def test_a_device_back_after_expiry_counts_as_added_before_expire_runs(clock):
    """Once its report is past the time-to-live a device is gone (len says 0), whether
    or not a sweep dropped it yet: reporting again adds it, as len confirms."""
    index = engine.LocationIndex(ttl_s=100, clock=clock)
    index.upsert([1], [0.0], [0.0])
    clock.advance(150)
    assert keys_at(index, 0.0, 0.0, 1.0) == set()
    counts = index.upsert([1], [1.0], [1.0])
    assert len(index) == 1
    assert counts == (1, 0, 0)


def test_reports_up_to_300_s_ahead_are_accepted(index, clock):
    assert index.upsert([1], [0.0], [0.0], seen_at=clock.t + 300) == (1, 0, 0)
    assert keys_at(index, 0.0, 0.0, 0.0) == {(0, 1)}


def test_default_seen_at_is_the_clock(index, clock):
    clock.t = T0 + 12.5
    index.upsert([1, 2], [0.0, 0.0], [0.0, 0.0])
    assert index.devices()["seen_at"].tolist() == [int(T0) + 12] * 2


def test_datetime64_times_are_accepted(index):
    when = np.array(["2023-11-14T22:13:10.600"], dtype="datetime64[ms]")
    index.upsert([1], [0.0], [0.0], seen_at=when)
    expected = int(when.astype("datetime64[s]").astype(np.int64)[0])
    assert index.devices()["seen_at"].tolist() == [expected]


def test_remove_counts_what_it_forgot(index):
    index.upsert([1, 2, 3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], gateway=[1, 1, 2])
    assert index.remove([9]) == 0
    assert index.remove([1, 3], gateway=1) == 1
    assert index.remove([2, 3], gateway=[1, 2]) == 2
    assert len(index) == 0
    assert keys_at(index, 0.0, 0.0, 1e9) == set()


def test_devices_returns_every_stored_device_within_a_centimetre(index):
    rng = np.random.default_rng(11)
    n = 500
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    lng = rng.uniform(-180.0, 180.0, n)
    lat[:4] = [90.0, -90.0, 0.0, 0.0]
    lng[:4] = [0.0, 0.0, 180.0, -180.0]
    index.upsert(np.arange(n), lat, lng, gateway=np.arange(n) % 3, seen_at=T0 - np.arange(n))
    devices = index.devices()
    assert devices["gateway"].dtype == np.uint16 and devices["device_id"].dtype == np.uint64
    order = np.argsort(devices["device_id"])
    got = {name: column[order] for name, column in devices.items()}
    assert got["device_id"].tolist() == list(range(n))
    assert got["gateway"].tolist() == (np.arange(n) % 3).tolist()
    assert got["seen_at"].tolist() == (int(T0) - np.arange(n)).tolist()
    assert np.all(haversine_m(lat, lng, got["lat"], got["lng"]) < 0.01)
    assert np.all(np.abs(got["lat"]) <= 90.0) and np.all(np.abs(got["lng"]) <= 180.0)


def test_compact_and_memory_change_no_answer(index, clock):
    rng = np.random.default_rng(5)
    n = 2000
    lat, lng = destination(*BEIJING, 20_000 * np.sqrt(rng.random(n)), rng.uniform(0, 360, n))
    index.upsert(np.arange(n), lat, lng)
    clock.advance(1)
    moved = np.arange(0, n, 3)
    lat[moved], lng[moved] = destination(*BEIJING, rng.uniform(0, 20_000, moved.size), 0.0)
    index.upsert(moved, lat[moved], lng[moved])
    index.remove(np.arange(1, n, 7))
    alive = np.setdiff1d(np.arange(n), np.arange(1, n, 7))
    devices = {(0, int(i)): (float(lat[i]), float(lng[i])) for i in alive}
    before = keys_at(index, *BEIJING, 7_000.0)
    assert_answer(before, ring(devices, *BEIJING, 7_000.0))
    assert isinstance(index.memory_bytes(), int) and index.memory_bytes() > 0
    index.compact()
    assert keys_at(index, *BEIJING, 7_000.0) == before
    assert len(index) == alive.size


def test_a_nan_now_never_resurrects_removed_or_moved_devices(index, clock):
    """A query time that is not a number must not make the slots that removal and moves
    left behind answer again: refusing it is fine, answering them is not."""
    index.upsert([1, 2], [10.0, 11.0], [20.0, 20.0])
    clock.advance(1)
    index.upsert([1], [-10.0], [20.0])
    index.remove([2])
    for lat in (10.0, 11.0):
        try:
            found = index.within(lat, 20.0, 1000.0, now=math.nan)
        except ValueError as error:
            assert "now" in str(error)
        else:
            assert found.size == 0, f"dead slot answered at ({lat}, 20): {found}"
    record = engine.AlertRecord()
    try:
        out = index.new_recipients(record, [10.0, 11.0], [20.0, 20.0], 1000.0, now=math.nan)
    except ValueError as error:
        assert "now" in str(error)
    else:
        assert not any(ids.size for ids in out.values()), f"dead slots notified: {out}"
        assert len(record) == 0


def test_strided_views_and_foreign_byte_order_are_read_correctly(index):
    """Arrays that are views with steps, or big-endian, are converted, not misread."""
    ids = np.arange(10, dtype=">u8")[::2]
    lat = np.linspace(-80.0, 80.0, 10).astype(">f8")[::2]
    lng = np.linspace(170.0, -170.0, 10)[::-2]
    index.upsert(ids, lat, lng, gateway=np.array([1, 2, 3, 4, 5], dtype=">u2"))
    for i, gateway in enumerate([1, 2, 3, 4, 5]):
        assert keys_at(index, float(lat[i]), float(lng[i]), 0.0) == {(gateway, int(ids[i]))}


# --- bad input ------------------------------------------------------------------------

# Value errors name the argument, how many values are wrong and the first position.
BAD_VALUES = [
    ("nan lat", {"lat": [0.0, 0.0, math.nan, 0.0, math.nan]}, "lat", 2, 2),
    ("inf lat", {"lat": [0.0, math.inf, 0.0, 0.0, 0.0]}, "lat", 1, 1),
    ("lat above 90", {"lat": [0.0, 0.0, 0.0, 0.0, 90.000001]}, "lat", 1, 4),
    ("lat below -90", {"lat": [-91.0, -91.0, -91.0, 0.0, 0.0]}, "lat", 3, 0),
    ("nan lng", {"lng": [math.nan, 0.0, 0.0, 0.0, 0.0]}, "lng", 1, 0),
    ("-inf lng", {"lng": [0.0, 0.0, -math.inf, -math.inf, 0.0]}, "lng", 2, 2),
    ("lng above 180", {"lng": [0.0, 180.5, 0.0, 0.0, 0.0]}, "lng", 1, 1),
    ("lng below -180", {"lng": [0.0, 0.0, 0.0, -180.0001, 0.0]}, "lng", 1, 3),
    ("negative id", {"device_id": [1, 2, 3, -4, -5]}, "device_id", 2, 3),
    ("gateway above 65535", {"gateway": [0, 65536, 1, 70000, 2]}, "gateway", 2, 1),
    ("one gateway above 65535", {"gateway": 65536}, "gateway", 1, 0),
    ("negative gateway", {"gateway": [0, 0, -1, 0, 0]}, "gateway", 1, 2),
    ("future seen_at", {"seen_at": [T0, T0, T0, T0 + 300.5, T0 + 1e4]}, "seen_at", 2, 3),
    ("nan seen_at", {"seen_at": [T0, math.nan, T0, T0, T0]}, "seen_at", 1, 1),
    ("zero seen_at", {"seen_at": [0.0, T0, T0, T0, T0]}, "seen_at", 1, 0),
    ("negative seen_at", {"seen_at": [T0, T0, -5.0, T0, T0]}, "seen_at", 1, 2),
]

# Shape and type errors name the argument (there is no single position to blame).
BAD_SHAPES = [
    ("short lat", {"lat": [0.0] * 4}, "lat"),
    ("long lng", {"lng": [0.0] * 6}, "lng"),
    ("gateway length", {"gateway": [0, 1]}, "gateway"),
    ("seen_at length", {"seen_at": [T0, T0]}, "seen_at"),
    ("string lat", {"lat": ["0"] * 5}, "lat"),
    ("complex lng", {"lng": np.zeros(5, dtype=complex)}, "lng"),
    ("bool ids", {"device_id": [True, False, True, False, True]}, "device_id"),
    ("float ids", {"device_id": [1.0, 2.0, 3.0, 4.0, 5.0]}, "device_id"),
    ("object ids", {"device_id": np.array([1, 2, 3, 4, None], dtype=object)}, "device_id"),
    ("2-D ids", {"device_id": np.arange(5).reshape(5, 1)}, "device_id"),
    ("2-D lat", {"lat": np.zeros((1, 5))}, "lat"),
    ("bool gateway", {"gateway": True}, "gateway"),
    ("float gateway", {"gateway": 1.0}, "gateway"),
    ("string seen_at", {"seen_at": "yesterday"}, "seen_at"),
]


def _good_batch() -> dict[str, object]:
    return {
        "device_id": [101, 102, 103, 104, 105],
        "lat": [1.0, 1.0, 1.0, 1.0, 1.0],
        "lng": [2.0, 2.0, 2.0, 2.0, 2.0],
        "gateway": 0,
        "seen_at": T0,
    }


@pytest.fixture
def populated(index):
    """An index holding three devices, and a snapshot to prove bad calls change nothing."""
    index.upsert([1, 2, 3], [1.0, 1.0, 50.0], [2.0, 2.0, 60.0], gateway=[0, 3, 0])

    def snapshot():
        devices = index.devices()
        order = np.lexsort((devices["device_id"], devices["gateway"]))
        columns = {k: v[order].tolist() for k, v in devices.items()}
        return len(index), keys_at(index, 1.0, 2.0, 1e6), columns

    before = snapshot()
    yield index
    assert snapshot() == before, "a refused call changed the index"


@pytest.mark.parametrize(
    ("change", "name", "count", "first"),
    [case[1:] for case in BAD_VALUES],
    ids=[case[0] for case in BAD_VALUES],
)
def test_bad_values_are_refused_and_named(populated, change, name, count, first):
    batch = _good_batch() | change
    with pytest.raises(ValueError) as error:
        populated.upsert(**batch)
    message = str(error.value)
    assert message.startswith(name), message
    assert f"{count} value" in message, message
    assert f"position {first}" in message, message


@pytest.mark.parametrize(
    ("change", "name"), [case[1:] for case in BAD_SHAPES], ids=[case[0] for case in BAD_SHAPES]
)
def test_bad_shapes_and_types_are_refused_and_named(populated, change, name):
    batch = _good_batch() | change
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        populated.upsert(**batch)


def test_length_errors_give_both_counts(populated):
    with pytest.raises(ValueError, match=r"lat has 4 values but device_id has 5"):
        populated.upsert(**(_good_batch() | {"lat": [0.0] * 4}))


@pytest.mark.parametrize(
    ("ids", "gateway", "name", "count", "first"),
    [
        ([1, 2, -3, -4], None, "device_id", 2, 2),
        ([1, 2, 3], [0, 70000, 0], "gateway", 1, 1),
    ],
)
def test_bad_removals_are_refused_and_named(populated, ids, gateway, name, count, first):
    with pytest.raises(ValueError) as error:
        populated.remove(ids, gateway=gateway)
    message = str(error.value)
    assert message.startswith(name) and f"{count} value" in message, message
    assert f"position {first}" in message, message


@pytest.mark.parametrize(
    ("ids", "gateway", "name"),
    [([1.0, 2.0], None, "device_id"), ([1, 2, 3], [0, 3], "gateway"), ([[1, 2]], 0, "device_id")],
)
def test_bad_removal_shapes_are_refused(populated, ids, gateway, name):
    with pytest.raises(ValueError, match=name):
        populated.remove(ids, gateway=gateway)


BAD_QUERIES = [
    ((1.0, 2.0, -1.0), "radius_m"),
    ((1.0, 2.0, -1e-9), "radius_m"),
    ((1.0, 2.0, math.nan), "radius_m"),
    ((1.0, 2.0, "5"), "radius_m"),
    ((1.0, 2.0, True), "radius_m"),
    ((math.nan, 2.0, 10.0), "lat"),
    ((90.5, 2.0, 10.0), "lat"),
    ((-math.inf, 2.0, 10.0), "lat"),
    ((1.0, 180.0001, 10.0), "lng"),
    ((1.0, math.nan, 10.0), "lng"),
    (("1", 2.0, 10.0), "lat"),
    ((1.0, [2.0], 10.0), "lng"),
]


@pytest.mark.parametrize(("arguments", "name"), BAD_QUERIES)
@pytest.mark.parametrize("method", ["within", "within_keys"])
def test_bad_queries_are_refused_and_named(populated, method, arguments, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        getattr(populated, method)(*arguments)
