"""`healthagent agent`: the ChatKit server over HTTP (Starlette on uvicorn).

- `POST /chatkit`: every ChatKit operation, streaming (`text/event-stream`) or not (JSON).
  A streaming answer's first chunk is read before the status is sent, because the SDK raises
  an unknown thread (404) and a tool output without a pending call (409) only then.
- `POST /tokens/revoke` `{"user": ...}`: the service's logout, voiding the user's tokens.
- `GET /healthz`: 200 when the database answers.

With HEALTHAGENT_AGENT_METRICS_LISTEN set, Prometheus `/metrics` on a port of its own
(`metrics.py`), as the service serves its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass

import structlog
import uvicorn
from chatkit.server import StreamingResult
from chatkit.store import NotFoundError
from chatkit.types import is_streaming_req
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from healthagent_service.agent.access import Access, AccessDenied, TokenRevocations
from healthagent_service.agent.chatkit_server import AgentChatKitServer
from healthagent_service.agent.database import AgentDatabase, PostgresDatabase, SqliteDatabase
from healthagent_service.agent.loading import load_agent
from healthagent_service.agent.metrics import UNKNOWN_OPERATION, AgentMetrics, RequestOutcome
from healthagent_service.agent.model import ModelConnection, connect_model
from healthagent_service.agent.thread_store import ThreadStore
from healthagent_service.config import Settings
from healthagent_service.listen import is_loopback, parse_listen
from healthagent_service.memory import tune_garbage_collector
from healthagent_service.security.redaction import REDACTOR

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OUTCOMES = {
    400: RequestOutcome.INVALID,
    401: RequestOutcome.UNAUTHORIZED,
    404: RequestOutcome.NOT_FOUND,
    409: RequestOutcome.CONFLICT,
    413: RequestOutcome.TOO_LARGE,
}


def _error(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> Response:
    # the OpenAI error envelope, which the service's ChatKit adapter reads
    body = {
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    }
    return JSONResponse(body, status_code=status)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside another program (the tests): the signals stay the program's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class AgentApp:
    """The HTTP layer over an `AgentChatKitServer`."""

    chatkit: AgentChatKitServer
    access: Access
    revocations: TokenRevocations
    database: AgentDatabase
    metrics: AgentMetrics

    def starlette(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/chatkit", self.chatkit_endpoint, methods=["POST"]),
                Route("/tokens/revoke", self.revoke_endpoint, methods=["POST"]),
                Route("/healthz", self.health_endpoint, methods=["GET"]),
            ]
        )

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise AccessDenied(413, "request body too large")
        body = b""
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise AccessDenied(413, "request body too large")
        return body

    def _refuse(
        self,
        operation: str,
        streaming: bool,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
    ) -> Response:
        self.metrics.request(operation, streaming, _OUTCOMES.get(status, RequestOutcome.ERROR))
        return _error(status, message, code=code, param=param)

    async def chatkit_endpoint(self, request: Request) -> Response:
        operation, streaming = UNKNOWN_OPERATION, False
        try:
            context = await self.access.context_for(request.headers)
            body = await self._body(request)
            parsed = self.chatkit.parse(body)
            operation, streaming = parsed.type, is_streaming_req(parsed)
            result = await self.chatkit.process_parsed(parsed, context)
        except AccessDenied as denied:
            return self._refuse(operation, streaming, denied.status, denied.message)
        except ValidationError as exc:
            return self._refuse(
                operation, streaming, 400, f"not a ChatKit request: {exc.error_count()} problem(s)"
            )
        except NotFoundError as exc:
            return self._refuse(operation, streaming, 404, str(exc), param="thread_id")
        except Exception:
            self.metrics.request(operation, streaming, RequestOutcome.ERROR)
            raise
        if not isinstance(result, StreamingResult):
            self.metrics.request(operation, streaming, RequestOutcome.OK)
            return Response(result.json, media_type="application/json")
        events: AsyncIterator[bytes] = aiter(result)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = b""
        except NotFoundError as exc:
            return self._refuse(operation, streaming, 404, str(exc), param="thread_id")
        except ValueError as exc:
            # add_client_tool_output when the thread's last item is not a pending call
            return self._refuse(
                operation,
                streaming,
                409,
                str(exc),
                code="no_pending_tool_call",
                param="tool_output",
            )
        except Exception:
            self.metrics.request(operation, streaming, RequestOutcome.ERROR)
            raise

        async def body_stream() -> AsyncIterator[bytes]:
            # counted once, when the stream ends: nothing per chunk
            outcome = RequestOutcome.CANCELLED  # unless it ends by itself (below)
            try:
                if first:
                    yield first
                async for chunk in events:
                    yield chunk
                outcome = RequestOutcome.OK
            except Exception:
                outcome = RequestOutcome.ERROR
                raise
            finally:
                self.metrics.request(operation, streaming, outcome)

        return StreamingResponse(
            body_stream(), media_type="text/event-stream", headers=STREAM_HEADERS
        )

    async def revoke_endpoint(self, request: Request) -> Response:
        if not self.access.may_revoke(request.headers):
            return _error(401, "only the HealthAgent service may revoke tokens")
        try:
            body = json.loads(await self._body(request))
            user, at = body["user"], body.get("revoked_before")
        except (ValueError, TypeError, KeyError, AttributeError, AccessDenied):
            return _error(400, 'the body must be {"user": "<end user>"}', param="user")
        if not isinstance(user, str) or not user:
            return _error(400, "user must be a non-empty string", param="user")
        if isinstance(at, bool) or not isinstance(at, int | float):
            at = None
        revoked_before = await self.revocations.revoke(user, at)
        log.info("user tokens revoked", user=user)
        return JSONResponse({"revoked_before": revoked_before})

    async def health_endpoint(self, request: Request) -> Response:
        try:
            await self.database.fetch("SELECT 1")
        except Exception as exc:  # any failure of the database is "not ready"
            return JSONResponse({"status": "unavailable", "error": type(exc).__name__}, 503)
        return JSONResponse({"status": "ok"})


def check_agent_exposure(settings: Settings, host: str) -> None:
    """Refuse to listen off loopback without the service's credential: any host that reached
    the port could then name any user."""
    if settings.upstream.chatkit_auth_header is None and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host} without HEALTHAGENT_CHATKIT_AUTH_HEADER (the "
            "credential the HealthAgent service sends); set it, or listen on 127.0.0.1"
        )


def _database(settings: Settings) -> AgentDatabase:
    if settings.database.url is not None:
        return PostgresDatabase(
            settings.database.url.get_secret_value(),
            settings.database.schema_name,
            settings.database.pool_size,
        )
    return SqliteDatabase(settings.database.data_dir / "agent.db")


def _service_header(settings: Settings) -> tuple[str, str] | None:
    if settings.upstream.chatkit_auth_header is None:
        return None
    name, _, value = settings.upstream.chatkit_auth_header.get_secret_value().partition(":")
    return name.strip(), value.strip()


@dataclass
class RunningAgentServer:
    """A started agent server and what it owns."""

    app: AgentApp
    server: uvicorn.Server
    task: asyncio.Task[None]
    model: ModelConnection
    port: int
    metrics_port: int  # 0: no /metrics (HEALTHAGENT_AGENT_METRICS_LISTEN unset)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/chatkit"

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task
        await self.close()

    async def close(self) -> None:
        """Release what the stopped server held: the model client, the database, /metrics."""
        await self.model.close()
        await self.app.database.close()
        # its serving thread takes up to half a second to notice: not on the loop
        await asyncio.to_thread(self.app.metrics.close)


async def start_agent_server(
    settings: Settings, listen: str | None = None, *, install_signal_handlers: bool = False
) -> RunningAgentServer:
    """Build and start the agent server (port 0 picks one: see `RunningAgentServer.port`)."""
    REDACTOR.add(settings.secret_values())
    host, port = parse_listen(listen or settings.agent.listen)
    check_agent_exposure(settings, host)
    agent = load_agent(settings.agent.spec, settings.agent.model)
    database = _database(settings)
    await database.open()
    model: ModelConnection | None = None
    metrics = AgentMetrics()
    try:
        model = await connect_model(settings)
        store = ThreadStore(database)
        chatkit = AgentChatKitServer(
            store,
            agent,
            model.run_config(),
            history_items=settings.agent.history_items,
            max_turns=settings.agent.max_turns,
            metrics=metrics,
        )
        revocations = TokenRevocations(database)
        access = Access(
            service_header=_service_header(settings),
            token_secret=(
                settings.agent.token_secret.get_secret_value()
                if settings.agent.token_secret
                else None
            ),
            token_audience=settings.agent.token_audience,
            revocations=revocations,
        )
        app = AgentApp(chatkit, access, revocations, database, metrics)
        # off loopback only as the agent server itself may be: with the service's credential
        metrics_port = metrics.serve_at(
            settings.agent.metrics_listen,
            settings.server.worker_index,
            lambda metrics_host: check_agent_exposure(settings, metrics_host),
        )
        config = uvicorn.Config(
            app.starlette(),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            log_config=None,  # uvicorn's records go through the process's logging
            timeout_graceful_shutdown=int(settings.server.shutdown_grace_seconds) or None,
        )
        server = uvicorn.Server(config) if install_signal_handlers else _EmbeddedServer(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start (a taken port, say)
                raise OSError(f"the agent server could not listen on {host}:{port}")
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
    except BaseException:
        if model is not None:
            await model.close()
        await database.close()
        await asyncio.to_thread(metrics.close)
        raise
    log.info(
        "agent server listening",
        url=f"http://{host}:{bound}/chatkit",
        agent=agent.name,
        model=model.description,
        threads=database.description,
        metrics_port=metrics_port or None,
    )
    return RunningAgentServer(app, server, task, model, bound, metrics_port)


async def run_agent_server(settings: Settings, listen: str | None = None) -> None:
    """`healthagent agent`: serve until SIGTERM or SIGINT, then let streams finish."""
    running = await start_agent_server(settings, listen, install_signal_handlers=True)
    # the SDKs leave ~230k objects alive after import: exempt them from collections, or every
    # full collection pauses all streams for a quarter of a second
    # (docs/decisions/0007-malloc-and-gc-settings.md)
    tune_garbage_collector(settings.tuning.gc_gen0_threshold)
    # the supervisor (`serve` in agent mode) reads this line to learn the port
    print(json.dumps({"agent_url": running.url}), flush=True)
    await running.task
    await running.close()
