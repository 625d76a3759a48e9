"""A real ChatKit server built with the official `openai-chatkit` SDK, served over HTTP.

It answers with the same `Reply` scripts as the emulator (`plan_reply`), so the tests can
compare the emulator's bytes with the SDK's and run the service against a self-hosted server.
Like a production deployment, the HTTP layer is the owner's: this one scopes threads by the
forwarded user header, can require an auth header, and answers 404 for an unknown thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import uvicorn
from chatkit.errors import CustomStreamError, ErrorCode, StreamError
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.store import NotFoundError, Store
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    ClientToolCallItem,
    NoticeEvent,
    Page,
    ProgressUpdateEvent,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
    Workflow,
    WorkflowItem,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from healthagent_service.emulator.script import (
    FATAL_MESSAGE,
    PROGRESS_TEXT,
    TOOL_ARGUMENTS,
    TOOL_NAME,
    Reply,
    plan_reply,
)
from healthagent_service.upstream.chatkit import FORWARDED_USER_HEADER

Context = dict[str, Any]
TITLE = "Sleep questions"


class MemoryStore(Store[Context]):
    """In-memory threads, scoped by the forwarded end user."""

    def __init__(self) -> None:
        self.threads: dict[str, tuple[str, ThreadMetadata]] = {}
        self.items: dict[str, dict[str, ThreadItem]] = {}

    def _owned(self, thread_id: str, context: Context) -> ThreadMetadata:
        owner_thread = self.threads.get(thread_id)
        if owner_thread is None or owner_thread[0] != context.get("user"):
            raise NotFoundError(f"Thread {thread_id} not found")
        return owner_thread[1]

    async def load_thread(self, thread_id: str, context: Context) -> ThreadMetadata:
        return self._owned(thread_id, context)

    async def save_thread(self, thread: ThreadMetadata, context: Context) -> None:
        self.threads[thread.id] = (context.get("user") or "", thread)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Context
    ) -> Page[ThreadItem]:
        self._owned(thread_id, context)
        items = list(self.items.get(thread_id, {}).values())
        if order == "desc":
            items.reverse()
        return Page(data=items[:limit], has_more=len(items) > limit)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Context) -> None:
        self.items.setdefault(thread_id, {})[item.id] = item

    async def save_item(self, thread_id: str, item: ThreadItem, context: Context) -> None:
        self.items.setdefault(thread_id, {})[item.id] = item

    async def load_item(self, thread_id: str, item_id: str, context: Context) -> ThreadItem:
        return self.items[thread_id][item_id]

    async def delete_thread(self, thread_id: str, context: Context) -> None:
        self.threads.pop(thread_id, None)

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Context) -> None:
        self.items.get(thread_id, {}).pop(item_id, None)

    async def save_attachment(self, attachment: Any, context: Context) -> None:
        raise NotImplementedError

    async def load_attachment(self, attachment_id: str, context: Context) -> Any:
        raise NotImplementedError

    async def delete_attachment(self, attachment_id: str, context: Context) -> None:
        raise NotImplementedError

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Context
    ) -> Any:
        raise NotImplementedError


class ScriptedChatKitServer(ChatKitServer[Context]):
    """Answers every turn with the emulator's script, through the SDK's own machinery."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.call_counter = 0
        # Like `chatkit.agents.stream_agent_response` with a reasoning model: a workflow item
        # is added before a client tool call and left open, to be resumed next turn.
        self.open_workflow_before_tool_call = False

    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: Context
    ) -> AsyncIterator[ThreadStreamEvent]:
        if input_user_message is None:
            reply = plan_reply(None, await self._tool_output(thread, context), has_tool_result=True)
        else:
            text = "".join(
                part.text for part in input_user_message.content if part.type == "input_text"
            )
            reply = plan_reply(text)
            if "[title]" in text:  # like automatic thread titling: the SDK emits thread.updated
                thread.title = TITLE
        async for event in self._script(thread, reply, context):
            yield event

    async def _tool_output(self, thread: ThreadMetadata, context: Context) -> Any:
        items = await self.store.load_thread_items(thread.id, None, 10, "desc", context)
        for item in items.data:
            if isinstance(item, ClientToolCallItem) and item.status == "completed":
                return item.output
        return None

    async def _script(
        self, thread: ThreadMetadata, reply: Reply, context: Context
    ) -> AsyncIterator[ThreadStreamEvent]:
        yield ProgressUpdateEvent(text=PROGRESS_TEXT)
        if reply.notice is not None:
            level, title, message = reply.notice
            yield NoticeEvent(level=level, message=message, title=title)  # type: ignore[arg-type]
        item_id = self.store.generate_item_id("message", thread, context)
        message_item = AssistantMessageItem(
            id=item_id, thread_id=thread.id, created_at=datetime.now(), content=[]
        )
        yield ThreadItemAddedEvent(item=message_item)
        yield ThreadItemUpdatedEvent(
            item_id=item_id,
            update=AssistantMessageContentPartAdded(
                content_index=0, content=AssistantMessageContent(text="", annotations=[])
            ),
        )
        for index, chunk in enumerate(reply.chunks):
            if index == reply.fail_after:
                raise StreamError(ErrorCode.STREAM_ERROR)
            if index == reply.fatal_after:
                raise CustomStreamError(FATAL_MESSAGE, allow_retry=False)
            yield ThreadItemUpdatedEvent(
                item_id=item_id,
                update=(AssistantMessageContentPartTextDelta(content_index=0, delta=chunk)),
            )
        content = AssistantMessageContent(text=reply.text, annotations=[])
        yield ThreadItemUpdatedEvent(
            item_id=item_id,
            update=AssistantMessageContentPartDone(content_index=0, content=content),
        )
        message_item.content = [content]
        yield ThreadItemDoneEvent(item=message_item)
        if reply.tool_call and self.open_workflow_before_tool_call:
            yield ThreadItemAddedEvent(
                item=WorkflowItem(
                    id=self.store.generate_item_id("workflow", thread, context),
                    thread_id=thread.id,
                    created_at=datetime.now(),
                    workflow=Workflow(type="reasoning", tasks=[]),
                )
            )
        if reply.tool_call:
            self.call_counter += 1
            yield ThreadItemDoneEvent(
                item=ClientToolCallItem(
                    id=self.store.generate_item_id("tool_call", thread, context),
                    thread_id=thread.id,
                    created_at=datetime.now(),
                    status="pending",
                    call_id=f"call_{self.call_counter:012x}",
                    name=TOOL_NAME,
                    arguments=dict(TOOL_ARGUMENTS),
                )
            )


@dataclass
class ReferenceServer:
    """The SDK server behind Starlette + uvicorn on a loopback port."""

    required_auth: tuple[str, str] | None = None
    chatkit: ScriptedChatKitServer = field(default_factory=ScriptedChatKitServer)
    users_seen: list[str] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/chatkit"

    async def _endpoint(self, request: Request) -> Response:
        if self.required_auth is not None:
            name, value = self.required_auth
            if request.headers.get(name) != value:
                return JSONResponse({"error": {"message": "unauthorized"}}, status_code=401)
        user = request.headers.get(FORWARDED_USER_HEADER, "")
        self.users_seen.append(user)
        result = await self.chatkit.process(await request.body(), {"user": user})
        if not isinstance(result, StreamingResult):
            return Response(result.json, media_type="application/json")
        events = result.__aiter__()  # type: ignore[no-untyped-call]
        try:
            first = await anext(events)
        except NotFoundError as exc:
            return JSONResponse(
                {
                    "error": {
                        "message": str(exc),
                        "type": "invalid_request_error",
                        "param": "thread_id",
                        "code": None,
                    }
                },
                status_code=404,
            )

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for chunk in events:
                yield chunk

        return StreamingResponse(body(), media_type="text/event-stream")

    async def start(self) -> None:
        app = Starlette(routes=[Route("/chatkit", self._endpoint, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(500):
            if self._server.started:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("reference ChatKit server did not start")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
