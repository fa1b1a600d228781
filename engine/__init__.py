"""tuanyuan: geospatial fan-out engine for verified missing-child alerts.

The index holds the latest location of millions of devices and answers, exactly,
which of them are inside a ring and not yet notified for an alert::

    import engine
    index = engine.LocationIndex()
    index.upsert(device_id=ids, lat=lat, lng=lng, gateway=gw)
    ids_inside = index.within(39.9042, 116.4074, 1000.0)
    record = engine.AlertRecord()
    by_gateway = index.new_recipients(record, 39.9042, 116.4074, 1000.0)
"""

from engine.index import EARTH_RADIUS_M, AlertRecord, LocationIndex

__all__ = ["EARTH_RADIUS_M", "AlertRecord", "LocationIndex"]
__version__ = "0.1.0"
