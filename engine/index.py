"""The live location index: the Python face of the Rust core.

This module checks and converts what callers pass (shapes, dtypes, defaults); values
(coordinates, times, radii) are checked by the core in the same pass as the work. Every
call that touches many devices releases the GIL, so queries and ingest run side by side
on separate threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from engine import _core

#: Mean Earth radius in metres; every distance in the engine is a great-circle distance
#: on this sphere.
EARTH_RADIUS_M: float = _core.EARTH_RADIUS_M

#: Default time-to-live of a location report, in seconds.
DEFAULT_TTL_S = 30 * 60

#: Default H3 resolution devices are filed under (cells of about 0.015 km²).
DEFAULT_RESOLUTION = 10


def _array(name: str, value: object, kinds: str, dtype: type) -> np.ndarray:
    """``value`` as a contiguous 1-D array of ``dtype``; ``kinds`` are the accepted
    numpy dtype kinds."""
    array = np.asarray(value)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind not in kinds:
        raise ValueError(f"{name} must be an array of numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def _integers(name: str, value: object, high: int, dtype: type) -> np.ndarray:
    """Non-negative integers up to ``high`` as a contiguous array of ``dtype``."""
    array = np.asarray(value)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an array of integers, got dtype {array.dtype}")
    if array.dtype.kind == "i":
        bad = np.flatnonzero(array < 0)
        if bad.size:
            raise ValueError(
                f"{name}: {bad.size} value(s) are negative "
                f"(first at position {bad[0]}: {array[bad[0]]})"
            )
    if array.size and high < np.iinfo(np.uint64).max:
        bad = np.flatnonzero(array.astype(np.uint64, copy=False) > high)
        if bad.size:
            raise ValueError(
                f"{name}: {bad.size} value(s) are above {high} "
                f"(first at position {bad[0]}: {array[bad[0]]})"
            )
    return np.ascontiguousarray(array, dtype=dtype)


def _seconds(name: str, value: object) -> np.ndarray:
    """Unix times in seconds from floats, integers or numpy datetimes."""
    array = np.asarray(value)
    if array.dtype.kind == "M":
        array = array.astype("datetime64[ns]").astype(np.int64) / 1e9
    return _array(name, array, "fiu", np.float64)


class AlertRecord(_core.AlertRecord):
    """Devices already notified for one alert, by gateway.

    Starts empty; :meth:`LocationIndex.new_recipients` fills it. ``len(record)`` counts
    the devices.
    """

    def add(self, gateway: int, ids: object) -> int:
        """Records devices notified by other means (or restores a record); returns how
        many were not recorded yet."""
        gateways = _integers("gateway", gateway, 65535, np.uint16)
        if gateways.size != 1:
            raise ValueError(f"gateway must be one integer, got {gateways.size} values")
        return super().add(int(gateways[0]), _integers("device_id", ids, 2**64 - 1, np.uint64))

    def add_new(self, gateway: int, ids: object) -> np.ndarray:
        """Records devices as notified and returns the ids (uint64, in the given order,
        each once) that were not recorded yet: the ones to notify now."""
        gateways = _integers("gateway", gateway, 65535, np.uint16)
        if gateways.size != 1:
            raise ValueError(f"gateway must be one integer, got {gateways.size} values")
        ids = _integers("device_id", ids, 2**64 - 1, np.uint64)
        return super().add_new(int(gateways[0]), ids)

    def contains(self, gateway: int, device_id: int) -> bool:
        """Whether a device is recorded."""
        return super().contains(int(gateway), int(device_id))

    def ids(self, gateway: int) -> np.ndarray:
        """Recorded ids of one gateway, ascending (uint64)."""
        return super().ids(int(gateway))

    def gateways(self) -> list[int]:
        """Gateways with at least one recorded device, ascending."""
        return super().gateways()


class LocationIndex:
    """Live device locations, answering exact radius queries.

    Devices are identified by ``(gateway, device_id)``: the partner app (push gateway)
    that reports them and the 64-bit id that app gave them. Two gateways may use the
    same id for two different phones; they never collide.

    Options:
        ttl_s: seconds after its last report that a device stops being answered and
            is dropped (default 1800, 30 minutes).
        resolution: H3 resolution devices are filed under, 5 to 13 (default 10). Finer
            cells test fewer devices one by one at the edge of a ring; coarser cells
            make a smaller directory.
        clock: returns the current Unix time in seconds (default ``time.time``); tests
            and simulations pass their own.
    """

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        resolution: int = DEFAULT_RESOLUTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (isinstance(ttl_s, int | float) and 1 <= ttl_s < 2**32):
            raise ValueError(f"ttl_s must be a number of seconds from 1 to 2^32 - 1, got {ttl_s!r}")
        if not isinstance(resolution, int) or isinstance(resolution, bool):
            raise ValueError(f"resolution must be an integer, got {resolution!r}")
        self._core = _core.Index(resolution, round(ttl_s))
        self._clock = clock

    @property
    def ttl_s(self) -> int:
        """Time-to-live of a report, in seconds."""
        return self._core.ttl_s

    @property
    def resolution(self) -> int:
        """H3 resolution devices are filed under."""
        return self._core.resolution

    def _now(self, now: float | None) -> float:
        return float(self._clock() if now is None else now)

    def upsert(
        self,
        device_id: object,
        lat: object,
        lng: object,
        gateway: object = 0,
        seen_at: object = None,
    ) -> tuple[int, int, int]:
        """Records the latest location of devices (a million per call is fine).

        Args:
            device_id: unsigned 64-bit ids, one per device.
            lat, lng: degrees, one per device (latitude within [-90, 90], longitude
                within [-180, 180]).
            gateway: partner app of each device: one integer from 0 to 65535 for all,
                or one per device.
            seen_at: Unix time in seconds (float, integer or ``datetime64``) of each
                report, or one for all; default now. Kept to the whole second. A report
                older than what the index holds for its device is ignored; one more
                than 300 s ahead of the clock is refused.

        Returns:
            ``(added, updated, stale)``: devices new to the index (or back after removal
            or expiry), live devices moved or refreshed, and the other reports: older
            than what the index held, or further reports of a device already counted
            in the call (the newest one is applied all the same).

        Raises:
            ValueError: naming the argument, how many values are wrong and the first
                position. Nothing is recorded then.
        """
        ids = _integers("device_id", device_id, 2**64 - 1, np.uint64)
        gateways = _integers("gateway", gateway, 65535, np.uint16)
        lats = _array("lat", lat, "fiu", np.float64)
        lngs = _array("lng", lng, "fiu", np.float64)
        now = self._now(None)
        seen = np.full(ids.size, now) if seen_at is None else _seconds("seen_at", seen_at)
        if seen.size == 1 and ids.size != 1:
            seen = np.full(ids.size, seen[0])
        return self._core.upsert(ids, gateways, lats, lngs, seen, now)

    def remove(self, device_id: object, gateway: object = None) -> int:
        """Forgets devices now. Without ``gateway``, each id is forgotten on every
        gateway that holds it. Returns how many devices were forgotten."""
        ids = _integers("device_id", device_id, 2**64 - 1, np.uint64)
        gateways = None if gateway is None else _integers("gateway", gateway, 65535, np.uint16)
        return self._core.remove(ids, gateways)

    def within(
        self, lat: float, lng: float, radius_m: float, *, now: float | None = None
    ) -> np.ndarray:
        """Ids (uint64, any order) of the live devices whose great-circle distance from
        the centre is at most ``radius_m`` metres.

        Exact up to the centimetre-level rounding of stored positions. An id that two
        gateways use for two devices inside appears twice: use :meth:`within_keys` to
        tell them apart.
        """
        return self._core.within(*self._centre(lat, lng, radius_m), self._now(now))

    def within_keys(
        self, lat: float, lng: float, radius_m: float, *, now: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`within`, as ``(gateways, ids)`` arrays."""
        return self._core.within_keys(*self._centre(lat, lng, radius_m), self._now(now))

    def new_recipients(
        self,
        record: AlertRecord,
        lat: object,
        lng: object,
        radius_m: float,
        *,
        now: float | None = None,
    ) -> dict[int, np.ndarray]:
        """Live devices within ``radius_m`` metres of any centre that ``record`` does not
        hold yet, as ``{gateway: ids}``; they are added to ``record`` in the same pass,
        so no device is ever returned twice for one record, whatever runs alongside.

        ``lat`` and ``lng`` are one centre or arrays of centres, in degrees.
        """
        if not isinstance(record, AlertRecord):
            raise ValueError(f"record must be an AlertRecord, got {type(record).__name__}")
        lats = _array("lat", lat, "fiu", np.float64)
        lngs = _array("lng", lng, "fiu", np.float64)
        if lats.size != lngs.size:
            raise ValueError(f"lng has {lngs.size} values but lat has {lats.size}")
        radius = self._radius(radius_m)
        return self._core.new_recipients(record, lats, lngs, radius, self._now(now))

    def positions(
        self, device_id: object, gateway: object = 0, *, now: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The positions held for devices, as ``(lat, lng)`` float64 arrays in degrees
        (to the centimetre), NaN for a device not held or expired. After a batch of
        reports this is where each device stands, whichever reports were stale."""
        ids = _integers("device_id", device_id, 2**64 - 1, np.uint64)
        gateways = _integers("gateway", gateway, 65535, np.uint16)
        return self._core.positions(ids, gateways, self._now(now))

    def expire(self, *, now: float | None = None) -> int:
        """Drops the devices whose last report is older than the time-to-live; returns
        how many. Queries never answer them anyway; this frees their memory."""
        return self._core.expire(self._now(now))

    def live(self, *, now: float | None = None) -> int:
        """Live devices at ``now`` (expired ones are dropped first)."""
        return self._core.live(self._now(now))

    def __len__(self) -> int:
        return self.live()

    def memory_bytes(self) -> int:
        """Bytes of memory the index holds."""
        return self._core.memory_bytes()

    def compact(self) -> None:
        """Folds recent moves into the sorted store now (it happens by itself as moves
        accumulate; this is for measurements)."""
        self._core.compact()

    def devices(self) -> dict[str, np.ndarray]:
        """Every stored device as columns ``gateway``, ``device_id``, ``lat``, ``lng``
        (degrees, within a centimetre) and ``seen_at`` (Unix seconds)."""
        gateways, ids, lats, lngs, seen = self._core.devices()
        return {"gateway": gateways, "device_id": ids, "lat": lats, "lng": lngs, "seen_at": seen}

    @staticmethod
    def _radius(radius_m: object) -> float:
        if isinstance(radius_m, bool) or not isinstance(radius_m, int | float | np.number):
            raise ValueError(f"radius_m must be a number of metres, got {radius_m!r}")
        return float(radius_m)

    def _centre(self, lat: object, lng: object, radius_m: object) -> tuple[float, float, float]:
        for name, value in (("lat", lat), ("lng", lng)):
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise ValueError(f"{name} must be a number of degrees, got {value!r}")
        return float(lat), float(lng), self._radius(radius_m)
