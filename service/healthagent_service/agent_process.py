"""`serve` in agent mode runs `healthagent agent` as a supervised child process.

The agent server imports the Agents SDK and ChatKit (about 100 MB and 1.4 s), which the gRPC
process must not pay, so it runs beside it: on a loopback port picked once (a restart takes the
same one), with a credential and a token-signing secret made for this run and handed over in
its environment (unless the settings name them), restarted with a growing delay if it dies, and
stopped with `serve`. It shares `serve`'s environment otherwise: the same key, model, database.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass

import httpx
import structlog

from healthagent_service.config import Settings
from healthagent_service.workers import SUPERVISOR_PID_ENV

log = structlog.get_logger(__name__)

AGENT_EXTRA_INSTALL = "pip install -c constraints.txt '.[agent]'"
_READY_TIMEOUT_SECONDS = 60.0
_FIRST_RESTART_DELAY = 0.5
_MAX_RESTART_DELAY = 30.0
_HEALTHY_AFTER_SECONDS = 60.0
_STOP_SECONDS = 15.0


def missing_agent_extra() -> str | None:
    """Why the agent server cannot run here (the extra is not installed), or None."""
    missing = [name for name in ("chatkit", "agents", "uvicorn") if not _importable(name)]
    if not missing:
        return None
    return (
        f"the agent server needs the 'agent' extra ({', '.join(missing)} not installed): "
        f"{AGENT_EXTRA_INSTALL}"
    )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:
        return False


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class AgentEndpoint:
    """How the service reaches the agent server: its URL and the credential it requires."""

    url: str
    auth_header: tuple[str, str]
    token_secret: str


class AgentProcess:
    """One supervised `healthagent agent` child."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._port = _free_loopback_port()
        if settings.upstream.chatkit_auth_header is not None:
            name, _, value = settings.upstream.chatkit_auth_header.get_secret_value().partition(":")
            auth = (name.strip(), value.strip())
        else:
            auth = ("Authorization", f"Bearer {secrets.token_urlsafe(32)}")
        secret = (
            settings.agent.token_secret.get_secret_value()
            if settings.agent.token_secret is not None
            else secrets.token_urlsafe(48)
        )
        self.endpoint = AgentEndpoint(f"http://127.0.0.1:{self._port}/chatkit", auth, secret)
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        name, value = self.endpoint.auth_header
        environment["HEALTHAGENT_CHATKIT_AUTH_HEADER"] = f"{name}: {value}"
        environment["HEALTHAGENT_AGENT_TOKEN_SECRET"] = self.endpoint.token_secret
        # the child's own settings, not the service's: it is the upstream, not a client of one
        for setting in ("HEALTHAGENT_UPSTREAM", "HEALTHAGENT_CHATKIT_URL", "HEALTHAGENT_WORKERS"):
            environment.pop(setting, None)
        environment[SUPERVISOR_PID_ENV] = str(os.getpid())
        return environment

    async def start(self) -> None:
        """Start the child and wait until it answers its health check."""
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch())

    async def _spawn(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "healthagent_service.cli",
            "agent",
            "--listen",
            f"127.0.0.1:{self._port}",
            env=self._environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            # its own session: a Ctrl-C or a signal to serve's process group is serve's to
            # handle (it stops the child last); and it follows serve if serve is killed
            # (`workers.follow_supervisor`, through SUPERVISOR_PID_ENV)
            start_new_session=True,
        )
        await self._wait_ready(self._process)
        log.info("agent server ready", url=self.endpoint.url, pid=self._process.pid)

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        health = self.endpoint.url.removesuffix("/chatkit") + "/healthz"
        # never through a proxy from the environment: the child is on loopback
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if process.returncode is not None:
                    raise RuntimeError(
                        f"the agent server exited with status {process.returncode} while "
                        "starting (its log above says why)"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(health)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        await self._terminate(process)
        raise RuntimeError(f"the agent server did not start in {_READY_TIMEOUT_SECONDS:.0f} s")

    async def _watch(self) -> None:
        delay = _FIRST_RESTART_DELAY
        while not self._stopping:
            process = self._process
            assert process is not None
            started = time.monotonic()
            status = await process.wait()
            if self._stopping:
                return
            if time.monotonic() - started > _HEALTHY_AFTER_SECONDS:
                delay = _FIRST_RESTART_DELAY
            log.error("agent server died; restarting", status=status, delay_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(_MAX_RESTART_DELAY, delay * 2)
            if self._stopping:
                return
            try:
                await self._spawn()
                self.restarts += 1
            except (RuntimeError, OSError) as exc:
                log.error("agent server restart failed", error=str(exc))

    async def stop(self) -> None:
        """SIGTERM the child (it lets open streams finish), then wait for it."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._process is not None:
            await self._terminate(self._process)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(
                process.wait(), _STOP_SECONDS + self._settings.server.shutdown_grace_seconds
            )
        except TimeoutError:
            process.kill()
            await process.wait()
