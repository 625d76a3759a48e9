"""Typed settings, read once at start-up from the environment.

`Settings` holds one model a concern (`settings.auth`, `settings.tls`, ...). Each group is read
from the environment on its own, every field by the exact environment variable named in its
alias, so the variables keep their flat names (HEALTHAGENT_..., OPENAI_...) whatever group a
field sits in. docs/configuration.md is generated from these models
(`python -m healthagent_service.config_docs > docs/configuration.md`).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_core import InitErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

MAX_WORKERS = 256
MAX_GRPC_SERVERS = 64
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_AGENT_LISTEN = "127.0.0.1:8790"
DEFAULT_AGENT_TOKEN_AUDIENCE = "healthagent-agent"
MAX_AGENT_TOKEN_TTL_SECONDS = 600
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
EMULATOR_WORKFLOW_ID = "wf_emulator"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class UpstreamKind(StrEnum):
    """What `Chat` talks to (HEALTHAGENT_UPSTREAM)."""

    CHATKIT = "chatkit"
    REALTIME = "realtime"
    EMULATOR = "emulator"  # ChatKit protocol, answered by the built-in emulator
    AGENT = "agent"  # the project's own agent server (`healthagent agent`), ChatKit protocol


class AgentModelApi(StrEnum):
    """Which OpenAI-compatible API the agent server's model is reached through."""

    RESPONSES = "responses"
    CHAT_COMPLETIONS = "chat_completions"


DEFAULT_REALTIME_INSTRUCTIONS = (
    "You are a careful, friendly health assistant. Answer in plain language, say when "
    "something needs a clinician, and never invent measurements."
)


class LogFormat(StrEnum):
    """How log lines are rendered."""

    AUTO = "auto"  # JSON unless stderr is a terminal
    JSON = "json"
    CONSOLE = "console"


class ApiKeySetting(BaseModel):
    """One service API key: its principal name and the hex SHA-256 of the key."""

    principal: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


def _strip_trailing_slash(value: str | None) -> str | None:
    return value.rstrip("/") if value else value


def _empty_is_unset(value: object) -> object:
    return None if value == "" else value


class SettingsGroup(BaseSettings):
    """One group of settings, read from the environment by each field's alias (the full
    variable name: there is no prefix, and case does not matter)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")


class ServerSettings(SettingsGroup):
    """The service process: where gRPC listens, how many processes and servers take calls,
    the metrics endpoint, and how it shuts down."""

    listen: str = Field(
        default=DEFAULT_LISTEN,
        alias="HEALTHAGENT_LISTEN",
        description="`HOST:PORT` of the gRPC listener (`serve --listen` overrides).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        alias="HEALTHAGENT_WORKERS",
        description="Server processes sharing the gRPC port, one per core "
        "(`serve --workers` overrides).",
    )
    # grpc.aio takes up one new call at a time per server, a round of its loop each: several
    # servers on the one port take up new calls sooner when the loop is busy
    # (docs/decisions/0004-servers-per-process.md)
    grpc_servers: int = Field(
        default=16,
        ge=1,
        le=MAX_GRPC_SERVERS,
        alias="HEALTHAGENT_GRPC_SERVERS",
        description="gRPC servers in each process, sharing its port: grpc.aio takes up new "
        "calls one at a time per server, so under load several take them up sooner "
        "(docs/decisions/0004-servers-per-process.md). They take up calls per connection: a "
        "caller that sends everything over one connection is served by one of them.",
    )
    # 0: connections live as long as their clients keep them. Behind L4 balancing (a
    # Kubernetes Service), a limit makes clients reconnect now and then, and so reach replicas
    # added since they connected (docs/deploy.md)
    max_connection_age_seconds: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        alias="HEALTHAGENT_GRPC_MAX_CONNECTION_AGE_SECONDS",
        description="Seconds after which a connection is told to go away (GOAWAY; its open "
        "calls get 10 minutes to finish), so clients behind L4 balancing reconnect and reach "
        "new replicas. `0`: no limit.",
    )
    worker_index: int | None = Field(
        default=None,
        ge=0,
        alias="HEALTHAGENT_WORKER_INDEX",
        description="This worker's index, set by the supervisor of `serve --workers N` in each "
        "worker's environment; not to be set by hand.",
    )
    metrics_listen: str = Field(
        default="",
        alias="HEALTHAGENT_METRICS_LISTEN",
        description="`HOST:PORT` of the Prometheus `/metrics` endpoint; empty: off. A "
        "non-loopback host needs authentication configured. With workers, worker *i* serves "
        "on `PORT + i`.",
    )
    shutdown_drain_seconds: float = Field(
        default=2.0,
        ge=0,
        alias="HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS",
        description="On SIGTERM/SIGINT, seconds that health says NOT_SERVING while calls are "
        "still accepted, so load balancers move away.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        alias="HEALTHAGENT_SHUTDOWN_GRACE_SECONDS",
        description="Then new calls are refused and in-flight calls get this many seconds to "
        "finish (the agent server's too).",
    )


class UpstreamSettings(SettingsGroup):
    """What `Chat` talks to, where it is, and how it is reached."""

    kind: UpstreamKind | None = Field(
        default=None,
        alias="HEALTHAGENT_UPSTREAM",
        description="What `Chat` talks to: `agent` (the agent server), `chatkit`, `realtime` "
        "(the emulator's Realtime side without a key) or `emulator` (ChatKit protocol). Unset: "
        "`chatkit` with HEALTHAGENT_CHATKIT_URL or with a key and a workflow id, `agent` with "
        "a key alone, else `emulator`.",
    )
    openai_api_key: SecretStr | None = Field(
        default=None,
        alias="OPENAI_API_KEY",
        description="The OpenAI key: for the agent server's model, Realtime, or hosted "
        "ChatKit. Unset (and no HEALTHAGENT_CHATKIT_URL): the built-in emulator answers.",
    )
    openai_workflow_id: str | None = Field(
        default=None,
        alias="OPENAI_WORKFLOW_ID",
        description="A hosted ChatKit workflow (`wf_...`). With a key it selects hosted "
        "ChatKit over the agent; with the emulator it defaults to `wf_emulator`.",
    )
    openai_base_url: str = Field(
        default=DEFAULT_OPENAI_BASE_URL,
        alias="OPENAI_BASE_URL",
        description="The OpenAI API base URL, as in the openai SDK (a trailing `/` is dropped).",
    )
    openai_realtime_url: str | None = Field(
        default=None,
        alias="OPENAI_REALTIME_URL",
        description="The Realtime WebSocket endpoint. Unset: OPENAI_BASE_URL with `wss://` "
        "(`ws://`) and `/realtime`.",
    )
    chatkit_url: str | None = Field(
        default=None,
        alias="HEALTHAGENT_CHATKIT_URL",
        description="Endpoint of a self-hosted ChatKit server (or of an agent server run "
        "elsewhere). Then no sessions are minted and the user's id is sent in the "
        "`X-HealthAgent-User` header.",
    )
    chatkit_auth_header: SecretStr | None = Field(
        default=None,
        alias="HEALTHAGENT_CHATKIT_AUTH_HEADER",
        description="`Name: value` header sent to the self-hosted server (e.g. "
        "`Authorization: Bearer ...`); the agent server requires it of every request that "
        "names a user, and off loopback it must be set. `serve` makes one up for its own agent "
        "child.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        alias="HEALTHAGENT_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
        description="Seconds to connect to the upstream.",
    )
    read_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        alias="HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS",
        description="Longest silence between upstream bytes, in seconds, before the turn "
        "fails UNAVAILABLE.",
    )
    max_connections: int = Field(
        default=10_000,
        ge=1,
        alias="HEALTHAGENT_UPSTREAM_MAX_CONNECTIONS",
        description="Concurrent upstream HTTP connections for streaming turns, and again for "
        "the other upstream calls (minting, cancelling). A turn that finds none free waits up "
        "to 30 s for one, then fails UNAVAILABLE.",
    )
    buffer_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024 * 1024,
        alias="HEALTHAGENT_UPSTREAM_BUFFER_BYTES",
        description="Upstream event bytes all `Chat` streams together may hold at once beyond "
        "64 KiB each (an event may be up to 8 MiB); a stream whose events would take the total "
        "past it ends RESOURCE_EXHAUSTED (`UPSTREAM_BUFFER_FULL`), so a bad upstream cannot "
        "take the process's memory.",
    )
    retry_after_seconds: float = Field(
        default=1.0,
        ge=0,
        alias="HEALTHAGENT_RETRY_AFTER_SECONDS",
        description="`RetryInfo` delay, in seconds, when the upstream gives none.",
    )

    @field_validator("openai_base_url", "openai_realtime_url", "chatkit_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return _strip_trailing_slash(value)

    @field_validator("kind", "openai_api_key", "chatkit_auth_header", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _empty_is_unset(value)

    @field_validator("chatkit_auth_header")
    @classmethod
    def _header_has_a_name(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            name, colon, header_value = value.get_secret_value().partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name.strip()) or not header_value.strip():
                # The message must not repeat the value: it is a secret.
                raise ValueError("must look like 'Header-Name: value'")
        return value

    @property
    def effective_kind(self) -> UpstreamKind:
        """HEALTHAGENT_UPSTREAM when set; else `chatkit` for a self-hosted server or a hosted
        workflow (a key and a workflow id), `agent` for a key alone, else the emulator."""
        if self.kind is not None:
            return self.kind
        if self.chatkit_url or (self.openai_api_key is not None and self.openai_workflow_id):
            return UpstreamKind.CHATKIT
        if self.openai_api_key is not None:
            return UpstreamKind.AGENT
        return UpstreamKind.EMULATOR

    @property
    def emulated(self) -> bool:
        """True when the built-in emulator answers: HEALTHAGENT_UPSTREAM=emulator, or no key
        (and no self-hosted server) with the default or the Realtime upstream."""
        upstream = self.effective_kind
        if upstream is UpstreamKind.EMULATOR:
            return True
        return upstream is UpstreamKind.REALTIME and self.openai_api_key is None

    @property
    def self_hosted(self) -> bool:
        """True when Chat goes to a self-hosted ChatKit server (no hosted sessions are minted):
        one at HEALTHAGENT_CHATKIT_URL, or the agent server."""
        upstream = self.effective_kind
        return upstream is UpstreamKind.AGENT or (
            upstream is UpstreamKind.CHATKIT and bool(self.chatkit_url)
        )

    @property
    def supervises_agent(self) -> bool:
        """True when `serve` runs the agent server itself, as a child process (agent mode
        without HEALTHAGENT_CHATKIT_URL naming one run elsewhere)."""
        return self.effective_kind is UpstreamKind.AGENT and not self.chatkit_url

    @property
    def realtime_url(self) -> str:
        """OPENAI_REALTIME_URL, or OPENAI_BASE_URL with a WebSocket scheme plus /realtime."""
        if self.openai_realtime_url:
            return self.openai_realtime_url
        base = self.openai_base_url
        for http, ws in (("https://", "wss://"), ("http://", "ws://")):
            if base.startswith(http):
                base = ws + base[len(http) :]
        return f"{base}/realtime"


class AgentSettings(SettingsGroup):
    """The agent server (`healthagent agent`, and `serve` with HEALTHAGENT_UPSTREAM=agent)."""

    spec: str | None = Field(
        default=None,
        alias="HEALTHAGENT_AGENT",
        description="`package.module:attribute` naming an `agents.Agent`, or a function of no "
        "arguments returning one. Unset: the built-in health agent.",
    )
    model: str | None = Field(
        default=None,
        alias="HEALTHAGENT_AGENT_MODEL",
        description="The model of every agent that names none (the built-in one, and a custom "
        "agent's, handoff targets included). Unset: the Agents SDK's default.",
    )
    base_url: str | None = Field(
        default=None,
        alias="HEALTHAGENT_AGENT_BASE_URL",
        description="The agent's model API, for an OpenAI-compatible server (Ollama, vLLM, "
        "LiteLLM). Unset: OPENAI_BASE_URL with a key, else the emulator.",
    )
    api: AgentModelApi = Field(
        default=AgentModelApi.RESPONSES,
        alias="HEALTHAGENT_AGENT_API",
        description="Which API the model is reached through: `responses` or `chat_completions`.",
    )
    listen: str = Field(
        default=DEFAULT_AGENT_LISTEN,
        alias="HEALTHAGENT_AGENT_LISTEN",
        description="`HOST:PORT` where `healthagent agent` listens (`--listen` overrides).",
    )
    # its own setting, not HEALTHAGENT_METRICS_LISTEN: `serve`'s agent child inherits serve's
    # environment, and the two endpoints cannot share a port
    metrics_listen: str = Field(
        default="",
        alias="HEALTHAGENT_AGENT_METRICS_LISTEN",
        description="`HOST:PORT` of the agent server's Prometheus `/metrics` endpoint (e.g. "
        "`127.0.0.1:9465`); empty: off. A non-loopback host needs "
        "HEALTHAGENT_CHATKIT_AUTH_HEADER. With `serve --workers`, worker *i*'s agent child "
        "serves on `PORT + i`, and `serve` refuses to start when that range overlaps "
        "HEALTHAGENT_METRICS_LISTEN's (e.g. 9464 and 9465 with two workers).",
    )
    tracing: bool = Field(
        default=False,
        alias="HEALTHAGENT_AGENT_TRACING",
        description="Send the Agents SDK's traces to OpenAI (only with a key).",
    )
    token_secret: SecretStr | None = Field(
        default=None,
        alias="HEALTHAGENT_AGENT_TOKEN_SECRET",
        description="HS256 secret (at least 32 characters) of the user tokens `MintSession` "
        "issues in agent mode; the service and the agent server must share it. Unset: `serve` "
        "makes one up for its own child.",
    )
    token_audience: str = Field(
        default=DEFAULT_AGENT_TOKEN_AUDIENCE,
        min_length=1,
        alias="HEALTHAGENT_AGENT_TOKEN_AUDIENCE",
        description="The `aud` of those user tokens.",
    )
    history_items: int = Field(
        default=100,
        ge=1,
        le=1000,
        alias="HEALTHAGENT_AGENT_HISTORY_ITEMS",
        description="Thread items the model sees each turn.",
    )
    max_turns: int = Field(
        default=10,
        ge=1,
        le=100,
        alias="HEALTHAGENT_AGENT_MAX_TURNS",
        description="Model calls a turn may make before it fails `AGENT_MAX_TURNS`.",
    )

    @field_validator("base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return _strip_trailing_slash(value)

    @field_validator("spec", "model", "base_url", "token_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _empty_is_unset(value)

    @field_validator("token_secret")
    @classmethod
    def _token_secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (it signs the agent's user tokens)")
        return value


class RealtimeSettings(SettingsGroup):
    """The Realtime upstream (HEALTHAGENT_UPSTREAM=realtime): the session it configures, its
    sockets and the conversations it holds."""

    model: str = Field(
        default="gpt-realtime",
        alias="HEALTHAGENT_REALTIME_MODEL",
        description="Realtime model (also the model of minted secrets).",
    )
    instructions: str = Field(
        default=DEFAULT_REALTIME_INSTRUCTIONS,
        alias="HEALTHAGENT_REALTIME_INSTRUCTIONS",
        description="Session instructions.",
    )
    tools: list[dict[str, Any]] = Field(
        default_factory=list,
        alias="HEALTHAGENT_REALTIME_TOOLS",
        description='JSON list of Realtime function tools (`{"type": "function", "name", '
        '"description", "parameters"}`).',
    )
    secret_ttl_seconds: int = Field(
        default=600,
        ge=10,
        le=7200,
        alias="HEALTHAGENT_REALTIME_SECRET_TTL_SECONDS",
        description="Lifetime of `ek_` secrets in seconds, for MintSession and the service's "
        "own sockets.",
    )
    warm_sockets: int = Field(
        default=2,
        ge=0,
        alias="HEALTHAGENT_REALTIME_WARM_SOCKETS",
        description="Configured sockets kept ready for new conversations; `0`: none.",
    )
    warm_max_idle_seconds: float = Field(
        default=300.0,
        gt=0,
        alias="HEALTHAGENT_REALTIME_WARM_MAX_IDLE_SECONDS",
        description="A warm socket unused this many seconds is replaced.",
    )
    idle_seconds: float = Field(
        default=300.0,
        gt=0,
        alias="HEALTHAGENT_REALTIME_IDLE_SECONDS",
        description="A conversation's socket is closed after this many idle seconds (the next "
        "turn replays the conversation on a new one).",
    )
    session_max_seconds: float = Field(
        default=3300.0,
        gt=0,
        alias="HEALTHAGENT_REALTIME_SESSION_MAX_SECONDS",
        description="No turn starts on a socket older than this many seconds (Realtime "
        "sessions end at 60 minutes).",
    )
    max_conversations: int = Field(
        default=10_000,
        ge=1,
        alias="HEALTHAGENT_REALTIME_MAX_CONVERSATIONS",
        description="Realtime conversations held in memory (least recently used dropped first).",
    )


class SessionSettings(SettingsGroup):
    """The pool of minted upstream sessions (hosted ChatKit client secrets, agent-mode user
    tokens) and when they are minted again."""

    pool_size: int = Field(
        default=10_000,
        ge=1,
        alias="HEALTHAGENT_SESSION_POOL_SIZE",
        description="Pooled upstream sessions kept (least recently used dropped first).",
    )
    pool_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        alias="HEALTHAGENT_SESSION_POOL_BYTES",
        description="Bytes the pooled sessions may hold in all, their options (each distinct "
        "set of state variables is a session of its own) and secrets counted; past it the "
        "least recently used are dropped.",
    )
    refresh_fraction: float = Field(
        default=0.8,
        gt=0,
        le=1,
        alias="HEALTHAGENT_SESSION_REFRESH_FRACTION",
        description="A pooled session (or a Realtime socket's secret) is minted again after "
        "this fraction of its lifetime.",
    )
    ttl_seconds: int | None = Field(
        default=None,
        ge=1,
        le=600,
        alias="HEALTHAGENT_SESSION_TTL_SECONDS",
        description="Lifetime asked for pooled sessions, in seconds. Unset: the upstream's "
        "default (600).",
    )


class AuthSettings(SettingsGroup):
    """Who may call: end users with JWTs (a shared secret or a JWKS), services with API keys.
    None of them set: every caller is let in, on loopback only."""

    jwt_secret: SecretStr | None = Field(
        default=None,
        alias="HEALTHAGENT_AUTH_JWT_SECRET",
        description="HS256 secret of callers' JWTs (Supabase's JWT secret).",
    )
    jwks_url: str | None = Field(
        default=None,
        alias="HEALTHAGENT_AUTH_JWKS_URL",
        description="JWKS URL for RS256/ES256 caller JWTs (keys cached, fetched again for an "
        "unknown `kid`).",
    )
    jwt_issuer: str | None = Field(
        default=None,
        alias="HEALTHAGENT_AUTH_JWT_ISSUER",
        description="Required `iss` of caller JWTs. Unset: not checked.",
    )
    jwt_audience: str | None = Field(
        default=None,
        alias="HEALTHAGENT_AUTH_JWT_AUDIENCE",
        description="Required `aud` of caller JWTs (Supabase: `authenticated`). Unset: not "
        "checked.",
    )
    jwks_cache_seconds: float = Field(
        default=600.0,
        gt=0,
        alias="HEALTHAGENT_AUTH_JWKS_CACHE_SECONDS",
        description="Seconds a fetched JWKS is kept.",
    )
    jwks_min_refresh_seconds: float = Field(
        default=10.0,
        ge=0,
        alias="HEALTHAGENT_AUTH_JWKS_MIN_REFRESH_SECONDS",
        description="Least seconds between JWKS fetches for unknown key ids.",
    )
    api_keys: list[ApiKeySetting] = Field(
        default_factory=list,
        alias="HEALTHAGENT_API_KEYS",
        description='Service API keys as JSON: `[{"principal": "billing", "sha256": "<hex '
        'SHA-256 of the key>"}]`.',
    )

    @field_validator("jwt_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _empty_is_unset(value)

    @property
    def configured(self) -> bool:
        """True when callers must authenticate (a JWT secret, a JWKS URL or API keys)."""
        return bool(self.jwt_secret or self.jwks_url or self.api_keys)


class TlsSettings(SettingsGroup):
    """TLS on the gRPC port, and mutual TLS for service callers. The HTTP listener serves
    plain HTTP, and is refused when client certificates are required."""

    cert_file: Path | None = Field(
        default=None,
        alias="HEALTHAGENT_TLS_CERT_FILE",
        description="PEM certificate chain to serve TLS with (with HEALTHAGENT_TLS_KEY_FILE).",
    )
    key_file: Path | None = Field(
        default=None,
        alias="HEALTHAGENT_TLS_KEY_FILE",
        description="PEM private key of that certificate.",
    )
    client_ca_file: Path | None = Field(
        default=None,
        alias="HEALTHAGENT_TLS_CLIENT_CA_FILE",
        description="PEM CA that client certificates are verified against (mutual TLS).",
    )
    require_client_cert: bool = Field(
        default=False,
        alias="HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT",
        description="Require a client certificate of every caller (needs the client CA).",
    )


class LimitSettings(SettingsGroup):
    """Per-user limits (in memory, or in Redis shared by every replica) and per-stream limits."""

    rate_limit_per_minute: float = Field(
        default=600.0,
        ge=0,
        alias="HEALTHAGENT_RATE_LIMIT_PER_MINUTE",
        description="Per-user token bucket over all HealthAgent RPCs: calls a minute; `0`: off.",
    )
    rate_limit_burst: int = Field(
        default=100,
        ge=1,
        alias="HEALTHAGENT_RATE_LIMIT_BURST",
        description="Calls that bucket holds when full.",
    )
    max_streams_per_user: int = Field(
        default=32,
        ge=0,
        alias="HEALTHAGENT_MAX_STREAMS_PER_USER",
        description="Concurrent `Chat` streams per user; `0`: off.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        alias="HEALTHAGENT_REDIS_URL",
        description="Keep the limits in this Redis, shared by every replica. They fail "
        "closed: while Redis cannot be reached (2 s timeout), HealthAgent RPCs are UNAVAILABLE "
        "(`LIMITS_UNAVAILABLE`, with `RetryInfo`) and health says NOT_SERVING. Unset: in "
        "memory, per process.",
    )
    redis_prefix: str = Field(
        default="healthagent",
        min_length=1,
        alias="HEALTHAGENT_REDIS_PREFIX",
        description="Prefix of the service's Redis keys.",
    )
    stream_slot_lease_seconds: float = Field(
        default=60.0,
        ge=3,
        le=3600,
        alias="HEALTHAGENT_STREAM_SLOT_LEASE_SECONDS",
        description="With Redis, a `Chat` stream's slot is a lease of this many seconds, "
        "renewed every third of it while the stream lasts and given back when it ends, so the "
        "slots of a process that died come free again.",
    )
    client_stall_seconds: float = Field(
        default=30.0,
        gt=0,
        alias="HEALTHAGENT_CLIENT_STALL_SECONDS",
        description="A `Chat` caller that takes no message for this many seconds (checked "
        "once a second) is cut off (RESOURCE_EXHAUSTED, `CLIENT_TOO_SLOW`) and the upstream "
        "request closed.",
    )
    max_message_bytes: int = Field(
        default=32 * 1024,
        ge=1,
        le=1024 * 1024,
        alias="HEALTHAGENT_MAX_MESSAGE_BYTES",
        description="Largest `message` / `output_json` in bytes; gRPC messages over 4x this "
        "(at least 256 KiB) and metadata over 16 KiB are refused.",
    )

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _empty_is_unset(value)


class DatabaseSettings(SettingsGroup):
    """Where conversation history (and the agent server's threads) are kept: SQLite under the
    data directory, or PostgreSQL when a URL is set."""

    data_dir: Path = Field(
        default=Path(".healthagent"),
        alias="HEALTHAGENT_DATA_DIR",
        description="Directory of the embedded SQLite databases (`healthagent.db`, "
        "`agent.db`); created 0700, files 0600.",
    )
    url: SecretStr | None = Field(
        default=None,
        alias="HEALTHAGENT_DATABASE_URL",
        description="A PostgreSQL DSN (`postgresql://user:password@host:5432/db`); when set, "
        "history goes there instead of SQLite. Never logged.",
    )
    schema_name: str = Field(
        default="healthagent",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        alias="HEALTHAGENT_DATABASE_SCHEMA",
        description="The PostgreSQL schema the service creates and uses.",
    )
    pool_size: int = Field(
        default=10,
        ge=1,
        alias="HEALTHAGENT_DATABASE_POOL_SIZE",
        description="PostgreSQL connections per process.",
    )

    @field_validator("url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _empty_is_unset(value)


class HttpSettings(SettingsGroup):
    """The HTTP listener: gRPC-Web, the seeds' SSE contract and the demo page."""

    listen: str = Field(
        default="",
        alias="HEALTHAGENT_HTTP_LISTEN",
        description="`HOST:PORT` of the HTTP listener (`serve --http` overrides); empty: off. A "
        "non-loopback host needs authentication configured.",
    )
    cors_origins: str = Field(
        default="",
        alias="HEALTHAGENT_HTTP_CORS_ORIGINS",
        description="Comma-separated origins allowed to call the HTTP listener from a browser.",
    )
    demo: bool = Field(
        default=False,
        alias="HEALTHAGENT_HTTP_DEMO",
        description="Serve the demo page at `GET /` of the HTTP listener.",
    )
    heartbeat_seconds: float = Field(
        default=15.0,
        gt=0,
        le=300,
        alias="HEALTHAGENT_HTTP_HEARTBEAT_SECONDS",
        description="A `: ping` comment goes out on an SSE stream silent this many seconds.",
    )

    @property
    def allowed_origins(self) -> list[str]:
        """HEALTHAGENT_HTTP_CORS_ORIGINS, split at the commas."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]


class EmulatorSettings(SettingsGroup):
    """The built-in emulator: `healthagent emulator`, and the one `serve` and `agent` start
    when no key is set."""

    chunk_delay_ms: float = Field(
        default=25.0,
        ge=0,
        alias="HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS",
        description="Milliseconds before each text chunk.",
    )
    slow_first_byte_seconds: float = Field(
        default=3.0,
        ge=0,
        alias="HEALTHAGENT_EMULATOR_SLOW_FIRST_BYTE_SECONDS",
        description="First-byte delay in seconds of the `[slow]` trigger (and the stall of "
        "`[stall]`).",
    )
    realtime_session_seconds: float = Field(
        default=3600.0,
        gt=0,
        alias="HEALTHAGENT_EMULATOR_REALTIME_SESSION_SECONDS",
        description="Realtime sessions end (`session_expired`, close 1001) after this many "
        "seconds.",
    )


class LogSettings(SettingsGroup):
    """Log lines."""

    format: LogFormat = Field(
        default=LogFormat.AUTO,
        alias="HEALTHAGENT_LOG_FORMAT",
        description="`json`, `console`, or `auto` (JSON unless stderr is a terminal).",
    )
    level: str = Field(
        default="info",
        alias="HEALTHAGENT_LOG_LEVEL",
        description="Least level logged (`debug`, `info`, `warning`, `error`).",
    )


class TuningSettings(SettingsGroup):
    """Process memory tuning, applied once at start-up
    (docs/decisions/0007-malloc-and-gc-settings.md)."""

    malloc_arenas: int = Field(
        default=2,
        ge=0,
        le=64,
        alias="HEALTHAGENT_MALLOC_ARENAS",
        description="glibc malloc arenas for `serve`; `0`: glibc's default (8 per core). Fewer "
        "keep freed memory reusable across threads.",
    )
    gc_gen0_threshold: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        alias="HEALTHAGENT_GC_GEN0_THRESHOLD",
        description="Allocations between collections of Python's youngest generation; `0`: "
        "Python's default (700). Higher serves unary calls a little faster but holds more "
        "garbage between collections. Objects alive at start-up are frozen out of collections "
        "either way.",
    )


class Settings(BaseModel):
    """Every setting, by group. `Settings.from_environment()` reads them.

    Secrets are `SecretStr` so that printing the settings never shows them.
    """

    server: ServerSettings
    upstream: UpstreamSettings
    agent: AgentSettings
    realtime: RealtimeSettings
    sessions: SessionSettings
    auth: AuthSettings
    tls: TlsSettings
    limits: LimitSettings
    database: DatabaseSettings
    http: HttpSettings
    emulator: EmulatorSettings
    log: LogSettings
    tuning: TuningSettings

    @classmethod
    def groups(cls) -> dict[str, type[SettingsGroup]]:
        """Each group's attribute name and model, in the order they are documented."""
        groups: dict[str, type[SettingsGroup]] = {}
        for name, field in cls.model_fields.items():
            model = field.annotation
            assert isinstance(model, type) and issubclass(model, SettingsGroup)
            groups[name] = model
        return groups

    @classmethod
    def from_environment(cls, **values: Any) -> Settings:
        """Every group read from the environment; `values`, keyed by environment-variable
        name (`HEALTHAGENT_WORKERS=4`), take precedence over it.

        Raises one `ValidationError` for every bad value of every group, each located by its
        variable name; or `SettingsError`, naming the variable, for JSON that is not JSON.
        """
        groups: dict[str, SettingsGroup] = {}
        problems: list[InitErrorDetails] = []
        for name, model in cls.groups().items():
            try:
                groups[name] = model(**values)
            except ValidationError as error:
                problems.extend(
                    InitErrorDetails(
                        type=problem["type"],
                        loc=problem["loc"],
                        input=problem["input"],
                        ctx=problem.get("ctx", {}),
                    )
                    for problem in error.errors()
                )
            except SettingsError as error:
                raise SettingsError(f"{_variable_of(model, error)}: not valid JSON") from error
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return cls.model_validate(groups)

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        secrets = [
            self.upstream.openai_api_key,
            self.upstream.chatkit_auth_header,
            self.database.url,
            self.auth.jwt_secret,
            self.limits.redis_url,
            self.agent.token_secret,
        ]
        values = [s.get_secret_value() for s in secrets if s is not None]
        header = self.upstream.chatkit_auth_header
        if header is not None:  # the value alone, without "Name: "
            values.append(header.get_secret_value().partition(":")[2].strip())
        return values


def _variable_of(model: type[SettingsGroup], error: SettingsError) -> str:
    """The environment variable a settings error is about (pydantic-settings names the field)."""
    field = re.search(r'field "(\w+)"', str(error))
    info = model.model_fields.get(field.group(1)) if field else None
    return (info.alias if info is not None else None) or "(unknown)"
