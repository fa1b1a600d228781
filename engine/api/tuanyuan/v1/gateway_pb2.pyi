import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from engine.api.tuanyuan.v1 import alert_pb2 as _alert_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_KIND_UNSPECIFIED: _ClassVar[MessageKind]
    MESSAGE_KIND_ALERT: _ClassVar[MessageKind]
    MESSAGE_KIND_RECIPIENTS: _ClassVar[MessageKind]
    MESSAGE_KIND_CLOSED: _ClassVar[MessageKind]
    MESSAGE_KIND_FOLLOW_UP: _ClassVar[MessageKind]
MESSAGE_KIND_UNSPECIFIED: MessageKind
MESSAGE_KIND_ALERT: MessageKind
MESSAGE_KIND_RECIPIENTS: MessageKind
MESSAGE_KIND_CLOSED: MessageKind
MESSAGE_KIND_FOLLOW_UP: MessageKind

class GatewayUpstream(_message.Message):
    __slots__ = ("hello", "ack")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("gateway_id", "max_devices_per_second", "max_unacked_messages")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: int
    max_devices_per_second: float
    max_unacked_messages: int
    def __init__(self, gateway_id: _Optional[int] = ..., max_devices_per_second: _Optional[float] = ..., max_unacked_messages: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class GatewayMessage(_message.Message):
    __slots__ = ("sequence", "kind", "alert_id", "payload", "payload_version", "stage_number", "status", "resolution", "follow_up", "queued_at", "device_ids")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_UP_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: MessageKind
    alert_id: str
    payload: _alert_pb2.AlertPayload
    payload_version: int
    stage_number: int
    status: _alert_pb2.AlertStatus
    resolution: _alert_pb2.Resolution
    follow_up: _containers.RepeatedCompositeFieldContainer[_alert_pb2.LocalizedNotice]
    queued_at: _timestamp_pb2.Timestamp
    device_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., alert_id: _Optional[str] = ..., payload: _Optional[_Union[_alert_pb2.AlertPayload, _Mapping]] = ..., payload_version: _Optional[int] = ..., stage_number: _Optional[int] = ..., status: _Optional[_Union[_alert_pb2.AlertStatus, str]] = ..., resolution: _Optional[_Union[_alert_pb2.Resolution, str]] = ..., follow_up: _Optional[_Iterable[_Union[_alert_pb2.LocalizedNotice, _Mapping]]] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., device_ids: _Optional[_Iterable[int]] = ...) -> None: ...
