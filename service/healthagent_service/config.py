"""Typed settings, read once at start-up from the environment."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


class Settings(BaseSettings):
    """Every setting, with the environment variable that sets it.

    Secrets are `SecretStr` so that printing the settings never shows them.
    """

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_workflow_id: str | None = Field(default=None, alias="OPENAI_WORKFLOW_ID")
    openai_base_url: str = Field(default=DEFAULT_OPENAI_BASE_URL, alias="OPENAI_BASE_URL")
    upstream: UpstreamKind | None = Field(default=None, alias="HEALTHAGENT_UPSTREAM")
    chatkit_url: str | None = Field(default=None, alias="HEALTHAGENT_CHATKIT_URL")
    chatkit_auth_header: SecretStr | None = Field(
        default=None, alias="HEALTHAGENT_CHATKIT_AUTH_HEADER"
    )

    auth_jwt_secret: SecretStr | None = Field(default=None, alias="HEALTHAGENT_AUTH_JWT_SECRET")
    auth_jwks_url: str | None = Field(default=None, alias="HEALTHAGENT_AUTH_JWKS_URL")
    auth_jwt_issuer: str | None = Field(default=None, alias="HEALTHAGENT_AUTH_JWT_ISSUER")
    auth_jwt_audience: str | None = Field(default=None, alias="HEALTHAGENT_AUTH_JWT_AUDIENCE")
    auth_jwks_cache_seconds: float = Field(
        default=600.0, gt=0, alias="HEALTHAGENT_AUTH_JWKS_CACHE_SECONDS"
    )
    auth_jwks_min_refresh_seconds: float = Field(
        default=10.0, ge=0, alias="HEALTHAGENT_AUTH_JWKS_MIN_REFRESH_SECONDS"
    )
    api_keys: list[ApiKeySetting] = Field(default_factory=list, alias="HEALTHAGENT_API_KEYS")
    tls_cert_file: Path | None = Field(default=None, alias="HEALTHAGENT_TLS_CERT_FILE")
    tls_key_file: Path | None = Field(default=None, alias="HEALTHAGENT_TLS_KEY_FILE")
    tls_client_ca_file: Path | None = Field(default=None, alias="HEALTHAGENT_TLS_CLIENT_CA_FILE")
    tls_require_client_cert: bool = Field(
        default=False, alias="HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT"
    )
    rate_limit_per_minute: float = Field(
        default=600.0, ge=0, alias="HEALTHAGENT_RATE_LIMIT_PER_MINUTE"
    )
    rate_limit_burst: int = Field(default=100, ge=1, alias="HEALTHAGENT_RATE_LIMIT_BURST")
    max_streams_per_user: int = Field(default=32, ge=0, alias="HEALTHAGENT_MAX_STREAMS_PER_USER")
    redis_url: SecretStr | None = Field(default=None, alias="HEALTHAGENT_REDIS_URL")
    redis_prefix: str = Field(default="healthagent", min_length=1, alias="HEALTHAGENT_REDIS_PREFIX")
    # a stream's slot in Redis is a lease renewed while it lasts: what a process that died
    # holding slots leaves behind is free again after this long
    stream_slot_lease_seconds: float = Field(
        default=60.0, ge=3, le=3600, alias="HEALTHAGENT_STREAM_SLOT_LEASE_SECONDS"
    )
    client_stall_seconds: float = Field(
        default=30.0, gt=0, alias="HEALTHAGENT_CLIENT_STALL_SECONDS"
    )
    max_message_bytes: int = Field(
        default=32 * 1024, ge=1, le=1024 * 1024, alias="HEALTHAGENT_MAX_MESSAGE_BYTES"
    )

    data_dir: Path = Field(default=Path(".healthagent"), alias="HEALTHAGENT_DATA_DIR")
    database_url: SecretStr | None = Field(default=None, alias="HEALTHAGENT_DATABASE_URL")
    database_schema: str = Field(
        default="healthagent",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        alias="HEALTHAGENT_DATABASE_SCHEMA",
    )
    database_pool_size: int = Field(default=10, ge=1, alias="HEALTHAGENT_DATABASE_POOL_SIZE")

    listen: str = Field(default=DEFAULT_LISTEN, alias="HEALTHAGENT_LISTEN")
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS, alias="HEALTHAGENT_WORKERS")
    # grpc.aio takes up one new call at a time per server, a round of its loop each: several
    # servers on the one port take up new calls sooner when the loop is busy; 16 carried the
    # 10,000-stream target on a host where 4 did not (docs/benchmarks.md, "Sixteen servers,
    # and five rounds")
    grpc_servers: int = Field(
        default=16, ge=1, le=MAX_GRPC_SERVERS, alias="HEALTHAGENT_GRPC_SERVERS"
    )
    # 0: connections live as long as their clients keep them. Behind L4 balancing (a
    # Kubernetes Service), a limit makes clients reconnect now and then, and so reach replicas
    # added since they connected (docs/deploy.md)
    grpc_max_connection_age_seconds: float = Field(
        default=0.0, ge=0, le=86_400, alias="HEALTHAGENT_GRPC_MAX_CONNECTION_AGE_SECONDS"
    )
    # set by the supervisor of `serve --workers N` in each worker's environment, never by hand
    worker_index: int | None = Field(default=None, ge=0, alias="HEALTHAGENT_WORKER_INDEX")
    metrics_listen: str = Field(default="", alias="HEALTHAGENT_METRICS_LISTEN")
    realtime_url: str | None = Field(default=None, alias="OPENAI_REALTIME_URL")
    realtime_model: str = Field(default="gpt-realtime", alias="HEALTHAGENT_REALTIME_MODEL")
    realtime_instructions: str = Field(
        default=DEFAULT_REALTIME_INSTRUCTIONS, alias="HEALTHAGENT_REALTIME_INSTRUCTIONS"
    )
    realtime_tools: list[dict[str, Any]] = Field(
        default_factory=list, alias="HEALTHAGENT_REALTIME_TOOLS"
    )
    realtime_secret_ttl_seconds: int = Field(
        default=600, ge=10, le=7200, alias="HEALTHAGENT_REALTIME_SECRET_TTL_SECONDS"
    )
    realtime_warm_sockets: int = Field(default=2, ge=0, alias="HEALTHAGENT_REALTIME_WARM_SOCKETS")
    realtime_warm_max_idle_seconds: float = Field(
        default=300.0, gt=0, alias="HEALTHAGENT_REALTIME_WARM_MAX_IDLE_SECONDS"
    )
    realtime_idle_seconds: float = Field(
        default=300.0, gt=0, alias="HEALTHAGENT_REALTIME_IDLE_SECONDS"
    )
    realtime_session_max_seconds: float = Field(
        default=3300.0, gt=0, alias="HEALTHAGENT_REALTIME_SESSION_MAX_SECONDS"
    )
    realtime_max_conversations: int = Field(
        default=10_000, ge=1, alias="HEALTHAGENT_REALTIME_MAX_CONVERSATIONS"
    )

    # The HTTP listener: gRPC-Web, the seeds' SSE contract, the demo page (off when empty)
    http_listen: str = Field(default="", alias="HEALTHAGENT_HTTP_LISTEN")
    http_cors_origins: str = Field(default="", alias="HEALTHAGENT_HTTP_CORS_ORIGINS")
    http_demo: bool = Field(default=False, alias="HEALTHAGENT_HTTP_DEMO")
    http_heartbeat_seconds: float = Field(
        default=15.0, gt=0, le=300, alias="HEALTHAGENT_HTTP_HEARTBEAT_SECONDS"
    )

    # The agent server (`healthagent agent`, and `serve` with HEALTHAGENT_UPSTREAM=agent)
    agent: str | None = Field(default=None, alias="HEALTHAGENT_AGENT")
    agent_model: str | None = Field(default=None, alias="HEALTHAGENT_AGENT_MODEL")
    agent_base_url: str | None = Field(default=None, alias="HEALTHAGENT_AGENT_BASE_URL")
    agent_api: AgentModelApi = Field(default=AgentModelApi.RESPONSES, alias="HEALTHAGENT_AGENT_API")
    agent_listen: str = Field(default=DEFAULT_AGENT_LISTEN, alias="HEALTHAGENT_AGENT_LISTEN")
    agent_tracing: bool = Field(default=False, alias="HEALTHAGENT_AGENT_TRACING")
    agent_token_secret: SecretStr | None = Field(
        default=None, alias="HEALTHAGENT_AGENT_TOKEN_SECRET"
    )
    agent_token_audience: str = Field(
        default=DEFAULT_AGENT_TOKEN_AUDIENCE, min_length=1, alias="HEALTHAGENT_AGENT_TOKEN_AUDIENCE"
    )
    agent_history_items: int = Field(
        default=100, ge=1, le=1000, alias="HEALTHAGENT_AGENT_HISTORY_ITEMS"
    )
    agent_max_turns: int = Field(default=10, ge=1, le=100, alias="HEALTHAGENT_AGENT_MAX_TURNS")

    shutdown_drain_seconds: float = Field(
        default=2.0, ge=0, alias="HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS"
    )
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, alias="HEALTHAGENT_SHUTDOWN_GRACE_SECONDS"
    )
    log_format: LogFormat = Field(default=LogFormat.AUTO, alias="HEALTHAGENT_LOG_FORMAT")
    log_level: str = Field(default="info", alias="HEALTHAGENT_LOG_LEVEL")
    malloc_arenas: int = Field(default=2, ge=0, le=64, alias="HEALTHAGENT_MALLOC_ARENAS")
    gc_gen0_threshold: int = Field(
        default=0, ge=0, le=1_000_000, alias="HEALTHAGENT_GC_GEN0_THRESHOLD"
    )

    session_pool_size: int = Field(default=10_000, ge=1, alias="HEALTHAGENT_SESSION_POOL_SIZE")
    session_pool_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024 * 1024, alias="HEALTHAGENT_SESSION_POOL_BYTES"
    )
    session_refresh_fraction: float = Field(
        default=0.8, gt=0, le=1, alias="HEALTHAGENT_SESSION_REFRESH_FRACTION"
    )
    session_ttl_seconds: int | None = Field(
        default=None, ge=1, le=600, alias="HEALTHAGENT_SESSION_TTL_SECONDS"
    )

    upstream_connect_timeout_seconds: float = Field(
        default=5.0, gt=0, alias="HEALTHAGENT_UPSTREAM_CONNECT_TIMEOUT_SECONDS"
    )
    upstream_read_timeout_seconds: float = Field(
        default=120.0, gt=0, alias="HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS"
    )
    upstream_max_connections: int = Field(
        default=10_000, ge=1, alias="HEALTHAGENT_UPSTREAM_MAX_CONNECTIONS"
    )
    # upstream event bytes all streams may hold at once, beyond 64 KiB each
    upstream_buffer_bytes: int = Field(
        default=128 * 1024 * 1024, ge=1024 * 1024, alias="HEALTHAGENT_UPSTREAM_BUFFER_BYTES"
    )
    retry_after_seconds: float = Field(default=1.0, ge=0, alias="HEALTHAGENT_RETRY_AFTER_SECONDS")

    emulator_chunk_delay_ms: float = Field(
        default=25.0, ge=0, alias="HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS"
    )
    emulator_slow_first_byte_seconds: float = Field(
        default=3.0, ge=0, alias="HEALTHAGENT_EMULATOR_SLOW_FIRST_BYTE_SECONDS"
    )
    emulator_realtime_session_seconds: float = Field(
        default=3600.0, gt=0, alias="HEALTHAGENT_EMULATOR_REALTIME_SESSION_SECONDS"
    )

    @field_validator("openai_base_url", "chatkit_url", "realtime_url", "agent_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator(
        "openai_api_key",
        "chatkit_auth_header",
        "database_url",
        "auth_jwt_secret",
        "redis_url",
        "agent_token_secret",
        mode="before",
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("upstream", "agent", "agent_model", "agent_base_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("agent_token_secret")
    @classmethod
    def _token_secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (it signs the agent's user tokens)")
        return value

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
    def effective_upstream(self) -> UpstreamKind:
        """HEALTHAGENT_UPSTREAM when set; else `chatkit` for a self-hosted server or a hosted
        workflow (a key and a workflow id), `agent` for a key alone, else the emulator."""
        if self.upstream is not None:
            return self.upstream
        if self.chatkit_url or (self.openai_api_key is not None and self.openai_workflow_id):
            return UpstreamKind.CHATKIT
        if self.openai_api_key is not None:
            return UpstreamKind.AGENT
        return UpstreamKind.EMULATOR

    @property
    def emulated(self) -> bool:
        """True when the built-in emulator answers: HEALTHAGENT_UPSTREAM=emulator, or no key
        (and no self-hosted server) with the default or the Realtime upstream."""
        upstream = self.effective_upstream
        if upstream is UpstreamKind.EMULATOR:
            return True
        return upstream is UpstreamKind.REALTIME and self.openai_api_key is None

    @property
    def self_hosted(self) -> bool:
        """True when Chat goes to a self-hosted ChatKit server (no hosted sessions are minted):
        one at HEALTHAGENT_CHATKIT_URL, or the agent server."""
        upstream = self.effective_upstream
        return upstream is UpstreamKind.AGENT or (
            upstream is UpstreamKind.CHATKIT and bool(self.chatkit_url)
        )

    @property
    def supervises_agent(self) -> bool:
        """True when `serve` runs the agent server itself, as a child process (agent mode
        without HEALTHAGENT_CHATKIT_URL naming one run elsewhere)."""
        return self.effective_upstream is UpstreamKind.AGENT and not self.chatkit_url

    @property
    def auth_configured(self) -> bool:
        """True when callers must authenticate (a JWT secret, a JWKS URL or API keys)."""
        return bool(self.auth_jwt_secret or self.auth_jwks_url or self.api_keys)

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        secrets = [
            self.openai_api_key,
            self.chatkit_auth_header,
            self.database_url,
            self.auth_jwt_secret,
            self.redis_url,
            self.agent_token_secret,
        ]
        values = [s.get_secret_value() for s in secrets if s is not None]
        if self.chatkit_auth_header is not None:  # the value alone, without "Name: "
            values.append(self.chatkit_auth_header.get_secret_value().partition(":")[2].strip())
        return values

    @property
    def cors_origins(self) -> list[str]:
        """HEALTHAGENT_HTTP_CORS_ORIGINS, comma-separated."""
        return [origin.strip() for origin in self.http_cors_origins.split(",") if origin.strip()]

    @property
    def effective_realtime_url(self) -> str:
        """OPENAI_REALTIME_URL, or OPENAI_BASE_URL with a WebSocket scheme plus /realtime."""
        if self.realtime_url:
            return self.realtime_url
        base = self.openai_base_url
        for http, ws in (("https://", "wss://"), ("http://", "ws://")):
            if base.startswith(http):
                base = ws + base[len(http) :]
        return f"{base}/realtime"
