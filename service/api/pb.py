"""The generated protobuf and gRPC modules, built on first import when missing or stale.

Import API types from here (``from service.api.pb import types_pb2, service_pb2, service_grpc``), never
from ``service.api._generated`` directly: this module runs :func:`service.api.codegen.ensure_generated`
first, so a fresh clone needs no separate build step.
"""

from service.api import codegen

codegen.ensure_generated()

from service.api._generated.lethe.v1 import types_pb2  # noqa: E402
from service.api._generated.lethe.v1 import unlearning_service_pb2 as service_pb2  # noqa: E402
from service.api._generated.lethe.v1 import unlearning_service_pb2_grpc as service_grpc  # noqa: E402

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["UnlearningService"].full_name  # "lethe.v1.UnlearningService"

__all__ = ["SERVICE_NAME", "service_grpc", "service_pb2", "types_pb2"]
