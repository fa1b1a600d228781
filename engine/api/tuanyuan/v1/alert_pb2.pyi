import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sex(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEX_UNSPECIFIED: _ClassVar[Sex]
    SEX_FEMALE: _ClassVar[Sex]
    SEX_MALE: _ClassVar[Sex]

class Resolution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESOLUTION_UNSPECIFIED: _ClassVar[Resolution]
    RESOLUTION_FOUND: _ClassVar[Resolution]
    RESOLUTION_CANCELLED: _ClassVar[Resolution]
    RESOLUTION_FALSE_REPORT: _ClassVar[Resolution]

class AlertStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATUS_UNSPECIFIED: _ClassVar[AlertStatus]
    ALERT_STATUS_SCHEDULED: _ClassVar[AlertStatus]
    ALERT_STATUS_ACTIVE: _ClassVar[AlertStatus]
    ALERT_STATUS_EXPIRED: _ClassVar[AlertStatus]
    ALERT_STATUS_RESOLVED: _ClassVar[AlertStatus]

class AlertEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_EVENT_KIND_UNSPECIFIED: _ClassVar[AlertEventKind]
    ALERT_EVENT_KIND_SNAPSHOT: _ClassVar[AlertEventKind]
    ALERT_EVENT_KIND_STAGE_STARTED: _ClassVar[AlertEventKind]
    ALERT_EVENT_KIND_PROGRESS: _ClassVar[AlertEventKind]
    ALERT_EVENT_KIND_UPDATED: _ClassVar[AlertEventKind]
    ALERT_EVENT_KIND_EXPIRED: _ClassVar[AlertEventKind]
    ALERT_EVENT_KIND_RESOLVED: _ClassVar[AlertEventKind]
SEX_UNSPECIFIED: Sex
SEX_FEMALE: Sex
SEX_MALE: Sex
RESOLUTION_UNSPECIFIED: Resolution
RESOLUTION_FOUND: Resolution
RESOLUTION_CANCELLED: Resolution
RESOLUTION_FALSE_REPORT: Resolution
ALERT_STATUS_UNSPECIFIED: AlertStatus
ALERT_STATUS_SCHEDULED: AlertStatus
ALERT_STATUS_ACTIVE: AlertStatus
ALERT_STATUS_EXPIRED: AlertStatus
ALERT_STATUS_RESOLVED: AlertStatus
ALERT_EVENT_KIND_UNSPECIFIED: AlertEventKind
ALERT_EVENT_KIND_SNAPSHOT: AlertEventKind
ALERT_EVENT_KIND_STAGE_STARTED: AlertEventKind
ALERT_EVENT_KIND_PROGRESS: AlertEventKind
ALERT_EVENT_KIND_UPDATED: AlertEventKind
ALERT_EVENT_KIND_EXPIRED: AlertEventKind
ALERT_EVENT_KIND_RESOLVED: AlertEventKind

class Centre(_message.Message):
    __slots__ = ("latitude", "longitude", "label")
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    latitude: float
    longitude: float
    label: str
    def __init__(self, latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("radius_m", "duration_s")
    RADIUS_M_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    radius_m: float
    duration_s: int
    def __init__(self, radius_m: _Optional[float] = ..., duration_s: _Optional[int] = ...) -> None: ...

class Stages(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[Stage]
    def __init__(self, stages: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ...) -> None: ...

class LocalizedText(_message.Message):
    __slots__ = ("language", "name", "description", "last_seen_place", "suspect_description", "contact")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_PLACE_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    language: str
    name: str
    description: str
    last_seen_place: str
    suspect_description: str
    contact: str
    def __init__(self, language: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., last_seen_place: _Optional[str] = ..., suspect_description: _Optional[str] = ..., contact: _Optional[str] = ...) -> None: ...

class AlertPayload(_message.Message):
    __slots__ = ("texts", "age_years", "sex", "height_cm", "photo_urls", "last_seen_at")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    AGE_YEARS_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_CM_FIELD_NUMBER: _ClassVar[int]
    PHOTO_URLS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedCompositeFieldContainer[LocalizedText]
    age_years: int
    sex: Sex
    height_cm: int
    photo_urls: _containers.RepeatedScalarFieldContainer[str]
    last_seen_at: _timestamp_pb2.Timestamp
    def __init__(self, texts: _Optional[_Iterable[_Union[LocalizedText, _Mapping]]] = ..., age_years: _Optional[int] = ..., sex: _Optional[_Union[Sex, str]] = ..., height_cm: _Optional[int] = ..., photo_urls: _Optional[_Iterable[str]] = ..., last_seen_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateAlertRequest(_message.Message):
    __slots__ = ("alert_id", "centres", "start_time", "schedule_name", "stages", "payload")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    CENTRES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    centres: _containers.RepeatedCompositeFieldContainer[Centre]
    start_time: _timestamp_pb2.Timestamp
    schedule_name: str
    stages: Stages
    payload: AlertPayload
    def __init__(self, alert_id: _Optional[str] = ..., centres: _Optional[_Iterable[_Union[Centre, _Mapping]]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., schedule_name: _Optional[str] = ..., stages: _Optional[_Union[Stages, _Mapping]] = ..., payload: _Optional[_Union[AlertPayload, _Mapping]] = ...) -> None: ...

class Centres(_message.Message):
    __slots__ = ("centres",)
    CENTRES_FIELD_NUMBER: _ClassVar[int]
    centres: _containers.RepeatedCompositeFieldContainer[Centre]
    def __init__(self, centres: _Optional[_Iterable[_Union[Centre, _Mapping]]] = ...) -> None: ...

class UpdateAlertRequest(_message.Message):
    __slots__ = ("alert_id", "centres", "payload", "schedule_name", "stages", "expected_version")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    CENTRES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    centres: Centres
    payload: AlertPayload
    schedule_name: str
    stages: Stages
    expected_version: int
    def __init__(self, alert_id: _Optional[str] = ..., centres: _Optional[_Union[Centres, _Mapping]] = ..., payload: _Optional[_Union[AlertPayload, _Mapping]] = ..., schedule_name: _Optional[str] = ..., stages: _Optional[_Union[Stages, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class LocalizedNotice(_message.Message):
    __slots__ = ("language", "text")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    language: str
    text: str
    def __init__(self, language: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class ResolveAlertRequest(_message.Message):
    __slots__ = ("alert_id", "resolution", "follow_up")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    resolution: Resolution
    follow_up: _containers.RepeatedCompositeFieldContainer[LocalizedNotice]
    def __init__(self, alert_id: _Optional[str] = ..., resolution: _Optional[_Union[Resolution, str]] = ..., follow_up: _Optional[_Iterable[_Union[LocalizedNotice, _Mapping]]] = ...) -> None: ...

class GetAlertRequest(_message.Message):
    __slots__ = ("alert_id",)
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    def __init__(self, alert_id: _Optional[str] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[AlertStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[AlertStatus, str]]] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class WatchAlertRequest(_message.Message):
    __slots__ = ("alert_id",)
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    def __init__(self, alert_id: _Optional[str] = ...) -> None: ...

class PreviewAlertRequest(_message.Message):
    __slots__ = ("centres", "schedule_name", "stages")
    CENTRES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    centres: _containers.RepeatedCompositeFieldContainer[Centre]
    schedule_name: str
    stages: Stages
    def __init__(self, centres: _Optional[_Iterable[_Union[Centre, _Mapping]]] = ..., schedule_name: _Optional[str] = ..., stages: _Optional[_Union[Stages, _Mapping]] = ...) -> None: ...

class GatewayCount(_message.Message):
    __slots__ = ("gateway_id", "devices")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: int
    devices: int
    def __init__(self, gateway_id: _Optional[int] = ..., devices: _Optional[int] = ...) -> None: ...

class PreviewStage(_message.Message):
    __slots__ = ("stage_number", "radius_m", "duration_s", "new_recipients", "cumulative_recipients", "new_by_gateway")
    STAGE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    RADIUS_M_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    NEW_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    NEW_BY_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    stage_number: int
    radius_m: float
    duration_s: int
    new_recipients: int
    cumulative_recipients: int
    new_by_gateway: _containers.RepeatedCompositeFieldContainer[GatewayCount]
    def __init__(self, stage_number: _Optional[int] = ..., radius_m: _Optional[float] = ..., duration_s: _Optional[int] = ..., new_recipients: _Optional[int] = ..., cumulative_recipients: _Optional[int] = ..., new_by_gateway: _Optional[_Iterable[_Union[GatewayCount, _Mapping]]] = ...) -> None: ...

class PreviewAlertResponse(_message.Message):
    __slots__ = ("stages", "live_devices")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    LIVE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[PreviewStage]
    live_devices: int
    def __init__(self, stages: _Optional[_Iterable[_Union[PreviewStage, _Mapping]]] = ..., live_devices: _Optional[int] = ...) -> None: ...

class GatewayProgress(_message.Message):
    __slots__ = ("gateway_id", "recipients", "handed_over", "acked", "withdrawn", "expected_handover_at")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    HANDED_OVER_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HANDOVER_AT_FIELD_NUMBER: _ClassVar[int]
    gateway_id: int
    recipients: int
    handed_over: int
    acked: int
    withdrawn: int
    expected_handover_at: _timestamp_pb2.Timestamp
    def __init__(self, gateway_id: _Optional[int] = ..., recipients: _Optional[int] = ..., handed_over: _Optional[int] = ..., acked: _Optional[int] = ..., withdrawn: _Optional[int] = ..., expected_handover_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StageProgress(_message.Message):
    __slots__ = ("stage_number", "radius_m", "duration_s", "started_at", "recipients", "walked_in", "gateways", "swept")
    STAGE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    RADIUS_M_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    WALKED_IN_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    SWEPT_FIELD_NUMBER: _ClassVar[int]
    stage_number: int
    radius_m: float
    duration_s: int
    started_at: _timestamp_pb2.Timestamp
    recipients: int
    walked_in: int
    gateways: _containers.RepeatedCompositeFieldContainer[GatewayProgress]
    swept: bool
    def __init__(self, stage_number: _Optional[int] = ..., radius_m: _Optional[float] = ..., duration_s: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recipients: _Optional[int] = ..., walked_in: _Optional[int] = ..., gateways: _Optional[_Iterable[_Union[GatewayProgress, _Mapping]]] = ..., swept: _Optional[bool] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("alert_id", "status", "centres", "start_time", "schedule_name", "stages", "current_stage", "stage_ends_at", "payload", "version", "created_at", "updated_at", "closed_at", "resolution", "notified_devices", "follow_up_devices")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CENTRES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_ENDS_AT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    NOTIFIED_DEVICES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_DEVICES_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    status: AlertStatus
    centres: _containers.RepeatedCompositeFieldContainer[Centre]
    start_time: _timestamp_pb2.Timestamp
    schedule_name: str
    stages: _containers.RepeatedCompositeFieldContainer[StageProgress]
    current_stage: int
    stage_ends_at: _timestamp_pb2.Timestamp
    payload: AlertPayload
    version: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    closed_at: _timestamp_pb2.Timestamp
    resolution: Resolution
    notified_devices: int
    follow_up_devices: int
    def __init__(self, alert_id: _Optional[str] = ..., status: _Optional[_Union[AlertStatus, str]] = ..., centres: _Optional[_Iterable[_Union[Centre, _Mapping]]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., schedule_name: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageProgress, _Mapping]]] = ..., current_stage: _Optional[int] = ..., stage_ends_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload: _Optional[_Union[AlertPayload, _Mapping]] = ..., version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., closed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolution: _Optional[_Union[Resolution, str]] = ..., notified_devices: _Optional[int] = ..., follow_up_devices: _Optional[int] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("kind", "time", "stage_number", "alert")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STAGE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    kind: AlertEventKind
    time: _timestamp_pb2.Timestamp
    stage_number: int
    alert: Alert
    def __init__(self, kind: _Optional[_Union[AlertEventKind, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stage_number: _Optional[int] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ...) -> None: ...
