"""The settings: every environment variable keeps its name and meaning, bad values name their
variable, and docs/configuration.md matches the models it is generated from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from healthagent_service.config import Settings
from healthagent_service.config_docs import REGENERATE, configuration_markdown

ROOT = Path(__file__).resolve().parents[1]
KEY_HASH = "ab" * 32
AGENT_SECRET = "s" * 40

# Every variable Settings read before it was grouped (issue 25, item 4), listed from the flat
# model of commit 76737f7: name, where its value lands now, a value to set, the value expected.
# Each value differs from the default, so a variable that lands elsewhere cannot pass.
VARIABLES: list[tuple[str, str, str, Any]] = [
    ("OPENAI_API_KEY", "upstream.openai_api_key", "sk-test", "sk-test"),
    ("OPENAI_WORKFLOW_ID", "upstream.openai_workflow_id", "wf_x", "wf_x"),
    ("OPENAI_BASE_URL", "upstream.openai_base_url", "http://h:1/v1/", "http://h:1/v1"),
    ("HEALTHAGENT_UPSTREAM", "upstream.kind", "realtime", "realtime"),
    ("HEALTHAGENT_CHATKIT_URL", "upstream.chatkit_url", "http://c:2/ck/", "http://c:2/ck"),
    ("HEALTHAGENT_CHATKIT_AUTH_HEADER", "upstream.chatkit_auth_header", "X-K: v", "X-K: v"),
    ("HEALTHAGENT_AUTH_JWT_SECRET", "auth.jwt_secret", "jwt-secret", "jwt-secret"),
    ("HEALTHAGENT_AUTH_JWKS_URL", "auth.jwks_url", "http://j/jwks", "http://j/jwks"),
    ("HEALTHAGENT_AUTH_JWT_ISSUER", "auth.jwt_issuer", "iss", "iss"),
    ("HEALTHAGENT_AUTH_JWT_AUDIENCE", "auth.jwt_audience", "aud", "aud"),
    ("HEALTHAGENT_AUTH_JWKS_CACHE_SECONDS", "auth.jwks_cache_seconds", "61", 61.0),
    ("HEALTHAGENT_AUTH_JWKS_MIN_REFRESH_SECONDS", "auth.jwks_min_refresh_seconds", "3", 3.0),
    (
        "HEALTHAGENT_API_KEYS",
        "auth.api_keys",
        f'[{{"principal": "billing", "sha256": "{KEY_HASH}"}}]',
        [{"principal": "billing", "sha256": KEY_HASH}],
    ),
    ("HEALTHAGENT_TLS_CERT_FILE", "tls.cert_file", "/c.pem", Path("/c.pem")),
    ("HEALTHAGENT_TLS_KEY_FILE", "tls.key_file", "/k.pem", Path("/k.pem")),
    ("HEALTHAGENT_TLS_CLIENT_CA_FILE", "tls.client_ca_file", "/ca.pem", Path("/ca.pem")),
    ("HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT", "tls.require_client_cert", "true", True),
    ("HEALTHAGENT_RATE_LIMIT_PER_MINUTE", "limits.rate_limit_per_minute", "7", 7.0),
    ("HEALTHAGENT_RATE_LIMIT_BURST", "limits.rate_limit_burst", "8", 8),
    ("HEALTHAGENT_MAX_STREAMS_PER_USER", "limits.max_streams_per_user", "9", 9),
    ("HEALTHAGENT_REDIS_URL", "limits.redis_url", "redis://r:1/0", "redis://r:1/0"),
    ("HEALTHAGENT_REDIS_PREFIX", "limits.redis_prefix", "p", "p"),
    ("HEALTHAGENT_STREAM_SLOT_LEASE_SECONDS", "limits.stream_slot_lease_seconds", "30", 30.0),
    ("HEALTHAGENT_CLIENT_STALL_SECONDS", "limits.client_stall_seconds", "4", 4.0),
    ("HEALTHAGENT_MAX_MESSAGE_BYTES", "limits.max_message_bytes", "1000", 1000),
    ("HEALTHAGENT_DATA_DIR", "database.data_dir", "/tmp/d", Path("/tmp/d")),
    ("HEALTHAGENT_DATABASE_URL", "database.url", "postgresql://db/x", "postgresql://db/x"),
    ("HEALTHAGENT_DATABASE_SCHEMA", "database.schema_name", "other", "other"),
    ("HEALTHAGENT_DATABASE_POOL_SIZE", "database.pool_size", "3", 3),
    ("HEALTHAGENT_LISTEN", "server.listen", "0.0.0.0:1", "0.0.0.0:1"),
    ("HEALTHAGENT_WORKERS", "server.workers", "4", 4),
    ("HEALTHAGENT_GRPC_SERVERS", "server.grpc_servers", "2", 2),
    (
        "HEALTHAGENT_GRPC_MAX_CONNECTION_AGE_SECONDS",
        "server.max_connection_age_seconds",
        "90",
        90.0,
    ),
    ("HEALTHAGENT_WORKER_INDEX", "server.worker_index", "3", 3),
    ("HEALTHAGENT_METRICS_LISTEN", "server.metrics_listen", "127.0.0.1:9", "127.0.0.1:9"),
    ("OPENAI_REALTIME_URL", "upstream.openai_realtime_url", "ws://rt/", "ws://rt"),
    ("HEALTHAGENT_REALTIME_MODEL", "realtime.model", "m", "m"),
    ("HEALTHAGENT_REALTIME_INSTRUCTIONS", "realtime.instructions", "be brief", "be brief"),
    ("HEALTHAGENT_REALTIME_TOOLS", "realtime.tools", '[{"name": "t"}]', [{"name": "t"}]),
    ("HEALTHAGENT_REALTIME_SECRET_TTL_SECONDS", "realtime.secret_ttl_seconds", "60", 60),
    ("HEALTHAGENT_REALTIME_WARM_SOCKETS", "realtime.warm_sockets", "0", 0),
    ("HEALTHAGENT_REALTIME_WARM_MAX_IDLE_SECONDS", "realtime.warm_max_idle_seconds", "5", 5.0),
    ("HEALTHAGENT_REALTIME_IDLE_SECONDS", "realtime.idle_seconds", "6", 6.0),
    ("HEALTHAGENT_REALTIME_SESSION_MAX_SECONDS", "realtime.session_max_seconds", "7", 7.0),
    ("HEALTHAGENT_REALTIME_MAX_CONVERSATIONS", "realtime.max_conversations", "8", 8),
    ("HEALTHAGENT_HTTP_LISTEN", "http.listen", "127.0.0.1:8", "127.0.0.1:8"),
    ("HEALTHAGENT_HTTP_CORS_ORIGINS", "http.cors_origins", "https://a, b", "https://a, b"),
    ("HEALTHAGENT_HTTP_DEMO", "http.demo", "1", True),
    ("HEALTHAGENT_HTTP_HEARTBEAT_SECONDS", "http.heartbeat_seconds", "2", 2.0),
    ("HEALTHAGENT_AGENT", "agent.spec", "pkg.mod:build", "pkg.mod:build"),
    ("HEALTHAGENT_AGENT_MODEL", "agent.model", "gpt-x", "gpt-x"),
    ("HEALTHAGENT_AGENT_BASE_URL", "agent.base_url", "http://m/v1/", "http://m/v1"),
    ("HEALTHAGENT_AGENT_API", "agent.api", "chat_completions", "chat_completions"),
    ("HEALTHAGENT_AGENT_LISTEN", "agent.listen", "127.0.0.1:7", "127.0.0.1:7"),
    ("HEALTHAGENT_AGENT_METRICS_LISTEN", "agent.metrics_listen", "127.0.0.1:5", "127.0.0.1:5"),
    ("HEALTHAGENT_AGENT_TRACING", "agent.tracing", "true", True),
    ("HEALTHAGENT_AGENT_TOKEN_SECRET", "agent.token_secret", AGENT_SECRET, AGENT_SECRET),
    ("HEALTHAGENT_AGENT_TOKEN_AUDIENCE", "agent.token_audience", "aud2", "aud2"),
    ("HEALTHAGENT_AGENT_HISTORY_ITEMS", "agent.history_items", "5", 5),
    ("HEALTHAGENT_AGENT_MAX_TURNS", "agent.max_turns", "6", 6),
    ("HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS", "server.shutdown_drain_seconds", "0.5", 0.5),
    ("HEALTHAGENT_SHUTDOWN_GRACE_SECONDS", "server.shutdown_grace_seconds", "3", 3.0),
    ("HEALTHAGENT_LOG_FORMAT", "log.format", "console", "console"),
    ("HEALTHAGENT_LOG_LEVEL", "log.level", "debug", "debug"),
    ("HEALTHAGENT_MALLOC_ARENAS", "tuning.malloc_arenas", "0", 0),
    ("HEALTHAGENT_GC_GEN0_THRESHOLD", "tuning.gc_gen0_threshold", "5000", 5000),
    ("HEALTHAGENT_SESSION_POOL_SIZE", "sessions.pool_size", "11", 11),
    ("HEALTHAGENT_SESSION_POOL_BYTES", "sessions.pool_bytes", "2097152", 2097152),
    ("HEALTHAGENT_SESSION_REFRESH_FRACTION", "sessions.refresh_fraction", "0.5", 0.5),
    ("HEALTHAGENT_SESSION_TTL_SECONDS", "sessions.ttl_seconds", "120", 120),
    (
        "HEALTHAGENT_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
        "upstream.connect_timeout_seconds",
        "1.5",
        1.5,
    ),
    ("HEALTHAGENT_UPSTREAM_READ_TIMEOUT_SECONDS", "upstream.read_timeout_seconds", "9", 9.0),
    ("HEALTHAGENT_UPSTREAM_MAX_CONNECTIONS", "upstream.max_connections", "12", 12),
    ("HEALTHAGENT_UPSTREAM_BUFFER_BYTES", "upstream.buffer_bytes", "2097152", 2097152),
    ("HEALTHAGENT_RETRY_AFTER_SECONDS", "upstream.retry_after_seconds", "2.5", 2.5),
    ("HEALTHAGENT_EMULATOR_CHUNK_DELAY_MS", "emulator.chunk_delay_ms", "0", 0.0),
    (
        "HEALTHAGENT_EMULATOR_SLOW_FIRST_BYTE_SECONDS",
        "emulator.slow_first_byte_seconds",
        "0.25",
        0.25,
    ),
    (
        "HEALTHAGENT_EMULATOR_REALTIME_SESSION_SECONDS",
        "emulator.realtime_session_seconds",
        "10",
        10.0,
    ),
]


def _at(settings: Settings, path: str) -> Any:
    group, name = path.split(".")
    value = getattr(getattr(settings, group), name)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return [item.model_dump() if hasattr(item, "model_dump") else item for item in value]
    return value


def test_every_variable_is_listed_once() -> None:
    """The list above is the whole set: a variable dropped, renamed or added fails here."""
    names = [name for name, *_ in VARIABLES]
    assert len(names) == len(set(names)) == 78
    aliases = [
        str(field.alias)
        for model in Settings.groups().values()
        for field in model.model_fields.values()
    ]
    assert sorted(aliases) == sorted(names)


@pytest.mark.parametrize(
    ("name", "path", "raw", "expected"), VARIABLES, ids=[v[0] for v in VARIABLES]
)
def test_each_variable_sets_its_field(
    monkeypatch: pytest.MonkeyPatch, name: str, path: str, raw: str, expected: Any
) -> None:
    """Set in the process environment, as an operator sets it, each variable lands in its field
    with its meaning; a lower-case name does too (names were never case-sensitive)."""
    assert _at(Settings.from_environment(), path) != expected  # the default differs
    monkeypatch.setenv(name, raw)
    assert _at(Settings.from_environment(), path) == expected
    monkeypatch.delenv(name)
    monkeypatch.setenv(name.lower(), raw)
    assert _at(Settings.from_environment(), path) == expected


def test_keywords_by_variable_name_take_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHAGENT_WORKERS", "3")
    monkeypatch.setenv("HEALTHAGENT_HTTP_DEMO", "true")
    settings = Settings.from_environment(HEALTHAGENT_WORKERS=5)
    assert (settings.server.workers, settings.http.demo) == (5, True)


def test_bad_values_of_several_groups_are_named_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHAGENT_WORKERS", "0")
    monkeypatch.setenv("HEALTHAGENT_HTTP_HEARTBEAT_SECONDS", "301")
    monkeypatch.setenv("HEALTHAGENT_CHATKIT_AUTH_HEADER", "no colon here")
    with pytest.raises(ValidationError) as raised:
        Settings.from_environment()
    located = {problem["loc"][0]: problem["msg"] for problem in raised.value.errors()}
    assert set(located) == {
        "HEALTHAGENT_WORKERS",
        "HEALTHAGENT_HTTP_HEARTBEAT_SECONDS",
        "HEALTHAGENT_CHATKIT_AUTH_HEADER",
    }
    assert not any("no colon" in message for message in located.values())  # a secret
    assert "Header-Name: value" in located["HEALTHAGENT_CHATKIT_AUTH_HEADER"]


@pytest.mark.parametrize("name", ["HEALTHAGENT_API_KEYS", "HEALTHAGENT_REALTIME_TOOLS"])
def test_json_that_is_not_json_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "[{")
    with pytest.raises(SettingsError, match=f"^{name}: not valid JSON$"):
        Settings.from_environment()


def test_every_field_says_what_it_does() -> None:
    for model in Settings.groups().values():
        assert model.__doc__, model.__name__
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 10, f"{model.__name__}.{name}"


def test_configuration_doc_is_current() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == configuration_markdown(), (
        f"docs/configuration.md is stale: regenerate it with `make docs` (`.venv/bin/{REGENERATE}`)"
    )
