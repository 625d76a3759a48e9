"""`healthagent serve` with `HEALTHAGENT_WORKERS` > 1: one server process per core, one port.

A Python process runs its event loop on one core, however many the machine has; gRPC's own
advice for Python servers is several processes. This supervisor reserves the port (a socket
bound with SO_REUSEPORT and never listened on, so nothing else can take the port while a worker
restarts), starts the workers, which bind the same port with SO_REUSEPORT so that the kernel
spreads incoming connections over them, restarts a worker that dies, and on SIGTERM or SIGINT
passes the signal on and waits for every worker's graceful shutdown. It runs no gRPC itself
and never builds the server.

Workers share what a replica shares: the history store (SQLite in WAL mode, or PostgreSQL),
revocations through it, and per-user limits through Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

import structlog

from healthagent_service.config import Settings
from healthagent_service.listen import join_listen, parse_listen, reserve_port

log = structlog.get_logger(__name__)

WORKER_INDEX_ENV = "HEALTHAGENT_WORKER_INDEX"
SUPERVISOR_PID_ENV = "HEALTHAGENT_SUPERVISOR_PID"
# Exit status of `serve` when it cannot start (bad settings, port taken): restarting won't help.
CANNOT_START = 2
_POLL_SECONDS = 0.2
_FIRST_RESTART_DELAY = 1.0
_MAX_RESTART_DELAY = 30.0
_HEALTHY_AFTER_SECONDS = 60.0  # a worker up this long restarts with the first delay again
_STARTING_SECONDS = 30.0  # exit status CANNOT_START this soon after a first start: settings
_MAX_QUICK_FAILURES = 5  # a worker dying this often in a row, each before it was healthy
_EXTRA_STOP_SECONDS = 15.0  # beyond the workers' own drain and grace periods
_ANY_HOST = frozenset({"0.0.0.0", "::", ""})  # every address: meets any other host


def worker_problems(settings: Settings) -> list[str]:
    """Why these settings cannot run several workers (empty when they can)."""
    problems = []
    if settings.upstream.emulated:
        problems.append(
            "each worker would run its own embedded emulator, so a conversation begun on one "
            "would be unknown to the others: point the workers at an upstream (OPENAI_API_KEY, "
            "HEALTHAGENT_CHATKIT_URL, or one `healthagent emulator` via OPENAI_BASE_URL)"
        )
    limited = settings.limits.rate_limit_per_minute > 0 or settings.limits.max_streams_per_user > 0
    if limited and settings.limits.redis_url is None:
        problems.append(
            "per-user limits kept in memory would be counted per worker: set "
            "HEALTHAGENT_REDIS_URL to share them, or turn them off "
            "(HEALTHAGENT_RATE_LIMIT_PER_MINUTE=0, HEALTHAGENT_MAX_STREAMS_PER_USER=0)"
        )
    clash = _metrics_port_clash(settings)
    if clash:
        problems.append(clash)
    return problems


def _metrics_port_clash(settings: Settings) -> str | None:
    """Worker *i* serves /metrics on PORT + i, and so does its agent child on the agent's
    port: two ranges of `workers` ports that must not overlap, or a worker cannot start."""
    service, agent = settings.server.metrics_listen, settings.agent.metrics_listen
    if not (settings.upstream.supervises_agent and service and agent):
        return None
    (service_host, service_port), (agent_host, agent_port) = (
        parse_listen(service),
        parse_listen(agent),
    )
    hosts_meet = service_host == agent_host or bool({service_host, agent_host} & _ANY_HOST)
    count = settings.server.workers
    if not (service_port and agent_port and hosts_meet):
        return None  # a port picked by the kernel, or addresses that cannot clash
    if abs(service_port - agent_port) >= count:
        return None
    return (
        f"each worker serves /metrics on HEALTHAGENT_METRICS_LISTEN's port plus its index "
        f"({service_port}-{service_port + count - 1}) and its agent child on "
        f"HEALTHAGENT_AGENT_METRICS_LISTEN's ({agent_port}-{agent_port + count - 1}): "
        f"move one so that the two ranges do not overlap"
    )


_PR_SET_PDEATHSIG = 1  # prctl(2) option, Linux


def follow_supervisor() -> None:
    """In a worker, first thing: be sent SIGTERM when the supervisor dies, even by SIGKILL, so
    no orphaned worker keeps serving (and holding the port) with nobody to stop it. Exits at
    once if the supervisor is already gone."""
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, "0"))
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name is not None:
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if supervisor and os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(0)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restart_delay: float = _FIRST_RESTART_DELAY
    starts: int = 0
    quick_failures: int = 0  # exits in a row before `_HEALTHY_AFTER_SECONDS`


class Supervisor:
    """Starts `count` workers on `address`, keeps them running, stops them on a signal."""

    def __init__(self, settings: Settings, address: str, count: int) -> None:
        self._address = address
        self._count = count
        self._stop_timeout = (
            settings.server.shutdown_drain_seconds
            + settings.server.shutdown_grace_seconds
            + _EXTRA_STOP_SECONDS
        )
        self._workers = [_Worker(index) for index in range(count)]
        self._stop_signal: int | None = None

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "healthagent_service.cli", "serve", "--listen", self._address]

    def _start(self, worker: _Worker) -> None:
        env = {**os.environ, "HEALTHAGENT_WORKERS": str(self._count)}
        env[WORKER_INDEX_ENV] = str(worker.index)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        worker.process = subprocess.Popen(self._command(), env=env)
        worker.started_at = time.monotonic()
        worker.restart_at = None
        worker.starts += 1
        log.info("worker started", worker=worker.index, pid=worker.process.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._stop_signal = signum

    def run(self) -> int:
        """Until SIGTERM or SIGINT; the exit status for the command."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            for worker in self._workers:
                self._start(worker)
            log.info("supervising", workers=self._count, address=self._address, pid=os.getpid())
            while self._stop_signal is None:
                failed = self._check_workers()
                if failed is not None:
                    self._stop(signal.SIGTERM)
                    return failed
                time.sleep(_POLL_SECONDS)
        except BaseException:
            self._stop(signal.SIGTERM)  # never leave workers behind
            raise
        return self._stop(self._stop_signal)

    def _check_workers(self) -> int | None:
        """Restart dead workers when due; the command's exit status when it must give up:
        CANNOT_START when a worker cannot start at all (settings, port), 1 when one keeps
        dying before it is healthy (so that systemd or Kubernetes see the failure)."""
        now = time.monotonic()
        for worker in self._workers:
            process = worker.process
            if process is None or worker.restart_at is not None:
                if worker.restart_at is not None and now >= worker.restart_at:
                    self._start(worker)
                continue
            code = process.poll()
            if code is None:
                continue
            ran = now - worker.started_at
            if code == CANNOT_START and ran < _STARTING_SECONDS and worker.starts == 1:
                log.error("a worker cannot start; stopping", worker=worker.index)
                return CANNOT_START
            if ran >= _HEALTHY_AFTER_SECONDS:
                worker.restart_delay = _FIRST_RESTART_DELAY
                worker.quick_failures = 0
            else:
                worker.quick_failures += 1
                if worker.quick_failures >= _MAX_QUICK_FAILURES:
                    log.error(
                        "a worker keeps failing; stopping",
                        worker=worker.index,
                        failures=worker.quick_failures,
                        exit_code=code,
                    )
                    return 1
            worker.restart_at = now + worker.restart_delay
            log.error(
                "worker exited; restarting",
                worker=worker.index,
                exit_code=code,
                ran_seconds=round(ran, 1),
                restart_in_seconds=worker.restart_delay,
            )
            worker.restart_delay = min(_MAX_RESTART_DELAY, worker.restart_delay * 2)
        return None

    def _stop(self, signum: int) -> int:
        """Pass `signum` to every worker, wait for them; 0 when all stopped cleanly."""
        running = [w.process for w in self._workers if w.process and w.process.poll() is None]
        log.info("stopping workers", workers=len(running), signal=signal.Signals(signum).name)
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        deadline = time.monotonic() + self._stop_timeout
        clean = True
        for process in running:
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                log.error("worker did not stop in time; killed", pid=process.pid)
            # killed by the signal, or Python's status for SIGINT (128 + 2): it was still
            # starting, before its handlers, so it held no call
            clean = clean and code in (0, -signum, 128 + signum)
        log.info("stopped")
        return 0 if clean else 1


def run_workers(settings: Settings, listen: str | None) -> int:
    """Serve with `settings.server.workers` processes; returns the command's exit status."""
    problems = worker_problems(settings)
    if problems:
        raise ValueError(f"HEALTHAGENT_WORKERS={settings.server.workers}: " + "; ".join(problems))
    if settings.upstream.supervises_agent and settings.agent.token_secret is None:
        # each worker runs its own agent child: one secret, so each accepts every worker's tokens
        os.environ["HEALTHAGENT_AGENT_TOKEN_SECRET"] = secrets.token_urlsafe(48)
    host, port = parse_listen(listen or settings.server.listen)
    with contextlib.ExitStack() as reservations:
        reservation = reservations.enter_context(reserve_port(host, port))
        address = join_listen(host, reservation.port)
        if settings.http.listen:
            # held like the gRPC port; each worker's HTTP listener joins it (SO_REUSEPORT)
            web_host, web_port = parse_listen(settings.http.listen)
            web = reservations.enter_context(reserve_port(web_host, web_port))
            os.environ["HEALTHAGENT_HTTP_LISTEN"] = join_listen(web_host, web.port)
        return Supervisor(settings, address, settings.server.workers).run()
