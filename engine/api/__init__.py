"""The gRPC contract (``grpc/tuanyuan/v1/*.proto``) as generated Python modules.

``make proto`` regenerates them. Messages are in ``alert_pb2``, ``location_pb2`` and
``gateway_pb2``; stubs and servicers in the matching ``*_pb2_grpc`` modules.
"""

from engine.api.tuanyuan.v1 import (
    alert_pb2,
    alert_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    location_pb2,
    location_pb2_grpc,
)

__all__ = [
    "alert_pb2",
    "alert_pb2_grpc",
    "gateway_pb2",
    "gateway_pb2_grpc",
    "location_pb2",
    "location_pb2_grpc",
]
