"""`healthagent` command: serve, chat, mint, emulator, health."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import json_format
from pydantic import ValidationError
from pydantic_settings import SettingsError

from healthagent.client import DEFAULT_TARGET, AsyncHealthAgentClient
from healthagent_service.config import (
    DEFAULT_AGENT_LISTEN,
    DEFAULT_LISTEN,
    MAX_WORKERS,
    Settings,
)
from healthagent_service.listen import join_listen, parse_listen
from healthagent_service.logging import configure_logging
from healthagent_service.memory import limit_malloc_arenas, tune_garbage_collector
from healthagent_service.workers import SUPERVISOR_PID_ENV

HEALTH_SERVICE = "healthagent.v1.HealthAgent"
DEFAULT_EMULATOR_LISTEN = "127.0.0.1:8787"
DEFAULT_EMULATOR_REALTIME_LISTEN = "127.0.0.1:8788"


def _worker_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_WORKERS}, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthagent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service")
    serve.add_argument(
        "--listen", help=f"HOST:PORT (default HEALTHAGENT_LISTEN or {DEFAULT_LISTEN})"
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve gRPC-Web and the seeds' HTTP contract here (HEALTHAGENT_HTTP_LISTEN)",
    )
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="server processes sharing the port, one per core (default HEALTHAGENT_WORKERS or 1)",
    )
    agent = commands.add_parser(
        "agent",
        help="run the agent server: ChatKit on the Agents SDK (needs the 'agent' extra)",
    )
    agent.add_argument(
        "--listen", help=f"HOST:PORT (default HEALTHAGENT_AGENT_LISTEN or {DEFAULT_AGENT_LISTEN})"
    )
    chat = commands.add_parser("chat", help="send one message and print the reply as it streams")
    chat.add_argument("--target", default=DEFAULT_TARGET)
    chat.add_argument(
        "--token",
        default=os.environ.get("HEALTHAGENT_TOKEN"),
        help="JWT or API key to send (default: $HEALTHAGENT_TOKEN)",
    )
    chat.add_argument("--user", default="cli-user")
    chat.add_argument("--conversation", help="conversation id to continue")
    chat.add_argument("--events", action="store_true", help="print every event as JSON")
    chat.add_argument("text")
    mint = commands.add_parser("mint", help="mint a session and print it as JSON")
    mint.add_argument("--target", default=DEFAULT_TARGET)
    mint.add_argument(
        "--token",
        default=os.environ.get("HEALTHAGENT_TOKEN"),
        help="JWT or API key to send (default: $HEALTHAGENT_TOKEN)",
    )
    mint.add_argument("--user", required=True)
    mint.add_argument("--device-id", default="")
    emulator = commands.add_parser("emulator", help="run the ChatKit emulator alone")
    emulator.add_argument(
        "--listen",
        default=DEFAULT_EMULATOR_LISTEN,
        help="HOST:PORT for HTTP (ChatKit, client secrets)",
    )
    emulator.add_argument(
        "--realtime-listen",
        default=DEFAULT_EMULATOR_REALTIME_LISTEN,
        help="HOST:PORT for the Realtime WebSocket",
    )
    emulator.add_argument("--api-key", help="the key it accepts (default: printed at start)")
    emulator.add_argument(
        "--workflow",
        action="append",
        default=[],
        help="a workflow id it knows (repeatable; wf_emulator always)",
    )
    health = commands.add_parser(
        "health",
        help="ask grpc.health.v1 of a running service; exit 0 only when it says SERVING",
    )
    health.add_argument(
        "--target",
        help=f"HOST:PORT (default: 127.0.0.1 on HEALTHAGENT_LISTEN's port, or {DEFAULT_LISTEN})",
    )
    health.add_argument(
        "--service",
        default=HEALTH_SERVICE,
        help=f"the service to ask about ('' for the whole server; default {HEALTH_SERVICE})",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        help="use TLS (default: when HEALTHAGENT_TLS_CERT_FILE is set)",
    )
    health.add_argument("--ca-file", help="PEM roots to verify the server (default: system's)")
    health.add_argument("--server-name", help="name to verify in the server's certificate")
    health.add_argument("--cert-file", help="client certificate chain (PEM), for mutual TLS")
    health.add_argument("--key-file", help="client private key (PEM), for mutual TLS")
    return parser


def _print_error(error: grpc.aio.AioRpcError) -> int:
    print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


async def _chat(options: argparse.Namespace) -> int:
    async with AsyncHealthAgentClient(options.target, token=options.token) as client:
        try:
            async for event in client.chat(
                options.text, user=options.user, conversation_id=options.conversation
            ):
                kind = event.WhichOneof("event")
                if options.events:
                    print(json_format.MessageToJson(event, indent=None))
                elif kind == "session":
                    print(f"[conversation {event.session.conversation_id}]", file=sys.stderr)
                elif kind == "chunk":
                    print(event.chunk.text, end="", flush=True)
                elif kind == "tool_call":
                    print(
                        f"\n[tool call {event.tool_call.name} {event.tool_call.arguments_json}"
                        f" id={event.tool_call.call_id}]",
                        file=sys.stderr,
                    )
                elif kind == "notice":
                    print(f"[notice] {event.notice.message}", file=sys.stderr)
                elif kind == "response_done" and not options.events:
                    print()
        except grpc.aio.AioRpcError as error:
            return _print_error(error)
    return 0


async def _mint(options: argparse.Namespace) -> int:
    async with AsyncHealthAgentClient(options.target, token=options.token) as client:
        try:
            response = await client.mint_session(options.user, device_id=options.device_id)
        except grpc.aio.AioRpcError as error:
            return _print_error(error)
    print(json_format.MessageToJson(response))
    return 0


async def _emulator(options: argparse.Namespace, settings: Settings) -> int:
    from healthagent_service.emulator.embedded import start_emulator

    api_key = options.api_key or f"sk-emulator-{secrets.token_urlsafe(12)}"
    host, port = parse_listen(options.listen)
    realtime_host, realtime_port = parse_listen(options.realtime_listen)
    if realtime_host != host:
        raise ValueError("--listen and --realtime-listen must use the same host")
    emulator = await start_emulator(
        settings,
        api_key,
        host=host,
        port=port,
        realtime_port=realtime_port,
        extra_workflows=options.workflow,
    )
    banner = {
        "OPENAI_BASE_URL": emulator.base_url,
        "OPENAI_REALTIME_URL": emulator.realtime_url,
        "OPENAI_API_KEY": api_key if not options.api_key else "(as given)",
        "workflows": sorted(emulator.chatkit.config.workflows),
    }
    print(json.dumps(banner), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.close()
    return 0


def _health_target(listen: str) -> str:
    """Where `serve` listens on this host: HEALTHAGENT_LISTEN's port, on loopback when it
    listens on every address."""
    host, port = parse_listen(listen)
    if host in ("", "0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    return join_listen(host, port)


def _health(options: argparse.Namespace, settings: Settings) -> int:
    """`healthagent health`: 0 when the service answers SERVING, else 1 (a container's or a
    Kubernetes exec probe's health check; no extra binary needed)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = options.target or _health_target(settings.server.listen)
    tls = options.tls if options.tls is not None else settings.tls.cert_file is not None
    if tls:

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        credentials = grpc.ssl_channel_credentials(
            read(options.ca_file), read(options.key_file), read(options.cert_file)
        )
        names = [("grpc.ssl_target_name_override", options.server_name)]
        channel = grpc.secure_channel(target, credentials, names if options.server_name else [])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(
                health_pb2.HealthCheckRequest(service=options.service), timeout=options.timeout
            )
        except grpc.RpcError as error:
            problem = (
                f"{error.code().name}: {error.details()}"
                if isinstance(error, grpc.Call)
                else str(error)
            )
            print(f"healthagent health: {target}: {problem}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"healthagent health: {target}: {status}", file=sys.stderr)
        return 1
    print(status)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `healthagent` console script."""
    options = _parser().parse_args(argv)
    try:
        settings = Settings.from_environment()
    except ValidationError as error:
        for problem in error.errors():
            setting = ".".join(str(part) for part in problem["loc"])
            print(f"healthagent: invalid setting {setting}: {problem['msg']}", file=sys.stderr)
        return 2
    except SettingsError as error:  # a JSON setting that is not JSON; the error names it
        print(f"healthagent: invalid setting {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log.format, settings.log.level)
    needs_agent = options.command == "agent" or (
        options.command == "serve" and settings.upstream.supervises_agent
    )
    if needs_agent:
        from healthagent_service.agent_process import missing_agent_extra

        missing = missing_agent_extra()
        if missing is not None:
            mode = "" if options.command == "agent" else " (HEALTHAGENT_UPSTREAM=agent)"
            print(f"healthagent: {options.command}{mode}: {missing}", file=sys.stderr)
            return 2
    try:
        if options.command == "agent":
            from healthagent_service.agent.app import run_agent_server

            if os.environ.get(SUPERVISOR_PID_ENV):  # `serve`'s child: end with it
                from healthagent_service.workers import follow_supervisor

                follow_supervisor()

            asyncio.run(run_agent_server(settings, options.listen))
            return 0
        if options.command == "serve":
            if options.workers is not None:
                settings.server.workers = options.workers
            if options.http is not None:
                settings.http.listen = options.http
            if settings.server.workers > 1 and settings.server.worker_index is None:
                from healthagent_service.workers import run_workers

                return run_workers(settings, options.listen)
            if settings.server.worker_index is not None:
                from healthagent_service.workers import follow_supervisor

                follow_supervisor()
                structlog.contextvars.bind_contextvars(worker=settings.server.worker_index)
            limit_malloc_arenas(settings.tuning.malloc_arenas)  # before gRPC starts its threads
            from healthagent_service.server import serve

            tune_garbage_collector(settings.tuning.gc_gen0_threshold)
            asyncio.run(serve(settings, options.listen))
            return 0
        if options.command == "chat":
            return asyncio.run(_chat(options))
        if options.command == "mint":
            return asyncio.run(_mint(options))
        if options.command == "health":
            return _health(options, settings)
        return asyncio.run(_emulator(options, settings))
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as error:
        # a bad listen address, a port already in use, an emulator port taken
        structlog.get_logger().error("cannot start", error=str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
