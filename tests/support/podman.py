"""podman for tests/test_deploy.py: its own configuration (these machines need the runc runtime
and no default ulimits), a base image made from Debian's packages (the public container registry
is not reachable), and the project's images built on it from deploy/Dockerfile.

Every command is bounded by a timeout. Under CI a missing podman fails the test instead of
skipping it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BASE_IMAGE = "localhost/healthagent-base:bookworm"
SERVICE_IMAGE = "localhost/healthagent:test"
AGENT_IMAGE = "localhost/healthagent-agent:test"

# runc (crun is not installed), no default ulimits (raising nofile fails in these VMs), cgroupfs
# and a file event log (no systemd here)
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# Debian minbase with Python 3.11 and venv, like python:3.11-slim. The machine's own extra CAs
# are copied in: this machine's HTTPS egress to PyPI is re-signed by a local CA, and pip inside
# the build must trust it (a machine without one copies nothing; the official base needs none).
MMDEBSTRAP_INCLUDE = "python3,python3-venv,ca-certificates"
_COPY_LOCAL_CAS = (
    'for ca in /usr/local/share/ca-certificates/*.crt; do [ -e "$ca" ] && '
    'cp "$ca" "$1/usr/local/share/ca-certificates/"; done; '
    'chroot "$1" update-ca-certificates >/dev/null 2>&1'
)


def require_podman() -> None:
    """Skip without podman, runc and mmdebstrap or without root; under CI, fail loudly."""
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    problem = ""
    if missing:
        problem = f"{', '.join(missing)} not installed (bash tests/run installs them)"
    elif os.geteuid() != 0:
        problem = "the image tests run rootful podman: run them as root"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


@dataclass
class Podman:
    """The podman command with this test run's configuration."""

    config_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "containers.conf").write_text(CONTAINERS_CONF)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.config_dir / "containers.conf")}

    def run(
        self, *arguments: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(arguments[:3])} ... exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def image_exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def ensure_base(self, workdir: Path) -> None:
        """The Debian base image, made once and kept (`podman rmi` it to make a new one)."""
        if self.image_exists(BASE_IMAGE):
            self.timings["base"] = 0.0
            return
        started = time.monotonic()
        tarball = workdir / "base.tar"
        result = subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={MMDEBSTRAP_INCLUDE}",
                f"--customize-hook={_COPY_LOCAL_CAS}",
                "bookworm",
                str(tarball),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"mmdebstrap failed:\n{result.stderr[-3000:]}"
        self.run(
            "import",
            "--quiet",
            "--change",
            'CMD ["/bin/bash"]',
            str(tarball),
            BASE_IMAGE,
            timeout=300,
        )
        tarball.unlink()
        self.timings["base"] = time.monotonic() - started

    def build(self, target: str, tag: str) -> None:
        """deploy/Dockerfile's `target` on the Debian base, as `tag` (docker format, which keeps
        the HEALTHCHECK; host networking for pip). Layers are cached between runs."""
        started = time.monotonic()
        self.run(
            "build",
            "--quiet",
            "--format",
            "docker",
            "--network",
            "host",
            "--ignorefile",
            str(DOCKERFILE.parent / "Dockerfile.dockerignore"),
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            "--file",
            str(DOCKERFILE),
            "--target",
            target,
            "--tag",
            tag,
            str(ROOT),
            timeout=1200,
        )
        self.timings[target] = time.monotonic() - started

    def prune_earlier_builds(self) -> None:
        """Remove the untagged images that builds before this test run left (the images a tag
        named before, stages built from older code), keeping this run's and the cached layers
        they stand on."""
        age = int(time.time() - self.started) + 1
        self.run("image", "prune", "--force", "--filter", f"until={age}s", timeout=300)

    def image_size(self, image: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def inspect(self, name: str, template: str) -> str:
        return self.run("inspect", "--format", template, name).stdout.strip()

    @contextlib.contextmanager
    def container(self, image: str, env: dict[str, str], *options: str) -> Iterator[str]:
        """A container of `image` on the host's network, locked down as the Kubernetes
        manifests lock the pods down (read-only root, no capabilities, no privilege gain),
        removed with its volumes afterwards: its name."""
        name = f"healthagent-test-{secrets.token_hex(4)}"
        settings = [f"--env={key}={value}" for key, value in env.items()]
        self.run(
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--health-interval",
            "disable",  # no systemd timers here: the tests run the check themselves
            *settings,
            *options,
            image,
            timeout=120,
        )
        try:
            yield name
        finally:
            self.run("rm", "--force", "--volumes", "--time", "0", name, timeout=60, check=False)

    def logs(self, name: str) -> str:
        result = self.run("logs", name, check=False)
        return result.stdout + result.stderr

    def wait_exit(self, name: str, timeout: float) -> int:
        """The container's exit code, once it has stopped (AssertionError after `timeout`)."""
        try:
            result = self.run("wait", name, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not stop in {timeout} s") from None
        return int(result.stdout.strip().splitlines()[-1])

    def process_ids(self, name: str) -> tuple[int, int]:
        """Real uid and gid of the container's main process, read from the host's /proc."""
        pid = self.inspect(name, "{{.State.Pid}}")
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
        gid = next(line.split()[1] for line in status if line.startswith("Gid:"))
        return int(uid), int(gid)
