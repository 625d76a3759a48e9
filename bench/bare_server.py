"""The ceiling for the performance harness: a bare `grpc.aio` server with HealthAgent's API and
no upstream, no history, no auth, no limits and no logging.

`Chat` streams the same number and size of messages a HealthAgent turn does in front of the
emulator (session, the two upstream events HealthAgent passes through, progress, the scripted
chunks, text done, response done), following the same emulator trigger phrases (`[chunks=N]`,
`[pace=N]`, `[stamp]`), so a client cannot tell the two apart except by what they cost.
`MintSession` answers a fixed session. Whatever HealthAgent spends above this is the hop.

    python -m bench.bare_server --listen 127.0.0.1:50099

Prints one JSON line with its address once it listens; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from healthagent.v1 import health_agent_pb2 as pb
from healthagent.v1 import health_agent_pb2_grpc as pb_grpc
from healthagent_service.emulator.script import plan_reply, stamp_text

SESSION_TTL_SECONDS = 600
# The same number and size of messages as HealthAgent relays for the emulator's scripted turn:
# ids as long as the emulator's, and the two upstream events HealthAgent passes through (the
# user's message done, the stream's options), with JSON of the same length.
SESSION_ID = "cksess_" + "0" * 32
THREAD_ID = "thr_bare0000"
ITEM_ID = "msg_bare0000"
WORKFLOW_ID = "wf_bench"
STREAM_OPTIONS = pb.Passthrough(
    type="stream_options",
    json=json.dumps(
        {"type": "stream_options", "stream_options": {"allow_cancel": True}}, separators=(",", ":")
    ),
)


def user_message_done(message: str) -> pb.Passthrough:
    """The upstream's event for the caller's message, as the emulator sends it."""
    item = {
        "id": "msg_bare0001",
        "thread_id": THREAD_ID,
        "created_at": "2026-11-22T00:00:00.000000",
        "type": "user_message",
        "content": [{"type": "input_text", "text": message}],
        "attachments": [],
        "quoted_text": "",
        "inference_options": {},
    }
    event = {"type": "thread.item.done", "item": item}
    return pb.Passthrough(type="thread.item.done", json=json.dumps(event, separators=(",", ":")))


class BareHealthAgent(pb_grpc.HealthAgentServicer):
    """Chat and MintSession with nothing behind them."""

    async def MintSession(  # noqa: N802 - gRPC method name
        self, request: pb.MintSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MintSessionResponse:
        expires_at = Timestamp(seconds=int(time.time()) + SESSION_TTL_SECONDS)
        return pb.MintSessionResponse(
            client_secret="ek_bare",
            session=pb.Session(
                id="cksess_bare", expires_at=expires_at, ttl_seconds=SESSION_TTL_SECONDS
            ),
            workflow_id="wf_bare",
            user=request.user,
            kind=pb.SESSION_KIND_CHATKIT,
        )

    async def Chat(  # noqa: N802 - gRPC method name
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ChatResponse]:
        reply = plan_reply(request.message)
        yield pb.ChatResponse(
            session=pb.SessionEvent(
                session_id=SESSION_ID,
                conversation_id=THREAD_ID,
                user=request.user,
                workflow_id=WORKFLOW_ID,
            )
        )
        yield pb.ChatResponse(passthrough=user_message_done(request.message))
        yield pb.ChatResponse(passthrough=STREAM_OPTIONS)
        yield pb.ChatResponse(progress=pb.Progress(text="Thinking"))
        delay = (reply.pace_ms or 0) / 1000
        sent: list[str] = []
        for chunk in reply.chunks:
            if delay:
                await asyncio.sleep(delay)
            text = stamp_text(time.monotonic_ns()) if reply.stamp else chunk
            sent.append(text)
            yield pb.ChatResponse(chunk=pb.Chunk(text=text, item_id=ITEM_ID))
        whole = "".join(sent)
        yield pb.ChatResponse(text_done=pb.TextDone(text=whole, item_id=ITEM_ID))
        yield pb.ChatResponse(response_done=pb.ResponseDone(text=whole))


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_HealthAgentServicer_to_server(BareHealthAgent(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rsplit(":", 1)[0]
    print(json.dumps({"address": f"{host}:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
