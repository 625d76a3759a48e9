"""Builds and runs the grpc.aio server: servicer, health, reflection, keepalive, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import httpx
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.agent_process import AgentProcess, missing_agent_extra
from healthagent_service.api.decoding import TolerantRegistration
from healthagent_service.api.servicer import HealthAgentServicer
from healthagent_service.config import EMULATOR_WORKFLOW_ID, Settings, UpstreamKind
from healthagent_service.dependencies import Check, watch_dependencies
from healthagent_service.domain.events import ChatUpstream, MintedSession, SessionOptions
from healthagent_service.emulator.embedded import Emulator, start_emulator
from healthagent_service.history.backends import (
    OPEN_FAILURES,
    describe_store,
    store_from_settings,
)
from healthagent_service.history.recorder import TurnRecorder
from healthagent_service.history.replay import transcript_loader
from healthagent_service.history.store import ConversationStore
from healthagent_service.listen import (
    PortReservation,
    is_loopback,
    join_listen,
    parse_listen,
    reserve_port,
)
from healthagent_service.memory import trim_memory_when_quiet
from healthagent_service.metrics import Metrics
from healthagent_service.revocation import SessionRevoker
from healthagent_service.security.auth import ApiKey, Authenticator, JwksCache
from healthagent_service.security.limits import LimitConfig, Limiter, MemoryLimiter, RedisLimiter
from healthagent_service.security.redaction import REDACTOR
from healthagent_service.upstream.chatkit import (
    AgentTokenConfig,
    ChatKitConfig,
    ChatKitUpstream,
)
from healthagent_service.upstream.http_clients import ShardedHttpClient
from healthagent_service.upstream.realtime import RealtimeUpstream
from healthagent_service.upstream.realtime_config import RealtimeConfig

if TYPE_CHECKING:  # uvicorn and starlette load only when the listener is on
    from healthagent_service.web.listener import HttpListener

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HealthAgent"].full_name
_REQUEST_CLASSES = {
    method.name: getattr(pb, method.input_type.name)
    for method in pb.DESCRIPTOR.services_by_name["HealthAgent"].methods
}
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_CONNECTION_AGE_GRACE_MS = 10 * 60_000

# Mobile clients sleep, switch networks and sit behind NATs: let them ping as often as every 10 s,
# even with no call active, and never answer "too many pings" (no strike limit); ping every
# connection ourselves each 60 s and drop one that does not answer within 20 s; close one that
# has had no call for 30 minutes.
GRPC_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_connection_idle_ms", 30 * 60_000),
    # A second server on a taken port must fail, not silently share it (workers share theirs
    # on purpose: see `server_options`).
    ("grpc.so_reuseport", 0),
    # Service callers multiplex many streams on one connection; the HTTP/2 default of 100
    # would queue the rest in the client.
    ("grpc.max_concurrent_streams", 10_000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC refuses metadata over the soft limit only at random, more often nearer the hard
    # one (20 KiB unless set): both at the documented size, so that it holds exactly
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments for these settings."""
    options = dict(GRPC_SERVER_OPTIONS)
    # Requests are small: refuse big ones before they are parsed.
    options["grpc.max_receive_message_length"] = max(
        256 * 1024, 4 * settings.limits.max_message_bytes
    )
    if settings.server.worker_index is not None or settings.server.grpc_servers > 1:
        # several servers, in this process or in the workers of `serve --workers N`, on one
        # port: the kernel spreads connections over their sockets (the port is reserved, so
        # nothing else can join them: `listen.reserve_port`)
        options["grpc.so_reuseport"] = 1
    if settings.server.max_connection_age_seconds > 0:
        # an old connection is told to go away (GOAWAY) and takes no new calls; the calls on it
        # get MAX_CONNECTION_AGE_GRACE_MS to finish, more than any turn lasts
        options["grpc.max_connection_age_ms"] = int(
            settings.server.max_connection_age_seconds * 1000
        )
        options["grpc.max_connection_age_grace_ms"] = MAX_CONNECTION_AGE_GRACE_MS
    return list(options.items())


class GenericHandlersOnly:
    """The servers, as a generated `add_*Servicer_to_server` sees one: each gets the service's
    generic handler, and the copy of the same handlers as registered methods is dropped.

    grpcio's asyncio server (1.85) keeps a pending request per registered method and, for every
    call it accepts, waits on all of them with `asyncio.wait` and requests the next one
    (grpc/grpc#43092; the fix, grpc/grpc#43461, is not released). With HealthAgent's, health's
    and reflection's methods registered, that was about a tenth of a MintSession's instructions
    (docs/decisions/0003-generic-handlers.md); the generic handler serves the same methods, found
    by one dict lookup.
    """

    def __init__(self, servers: Sequence[grpc.aio.Server]) -> None:
        self._servers = servers

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        for server in self._servers:
            server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Dropped: the generic handler added beside them serves these methods."""


@dataclass(kw_only=True)
class RunningServer:
    """The started servers (sharing one port) and what they own."""

    servers: list[grpc.aio.Server]
    port: int
    # holds the port while several servers share it (`listen.reserve_port`)
    port_reservation: PortReservation | None
    health: health.aio.HealthServicer
    chatkit: ChatKitUpstream
    realtime: RealtimeUpstream
    store: ConversationStore
    recorder: TurnRecorder
    limiter: Limiter
    servicer: HealthAgentServicer
    metrics_port: int
    trimmer: asyncio.Task[None]
    http: ShardedHttpClient
    emulator: Emulator | None
    upstream_description: str
    # the supervised agent server, in agent mode without HEALTHAGENT_CHATKIT_URL
    agent: AgentProcess | None = None
    # the HTTP listener (gRPC-Web, the seeds' contract), when HEALTHAGENT_HTTP_LISTEN is set
    web: HttpListener | None = None
    # sets health from Redis and PostgreSQL being reachable (None when neither is used)
    dependency_watch: asyncio.Task[None] | None = None
    # how to release all of the above, in the reverse order of taking (`create_server`)
    resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def stop(self, grace: float | None, drain: float = 0.0) -> None:
        """Flip health to NOT_SERVING; keep serving for `drain` s so load balancers see it;
        then refuse new calls, let in-flight ones finish for `grace` s, and release all."""
        await self.health.enter_graceful_shutdown()
        self.trimmer.cancel()
        if self.dependency_watch is not None:
            self.dependency_watch.cancel()
        if drain > 0:
            await asyncio.sleep(drain)
        stopping = asyncio.gather(
            *(server.stop(grace) for server in self.servers),
            *([self.web.stop(grace or 0.0)] if self.web is not None else []),
        )
        if grace:
            await asyncio.wait([stopping], timeout=max(0.0, grace - min(0.25, grace / 2)))
        self.servicer.end_chats_for_shutdown()
        await stopping
        if self.port_reservation is not None:  # nothing listens on the port any more
            self.port_reservation.close()
        # Handlers cancelled at the end of the grace period are still unwinding (recording
        # their turns, closing upstream requests): let them finish before closing what they use.
        await self.servicer.wait_for_chats(timeout=5.0)
        await self.recorder.drain()
        # then the rest, last taken first: the limits, the upstreams, the agent child process,
        # the store, the HTTP clients, the emulator
        await self.resources.aclose()


def _auth_header(settings: Settings) -> tuple[str, str] | None:
    if settings.upstream.chatkit_auth_header is None:
        return None
    name, _, value = settings.upstream.chatkit_auth_header.get_secret_value().partition(":")
    return name.strip(), value.strip()


def _agent_chatkit_config(settings: Settings, agent: AgentProcess | None) -> ChatKitConfig:
    """Agent mode: the supervised child, or the agent server at HEALTHAGENT_CHATKIT_URL."""
    url: str | None
    auth: tuple[str, str] | None
    secret: str | None
    if agent is not None:
        url, auth, secret = (
            agent.endpoint.url,
            agent.endpoint.auth_header,
            agent.endpoint.token_secret,
        )
    else:
        url, auth = settings.upstream.chatkit_url, _auth_header(settings)
        secret = (
            settings.agent.token_secret.get_secret_value() if settings.agent.token_secret else None
        )
    return ChatKitConfig(
        base_url=settings.upstream.openai_base_url,
        api_key=None,
        workflow_id=None,
        self_hosted_url=url,
        self_hosted_auth=auth,
        agent_tokens=(
            AgentTokenConfig(
                secret, settings.agent.token_audience, settings.sessions.ttl_seconds or 600
            )
            if secret
            else None
        ),
        retry_after_seconds=settings.upstream.retry_after_seconds,
    )


def _chatkit_config(
    settings: Settings, emulator: Emulator | None, api_key: str | None
) -> ChatKitConfig:
    if emulator is not None:
        return ChatKitConfig(
            base_url=emulator.base_url,
            api_key=api_key,
            workflow_id=settings.upstream.openai_workflow_id or EMULATOR_WORKFLOW_ID,
            default_ttl_seconds=settings.sessions.ttl_seconds,
            retry_after_seconds=settings.upstream.retry_after_seconds,
        )
    return ChatKitConfig(
        base_url=settings.upstream.openai_base_url,
        api_key=api_key,
        workflow_id=settings.upstream.openai_workflow_id,
        self_hosted_url=settings.upstream.chatkit_url if settings.upstream.self_hosted else None,
        self_hosted_auth=_auth_header(settings),
        default_ttl_seconds=settings.sessions.ttl_seconds,
        retry_after_seconds=settings.upstream.retry_after_seconds,
    )


def _realtime_config(
    settings: Settings, emulator: Emulator | None, api_key: str | None
) -> RealtimeConfig:
    return RealtimeConfig(
        base_url=emulator.base_url if emulator else settings.upstream.openai_base_url,
        websocket_url=emulator.realtime_url if emulator else settings.upstream.realtime_url,
        api_key=api_key,
        model=settings.realtime.model,
        instructions=settings.realtime.instructions,
        tools=tuple(settings.realtime.tools),
        secret_ttl_seconds=settings.realtime.secret_ttl_seconds,
        refresh_fraction=settings.sessions.refresh_fraction,
        warm_sockets=settings.realtime.warm_sockets,
        warm_socket_max_idle_seconds=settings.realtime.warm_max_idle_seconds,
        conversation_idle_seconds=settings.realtime.idle_seconds,
        max_conversations=settings.realtime.max_conversations,
        socket_max_age_seconds=settings.realtime.session_max_seconds,
        retry_after_seconds=settings.upstream.retry_after_seconds,
    )


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse to serve anything but loopback without caller authentication."""
    if settings.auth.configured or is_loopback(host):
        return
    raise ValueError(
        f"refusing to listen on {host} without caller authentication: set "
        "HEALTHAGENT_AUTH_JWT_SECRET, HEALTHAGENT_AUTH_JWKS_URL or HEALTHAGENT_API_KEYS, or "
        "listen on 127.0.0.1"
    )


def _authenticator(settings: Settings, http: httpx.AsyncClient) -> Authenticator:
    jwks = (
        JwksCache(
            settings.auth.jwks_url,
            http,
            settings.auth.jwks_cache_seconds,
            settings.auth.jwks_min_refresh_seconds,
        )
        if settings.auth.jwks_url
        else None
    )
    return Authenticator(
        jwt_secret=(
            settings.auth.jwt_secret.get_secret_value() if settings.auth.jwt_secret else None
        ),
        jwks=jwks,
        issuer=settings.auth.jwt_issuer,
        audience=settings.auth.jwt_audience,
        api_keys=[ApiKey(k.principal, k.sha256) for k in settings.auth.api_keys],
    )


def _limiter(settings: Settings) -> Limiter:
    config = LimitConfig(
        settings.limits.rate_limit_per_minute,
        settings.limits.rate_limit_burst,
        settings.limits.max_streams_per_user,
    )
    if settings.limits.redis_url is not None:
        return RedisLimiter(
            config,
            settings.limits.redis_url.get_secret_value(),
            settings.limits.redis_prefix,
            stream_lease_seconds=settings.limits.stream_slot_lease_seconds,
        )
    return MemoryLimiter(config)


def _add_bridge_port(server: grpc.aio.Server) -> str:
    """A port for the HTTP listener's forwarded calls on `server`; the channel target for it.

    On Linux an abstract Unix socket, named at random: no file to clean up, reachable only from
    this network namespace (as a loopback port is), and cheaper than loopback TCP for every
    forwarded chunk (docs/decisions/0008-http-listener-loopback-hop.md). Elsewhere a loopback
    TCP port.
    """
    if sys.platform == "linux":
        address = f"unix-abstract:healthagent-bridge-{os.getpid()}-{secrets.token_hex(8)}"
        server.add_insecure_port(address)
        return address
    return f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"


def _web_address(settings: Settings) -> tuple[str, int] | None:
    """Where the HTTP listener listens, checked like the gRPC port; None when it is off."""
    if not settings.http.listen:
        return None
    host, port = parse_listen(settings.http.listen)
    check_exposure(settings, host)
    if settings.tls.require_client_cert:
        raise ValueError(
            "HEALTHAGENT_HTTP_LISTEN cannot check client certificates: it is not allowed with "
            "HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT"
        )
    return host, port


def _tls_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    wants_mtls = settings.tls.client_ca_file is not None or settings.tls.require_client_cert
    if settings.tls.cert_file is None and settings.tls.key_file is None:
        if wants_mtls:
            raise ValueError(
                "mutual TLS needs HEALTHAGENT_TLS_CERT_FILE and HEALTHAGENT_TLS_KEY_FILE too"
            )
        return None
    if settings.tls.cert_file is None or settings.tls.key_file is None:
        raise ValueError("set both HEALTHAGENT_TLS_CERT_FILE and HEALTHAGENT_TLS_KEY_FILE")
    if settings.tls.require_client_cert and settings.tls.client_ca_file is None:
        raise ValueError("HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT needs HEALTHAGENT_TLS_CLIENT_CA_FILE")
    pair = (
        _read(settings.tls.key_file, "HEALTHAGENT_TLS_KEY_FILE"),
        _read(settings.tls.cert_file, "HEALTHAGENT_TLS_CERT_FILE"),
    )
    client_ca = (
        _read(settings.tls.client_ca_file, "HEALTHAGENT_TLS_CLIENT_CA_FILE")
        if settings.tls.client_ca_file is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=settings.tls.require_client_cert
    )


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {setting} ({path}): {exc.strerror}") from None


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def describe_upstream(settings: Settings) -> str:
    """One line naming what Chat talks to; says plainly when replies are simulated."""
    protocol = (
        "Realtime" if settings.upstream.effective_kind is UpstreamKind.REALTIME else "ChatKit"
    )
    if settings.upstream.emulated:
        return (
            f"EMULATOR ({protocol} protocol) - replies are simulated by the built-in "
            "emulator, not OpenAI"
        )
    if settings.upstream.supervises_agent:
        return "the agent server (`healthagent agent`, a supervised child process)"
    if settings.upstream.effective_kind is UpstreamKind.AGENT:
        return f"the agent server at {settings.upstream.chatkit_url}"
    if settings.upstream.self_hosted:
        return f"self-hosted ChatKit server at {settings.upstream.chatkit_url}"
    if protocol == "Realtime":
        return (
            f"OpenAI Realtime API at {settings.upstream.realtime_url} "
            f"(model {settings.realtime.model})"
        )
    upstream = settings.upstream
    return f"hosted ChatKit at {upstream.openai_base_url} (workflow {upstream.openai_workflow_id})"


async def create_server(settings: Settings, listen: str | None = None) -> RunningServer:
    """Build, bind and start the server; `listen` may use port 0 (see `RunningServer.port`).

    Each step registers how to release what it took (sockets, connections, the agent child
    process, the HTTP listener) on one exit stack: a failed step releases what the steps
    before it took, and `RunningServer.stop` releases it all once it has stopped serving."""
    REDACTOR.add(settings.secret_values())
    async with contextlib.AsyncExitStack() as resources:
        running = await _start(settings, listen, resources)
        running.resources = resources.pop_all()  # from here on, `stop` releases them
        return running


async def _start(
    settings: Settings, listen: str | None, resources: contextlib.AsyncExitStack
) -> RunningServer:
    api_key = (
        settings.upstream.openai_api_key.get_secret_value()
        if settings.upstream.openai_api_key
        else None
    )
    emulator: Emulator | None = None
    if settings.upstream.emulated:
        # The embedded emulator is a real HTTP and WebSocket server on loopback, so emulator
        # mode runs exactly the code path that OpenAI does. Its key lives only in this process.
        api_key = f"sk-emulator-{secrets.token_urlsafe(16)}"
        REDACTOR.add([api_key])
        emulator = await start_emulator(settings, api_key)
        resources.push_async_callback(emulator.close)
    http = ShardedHttpClient(
        timeout=httpx.Timeout(
            connect=settings.upstream.connect_timeout_seconds,
            read=settings.upstream.read_timeout_seconds,
            write=30.0,
            pool=30.0,
        ),
        max_connections=settings.upstream.max_connections,
        max_buffered_bytes=settings.upstream.buffer_bytes,
    )
    resources.push_async_callback(http.aclose)
    store = await _open_store(settings)
    resources.push_async_callback(store.close)
    agent = await _start_agent(settings, resources) if settings.upstream.supervises_agent else None

    chatkit = ChatKitUpstream(
        _agent_chatkit_config(settings, agent)
        if settings.upstream.effective_kind is UpstreamKind.AGENT
        else _chatkit_config(settings, emulator, api_key),
        http,
        pool_size=settings.sessions.pool_size,
        pool_bytes=settings.sessions.pool_bytes,
        refresh_fraction=settings.sessions.refresh_fraction,
    )

    async def record_minted(options: SessionOptions, session: MintedSession) -> None:
        await store.record_session(session.id, options.user, "chatkit", session.expires_at)

    chatkit.pool.on_minted = record_minted
    resources.push_async_callback(chatkit.pool.close)
    realtime = RealtimeUpstream(
        _realtime_config(settings, emulator, api_key),
        http.first,
        transcripts=transcript_loader(store),
    )
    resources.push_async_callback(realtime.close)
    uses_realtime = settings.upstream.effective_kind is UpstreamKind.REALTIME
    chat: ChatUpstream = realtime if uses_realtime else chatkit
    recorder = TurnRecorder(store, "realtime" if uses_realtime else "chatkit")
    revoker = SessionRevoker(store, chatkit, realtime)
    limiter = _limiter(settings)
    resources.push_async_callback(limiter.close)
    metrics = Metrics()
    metrics.watch_pools({"chatkit": chatkit.pool, "realtime_secrets": realtime.secrets})
    servicer = HealthAgentServicer(
        metrics=metrics,
        upstream_name="realtime" if uses_realtime else "chatkit",
        authenticator=_authenticator(settings, http.first),
        limiter=limiter,
        max_message_bytes=settings.limits.max_message_bytes,
        client_stall_seconds=settings.limits.client_stall_seconds,
        chat=chat,
        chatkit=chatkit,
        realtime=realtime,
        store=store,
        recorder=recorder,
        revoker=revoker,
    )
    servers = [
        grpc.aio.server(options=server_options(settings))
        for _ in range(settings.server.grpc_servers)
    ]
    started: list[grpc.aio.Server] = []
    resources.push_async_callback(_stop_servers, servers, started)
    health_servicer = _register(servicer, servers)

    host, port = parse_listen(listen or settings.server.listen)
    check_exposure(settings, host)
    web_address = _web_address(settings)
    # the HTTP listener's calls come in on a private socket of their own: plain, whatever
    # TLS the public port has, and always this process's
    bridge_target = _add_bridge_port(servers[0]) if web_address else ""
    if isinstance(limiter, RedisLimiter):
        try:
            await limiter.ping()
        except Exception as exc:
            raise ValueError(
                f"cannot reach Redis for the per-user limits ({type(exc).__name__}: {exc}); "
                "check HEALTHAGENT_REDIS_URL"
            ) from None
    await revoker.start()
    reservation: PortReservation | None = None
    if len(servers) > 1 and settings.server.worker_index is None:  # workers': the supervisor's
        reservation = reserve_port(host, port)
        resources.callback(reservation.close)
        port = reservation.port
    address = join_listen(host, port)
    credentials = _tls_credentials(settings)
    bound, *_ = [_bind(server, address, credentials) for server in servers]
    for server in servers:
        await server.start()
        started.append(server)
    web: HttpListener | None = None
    if web_address is not None:
        from healthagent_service.web.listener import start_http_listener

        web = await start_http_listener(
            *web_address,
            grpc_target=bridge_target,
            cors_origins=settings.http.allowed_origins,
            max_message_bytes=settings.limits.max_message_bytes,
            demo=settings.http.demo,
            open_access=not settings.auth.configured,
            share_port=settings.server.worker_index is not None,
            grace_seconds=settings.server.shutdown_grace_seconds,
            heartbeat_seconds=settings.http.heartbeat_seconds,
        )
        resources.push_async_callback(web.stop, 0.0)
    metrics_port = _serve_metrics(settings, metrics)
    if metrics_port:
        # its server thread polls for shutdown every half second: not on the event loop
        resources.push_async_callback(asyncio.to_thread, metrics.close)

    if chat is realtime:
        realtime.start()
    trimmer = asyncio.create_task(trim_memory_when_quiet(lambda: servicer.active_chats))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        servers=servers,
        port=bound,
        port_reservation=reservation,
        health=health_servicer,
        chatkit=chatkit,
        realtime=realtime,
        store=store,
        recorder=recorder,
        limiter=limiter,
        servicer=servicer,
        metrics_port=metrics_port,
        trimmer=trimmer,
        http=http,
        emulator=emulator,
        upstream_description=describe_upstream(settings),
        agent=agent,
        web=web,
        dependency_watch=_watch_dependencies(settings, health_servicer, limiter, store),
    )


async def _open_store(settings: Settings) -> ConversationStore:
    store = store_from_settings(settings)
    try:
        await store.open()
    except OPEN_FAILURES as exc:  # unreachable, refused, not writable: say what to fix
        setting = (
            "HEALTHAGENT_DATABASE_URL"
            if settings.database.url is not None
            else "HEALTHAGENT_DATA_DIR"
        )
        raise ValueError(
            f"cannot open the conversation history, {describe_store(settings)} "
            f"({type(exc).__name__}: {exc}); check {setting}"
        ) from None
    return store


async def _start_agent(settings: Settings, resources: contextlib.AsyncExitStack) -> AgentProcess:
    """The supervised agent server, started (and stopped with `resources`)."""
    problem = missing_agent_extra()
    if problem is not None:
        raise ValueError(problem)
    agent = AgentProcess(settings)
    REDACTOR.add([agent.endpoint.auth_header[1], agent.endpoint.token_secret])
    resources.push_async_callback(agent.stop)  # also when starting it fails half-way
    await agent.start()
    return agent


def _register(
    servicer: HealthAgentServicer, servers: list[grpc.aio.Server]
) -> health.aio.HealthServicer:
    """Add HealthAgent, health and reflection to `servers`; return the health servicer."""
    # the generated registrations take any object with the server's two methods
    handlers = cast(grpc.aio.Server, GenericHandlersOnly(servers))
    pb_grpc.add_HealthAgentServicer_to_server(
        servicer, cast(grpc.aio.Server, TolerantRegistration(handlers, _REQUEST_CLASSES))
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handlers)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection.aio.ReflectionServicer(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        handlers,
    )
    return health_servicer


async def _stop_servers(
    servers: Sequence[grpc.aio.Server], started: Sequence[grpc.aio.Server]
) -> None:
    """Stop `servers` at once (a no-op for those `RunningServer.stop` stopped already).

    grpcio releases the ports added to a server only when a started server shuts down: one
    that never started keeps them until the process exits. Those are started first, then
    stopped with the rest, so that a start-up that failed after binding frees its ports."""
    for server in servers:
        if server not in started:
            with contextlib.suppress(Exception):  # what failed may be this very start
                await server.start()
    await asyncio.gather(*(server.stop(None) for server in servers))


def _serve_metrics(settings: Settings, metrics: Metrics) -> int:
    """Serve /metrics where HEALTHAGENT_METRICS_LISTEN says; its port, 0 when it is off."""
    return metrics.serve_at(
        settings.server.metrics_listen,
        settings.server.worker_index,
        lambda host: check_exposure(settings, host),
    )


def _watch_dependencies(
    settings: Settings,
    health_servicer: health.aio.HealthServicer,
    limiter: Limiter,
    store: ConversationStore,
) -> asyncio.Task[None] | None:
    """Readiness that follows Redis and PostgreSQL; None when neither is used."""
    checks: list[Check] = []
    if isinstance(limiter, RedisLimiter):
        checks.append(("redis", limiter.ping))
    if settings.database.url is not None:
        checks.append(("postgresql", store.ping))
    if not checks:
        return None
    # the service's name only: readiness follows Redis and PostgreSQL, while "" (liveness)
    # stays SERVING, or an outage would restart every replica at once
    return asyncio.create_task(watch_dependencies(health_servicer, (SERVICE_NAME,), checks))


async def serve(settings: Settings, listen: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    upstream_kind = settings.upstream.effective_kind
    description = describe_upstream(settings)
    if settings.upstream.emulated:
        hint = (
            "set OPENAI_API_KEY"
            if upstream_kind is UpstreamKind.REALTIME
            # hosted workflows are retired: a key alone runs the agent server on OpenAI
            else "set OPENAI_API_KEY (with the 'agent' extra installed)"
        )
        log.warning(
            f"upstream: {description}; {hint} to use OpenAI",
            upstream="emulator",
            protocol=upstream_kind.value,
        )
    else:
        log.info(
            f"upstream: {description}",
            upstream=upstream_kind.value,
            self_hosted=settings.upstream.self_hosted,
        )
    if not settings.auth.configured:
        log.warning(
            "AUTHENTICATION IS OFF: any process that reaches the port may act as any "
            "user; this is allowed on loopback only. Set HEALTHAGENT_AUTH_JWT_SECRET, "
            "HEALTHAGENT_AUTH_JWKS_URL or HEALTHAGENT_API_KEYS to require callers to "
            "authenticate."
        )
    running = await create_server(settings, listen)
    log.info(
        "serving",
        listen=listen or settings.server.listen,
        port=running.port,
        upstream=running.upstream_description,
        history=describe_store(settings),
    )
    if upstream_kind is UpstreamKind.CHATKIT and not settings.upstream.self_hosted:
        missing = [
            name
            for name, value in (
                ("OPENAI_API_KEY", settings.upstream.openai_api_key),
                ("OPENAI_WORKFLOW_ID", settings.upstream.openai_workflow_id),
            )
            if not value
        ]
        if missing:
            log.warning("calls will fail with FAILED_PRECONDITION until set", missing=missing)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info(
        "shutting down",
        drain_seconds=settings.server.shutdown_drain_seconds,
        grace_seconds=settings.server.shutdown_grace_seconds,
    )
    await running.stop(
        settings.server.shutdown_grace_seconds, settings.server.shutdown_drain_seconds
    )
    log.info("stopped")
