"""`healthagent health`: the probe a container or an exec probe runs, against `serve` processes
over real sockets (plain, TLS, mutual TLS, and during the shutdown drain)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.processes import (
    HEALTHAGENT,
    ServeProcess,
    clean_env,
    free_port,
    port_sockets,
    start_serve,
)
from tests.support.pki import Pki


def health(*arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HEALTHAGENT, "health", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**env),
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    process = start_serve()
    yield process
    assert process.terminate() == 0


def test_serving_on_the_port_of_healthagent_listen(server: ServeProcess) -> None:
    port = server.address.rsplit(":", 1)[1]
    # no --target: the probe runs beside `serve`, with its settings (listening on every address)
    result = health(HEALTHAGENT_LISTEN=f"0.0.0.0:{port}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SERVING"
    whole = health("--target", server.address, "--service", "")
    assert whole.returncode == 0 and whole.stdout.strip() == "SERVING"


def test_unknown_service_and_no_server_fail(server: ServeProcess) -> None:
    unknown = health("--target", server.address, "--service", "nope.v1.Nothing")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    started = time.monotonic()
    nobody = health("--target", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert nobody.returncode == 1 and "UNAVAILABLE" in nobody.stderr
    assert time.monotonic() - started < 10
    plain_to_tls = health("--target", server.address, "--tls", "--timeout", "2")
    assert plain_to_tls.returncode == 1


def test_not_serving_during_the_shutdown_drain() -> None:
    server = start_serve(HEALTHAGENT_SHUTDOWN_DRAIN_SECONDS="3")
    try:
        assert health("--target", server.address).returncode == 0
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        draining = health("--target", server.address)
        assert draining.returncode == 1
        assert "NOT_SERVING" in draining.stderr
    finally:
        assert server.process.wait(30) == 0


@contextlib.contextmanager
def tls_server(env: dict[str, str]) -> Iterator[str]:
    """`serve` with TLS on a free loopback port, once it listens: its address."""
    port = free_port()
    process = subprocess.Popen(
        [HEALTHAGENT, "serve", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(**env),
    )
    try:
        deadline = time.monotonic() + 30
        while not port_sockets(port):
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.write_bytes(pki.client_cert)
    client_key.write_bytes(pki.client_key)
    ca = ("--ca-file", str(pki.ca_file))
    tls = {
        "HEALTHAGENT_TLS_CERT_FILE": str(pki.server_cert),
        "HEALTHAGENT_TLS_KEY_FILE": str(pki.server_key),
    }
    with tls_server(tls) as address:
        beside = {**tls, "HEALTHAGENT_LISTEN": address}
        # TLS is on because the settings serve it; the roots are the caller's to give
        trusted = health(*ca, **beside)
        assert trusted.returncode == 0, trusted.stderr
        assert health("--timeout", "2", **beside).returncode == 1  # not the system's roots
        assert health("--no-tls", "--timeout", "2", **beside).returncode == 1
        by_name = address.replace("127.0.0.1", "localhost")
        named = health("--tls", "--target", by_name, *ca, "--server-name", "localhost")
        assert named.returncode == 0, named.stderr
    mutual = {
        **tls,
        "HEALTHAGENT_TLS_CLIENT_CA_FILE": str(pki.ca_file),
        "HEALTHAGENT_TLS_REQUIRE_CLIENT_CERT": "true",
    }
    with tls_server(mutual) as address:
        beside = {**mutual, "HEALTHAGENT_LISTEN": address}
        assert health(*ca, "--timeout", "2", **beside).returncode == 1  # no client certificate
        client = ("--cert-file", str(client_cert), "--key-file", str(client_key))
        with_certificate = health(*ca, *client, **beside)
        assert with_certificate.returncode == 0, with_certificate.stderr
