"""Real processes: two replicas sharing one PostgreSQL, and a server killed mid-turn."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from harness.processes import EmulatorProcess, start_emulator_process, start_serve
from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from tests.support.stores import POSTGRES_DSN, postgres_schema


@pytest.fixture
def shared_emulator() -> Iterator[EmulatorProcess]:
    emulator = start_emulator_process()
    yield emulator
    emulator.stop()


def stub_for(address: str) -> tuple[grpc.Channel, pb_grpc.HealthAgentStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.HealthAgentStub(channel)


async def test_two_replicas_take_turns_on_one_conversation(
    shared_emulator: EmulatorProcess,
) -> None:
    async with postgres_schema() as schema:
        env = {
            **shared_emulator.service_env(),
            "HEALTHAGENT_DATABASE_URL": POSTGRES_DSN,
            "HEALTHAGENT_DATABASE_SCHEMA": schema,
        }
        replicas = [start_serve(**env), start_serve(**env)]
        channels = [stub_for(r.address) for r in replicas]
        try:
            stubs = [stub for _, stub in channels]
            conversation_id = ""
            answers = []
            for turn in range(8):
                request = pb.ChatRequest(message=f"turn {turn}", user="zoe")
                if conversation_id:
                    request.conversation_id = conversation_id
                events = list(stubs[turn % 2].Chat(request, timeout=30))
                conversation_id = events[0].session.conversation_id
                answers.append(events[-1].response_done.text)
            views = [
                stub.GetConversation(
                    pb.GetConversationRequest(user="zoe", conversation_id=conversation_id)
                ).conversation
                for stub in stubs
            ]
            assert views[0] == views[1]
            messages = views[0].messages
            assert len(messages) == 16  # nothing lost, nothing twice
            assert [m.text for m in messages[::2]] == [f"turn {t}" for t in range(8)]
            assert [m.text for m in messages[1::2]] == answers
            assert all(m.status == pb.MESSAGE_STATUS_COMPLETE for m in messages)
            # Logout on one replica reaches the other's pool (PostgreSQL NOTIFY).
            before = stubs[1].MintSession(pb.MintSessionRequest(user="zoe"))
            revoked = stubs[0].RevokeSessions(pb.RevokeSessionsRequest(user="zoe"))
            assert revoked.revoked_sessions >= 1
            deadline = time.monotonic() + 5
            while True:
                after = stubs[1].MintSession(pb.MintSessionRequest(user="zoe"))
                if after.session.id != before.session.id or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert after.session.id != before.session.id
        finally:
            for channel, _ in channels:
                channel.close()
            for replica in replicas:
                assert replica.terminate() == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_kill_9_mid_turn_leaves_a_consistent_history(backend: str, tmp_path: Path) -> None:
    emulator = start_emulator_process(chunk_delay_ms="20")
    try:
        async with postgres_schema() as schema:
            env: dict[str, Any] = {
                **emulator.service_env(),
                "HEALTHAGENT_DATA_DIR": str(tmp_path / "data"),
            }
            if backend == "postgres":
                env |= {
                    "HEALTHAGENT_DATABASE_URL": POSTGRES_DSN,
                    "HEALTHAGENT_DATABASE_SCHEMA": schema,
                }
            first = start_serve(**env)
            channel, stub = stub_for(first.address)
            done = list(stub.Chat(pb.ChatRequest(message="before", user="kim"), timeout=30))
            conversation_id = done[0].session.conversation_id
            stream = stub.Chat(
                pb.ChatRequest(message="[chunks=500]", user="kim", conversation_id=conversation_id),
                timeout=30,
            )
            chunks = 0
            with pytest.raises(grpc.RpcError) as cut:
                for event in stream:
                    chunks += event.WhichOneof("event") == "chunk"
                    if chunks == 5:
                        first.process.kill()  # SIGKILL: no clean-up of any kind
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            first.process.wait(10)
            channel.close()
            if backend == "sqlite":
                with sqlite3.connect(tmp_path / "data" / "healthagent.db") as db:
                    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            second = start_serve(**env)
            channel, stub = stub_for(second.address)
            history = stub.GetConversation(
                pb.GetConversationRequest(user="kim", conversation_id=conversation_id)
            ).conversation
            assert [(m.role, m.status) for m in history.messages] == [
                (pb.MESSAGE_ROLE_USER, pb.MESSAGE_STATUS_COMPLETE),
                (pb.MESSAGE_ROLE_ASSISTANT, pb.MESSAGE_STATUS_COMPLETE),
                (pb.MESSAGE_ROLE_USER, pb.MESSAGE_STATUS_COMPLETE),
                (pb.MESSAGE_ROLE_ASSISTANT, pb.MESSAGE_STATUS_INCOMPLETE),
            ]
            after = list(
                stub.Chat(
                    pb.ChatRequest(message="after", user="kim", conversation_id=conversation_id),
                    timeout=30,
                )
            )
            assert after[-1].WhichOneof("event") == "response_done"
            history = stub.GetConversation(
                pb.GetConversationRequest(user="kim", conversation_id=conversation_id)
            ).conversation
            assert len(history.messages) == 6 and history.messages[4].text == "after"
            channel.close()
            assert second.terminate() == 0
    finally:
        emulator.stop()
