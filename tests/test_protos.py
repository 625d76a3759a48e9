"""The public contract: buf lint and format are clean, nothing breaks compatibility with the last
landed commit, and the committed stubs match protos/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def buf() -> str:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: `bash tests/run` installs it (npm ci --prefix tools)")
    return str(BUF)


def test_buf_lint(buf: str) -> None:
    result = run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format(buf: str) -> None:
    result = run(buf, "format", "-d", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def git(*args: str) -> str:
    """`git ARGS` in the repository: its output, or "" when it fails."""
    result = run("git", *args)
    return result.stdout.strip() if result.returncode == 0 else ""


def last_landed_commit() -> str:
    """The commit this tree should stay compatible with: where the branch left main (origin's,
    else the local one); on main itself, or in CI's fresh clone of it whose HEAD is the commit
    under test, the commit before HEAD. "" when there is none (the first commit, or no git
    checkout at all)."""
    head = git("rev-parse", "HEAD")
    if not head:
        return ""
    for mainline in ("origin/main", "main"):
        fork = git("merge-base", "HEAD", mainline)
        if fork and fork != head:
            return fork
    return git("rev-parse", "--verify", "--quiet", "HEAD^")


def test_buf_breaking_against_the_last_landed_commit(buf: str) -> None:
    base = last_landed_commit()
    if not base and git("rev-parse", "--is-shallow-repository") == "true":
        message = "a shallow clone without the commit before HEAD: `git fetch --deepen=1`"
        if os.environ.get("CI"):
            pytest.fail(message)  # tests/run deepens a shallow clone: this is a real fault
        pytest.skip(message)
    if not base:
        pytest.skip("no commit landed before HEAD (or no git checkout here)")
    result = run(buf, "breaking", "--against", f".git#ref={base}")
    assert result.returncode == 0, f"against {base}:\n{result.stdout}{result.stderr}"


def test_buf_breaking_catches_a_breaking_change(buf: str, tmp_path: Path) -> None:
    # The check above can only fail if buf.yaml's `breaking` rules are in force: an unchanged
    # copy passes, and one whose field changed type does not.
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    unchanged = subprocess.run(
        [buf, "breaking", "--against", str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    proto = tmp_path / "protos" / "healthagent" / "v1" / "health_agent.proto"
    text = proto.read_text()
    assert "  string user = 2;" in text
    proto.write_text(text.replace("  string user = 2;", "  int64 user = 2;", 1))
    broken = subprocess.run(
        [buf, "breaking", "--against", str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode != 0
    assert "user" in broken.stdout + broken.stderr


def test_committed_stubs_match_protos() -> None:
    result = run(sys.executable, "clients/python/generate_stubs.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_element_has_a_comment() -> None:
    # Parse the source with comments through protoc, then walk the source info.
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from healthagent.v1 import health_agent_pb2

    out = ROOT / ".pytest_cache" / "descriptor.bin"
    out.parent.mkdir(exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                "healthagent/v1/health_agent.proto",
            ]
        )
        == 0
    )
    file = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    commented = {
        tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
    }
    missing = []
    for m_index, message in enumerate(file.message_type):
        if (4, m_index) not in commented:
            missing.append(message.name)
        for f_index, field in enumerate(message.field):
            if (4, m_index, 2, f_index) not in commented:
                missing.append(f"{message.name}.{field.name}")
    for e_index, enum in enumerate(file.enum_type):
        if (5, e_index) not in commented:
            missing.append(enum.name)
        for v_index, value in enumerate(enum.value):
            if (5, e_index, 2, v_index) not in commented:
                missing.append(f"{enum.name}.{value.name}")
    for s_index, service in enumerate(file.service):
        if (6, s_index) not in commented:
            missing.append(service.name)
        for r_index, rpc in enumerate(service.method):
            if (6, s_index, 2, r_index) not in commented:
                missing.append(f"{service.name}.{rpc.name}")
    assert not missing, missing
    assert health_agent_pb2.DESCRIPTOR.package == "healthagent.v1"
    assert os.path.exists(ROOT / "buf.yaml")
