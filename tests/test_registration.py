"""Services are registered through their generic handlers only (`server.GenericHandlersOnly`):
the generated registrations' registered-method copies cost every call an `asyncio.wait` over a
pending request per method in grpcio 1.85's asyncio server. What the real server then answers
(every HealthAgent method, health, reflection) the end-to-end and grpcurl tests call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.server import GenericHandlersOnly


class _Recorder:
    """Stands in for the grpc.aio server: what a registration hands it."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered.append(service)


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


def _register_healthagent(server: Any) -> None:
    pb_grpc.add_HealthAgentServicer_to_server(pb_grpc.HealthAgentServicer(), server)


def _register_health(server: Any) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)


def _register_reflection(server: Any) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection.aio.ReflectionServicer((reflection.SERVICE_NAME,)), server
    )


@pytest.mark.parametrize(
    ("register", "service"),
    [
        (_register_healthagent, pb.DESCRIPTOR.services_by_name["HealthAgent"]),
        (_register_health, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        (
            _register_reflection,
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        ),
    ],
)
def test_every_method_is_served_by_the_generic_handler_alone(
    register: Callable[[Any], None], service: Any
) -> None:
    plain = _Recorder()
    register(plain)  # what the generated code does with a real server: both kinds
    assert plain.registered == [service.full_name] and len(plain.generic) == 1

    recorder = _Recorder()
    register(GenericHandlersOnly([cast(grpc.aio.Server, recorder)]))
    assert recorder.registered == []
    [generic] = recorder.generic
    for method in service.methods:
        details = _Details(f"/{service.full_name}/{method.name}", ())
        assert generic.service(details) is not None, method.name  # type: ignore[arg-type]
    assert generic.service(_Details(f"/{service.full_name}/Nope", ())) is None  # type: ignore[arg-type]
