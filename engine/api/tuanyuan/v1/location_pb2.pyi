from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LocationBatch(_message.Message):
    __slots__ = ("gateway_id", "device_ids", "latitudes", "longitudes", "observed_at")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    LATITUDES_FIELD_NUMBER: _ClassVar[int]
    LONGITUDES_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    gateway_id: int
    device_ids: _containers.RepeatedScalarFieldContainer[int]
    latitudes: _containers.RepeatedScalarFieldContainer[float]
    longitudes: _containers.RepeatedScalarFieldContainer[float]
    observed_at: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, gateway_id: _Optional[int] = ..., device_ids: _Optional[_Iterable[int]] = ..., latitudes: _Optional[_Iterable[float]] = ..., longitudes: _Optional[_Iterable[float]] = ..., observed_at: _Optional[_Iterable[float]] = ...) -> None: ...

class ReportSummary(_message.Message):
    __slots__ = ("batches", "reports", "added", "updated", "stale", "geofence_recipients")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    GEOFENCE_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    batches: int
    reports: int
    added: int
    updated: int
    stale: int
    geofence_recipients: int
    def __init__(self, batches: _Optional[int] = ..., reports: _Optional[int] = ..., added: _Optional[int] = ..., updated: _Optional[int] = ..., stale: _Optional[int] = ..., geofence_recipients: _Optional[int] = ...) -> None: ...

class ForgetDevicesRequest(_message.Message):
    __slots__ = ("gateway_id", "device_ids")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    gateway_id: int
    device_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gateway_id: _Optional[int] = ..., device_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForgetDevicesResponse(_message.Message):
    __slots__ = ("forgotten",)
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    forgotten: int
    def __init__(self, forgotten: _Optional[int] = ...) -> None: ...
