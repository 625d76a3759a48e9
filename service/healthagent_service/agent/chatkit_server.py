"""The ChatKit server: each turn runs the agent over the thread's stored items.

`respond()` is the SDK's own recipe (`Runner.run_streamed` + `stream_agent_response` over the
thread's recent items), plus what the SDK leaves out or gets wrong:
- a caller who leaves stops the run (`result.cancel()`): the SDK's run task would otherwise go
  on calling tools and the model (openai-agents-python#574);
- a failure reaches the caller as a status with a reason (`failures.py`), token usage as an
  effect (`upstream/chatkit_effects.py`);
- chatkit 1.6.5 stores an assistant message (and a client tool call) under the model's item id,
  and the store upserts by id: with the Chat Completions API every id is `__fake_id__`
  (chatkit-python#36), and a Responses-compatible server may number its items the same every
  answer (`msg_0`), so a later answer overwrote an earlier one and the model no longer read it.
  Such an id, or one already taken in the thread or earlier in the turn, gets a fresh id here
  (`_TurnIds`); a unique one is kept;
- chatkit sends stored assistant messages back as `output_text` parts, which the Chat
  Completions converter refuses ("Unknown content") on the second turn:
  `PlainAssistantMessages` sends them as plain text;
- every turn is counted (`metrics.py`) when it starts and when it ends: its outcome, duration,
  failure reason and tokens; never per delta.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import structlog
from agents import Agent, RunConfig, Runner, RunResultStreaming, TResponseInputItem
from agents.models.fake_id import FAKE_RESPONSES_ID
from chatkit.agents import AgentContext, ThreadItemConverter, stream_agent_response
from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.store import NotFoundError, StoreItemType
from chatkit.types import (
    AssistantMessageItem,
    ChatKitReq,
    ClientEffectEvent,
    ClientToolCallItem,
    ErrorEvent,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemRemovedEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
    is_streaming_req,
)
from pydantic import TypeAdapter

from healthagent_service.agent.failures import INPUT_REFUSED, TurnFailure, classify_failure
from healthagent_service.agent.metrics import AgentMetrics, TurnOutcome
from healthagent_service.agent.thread_store import RequestContext, ThreadStore
from healthagent_service.upstream.chatkit_effects import ERROR_EFFECT, USAGE_EFFECT

log = structlog.get_logger(__name__)

# a run that failed for no reason `classify_failure` knows: a defect of the agent's code
_AGENT_FAILED = TurnFailure("INTERNAL", "AGENT_FAILED", "the agent run failed")


class PlainAssistantMessages(ThreadItemConverter):
    """Stored assistant messages as `{"role": "assistant", "content": "<text>"}`, which both
    the Responses and the Chat Completions models accept."""

    async def assistant_message_to_input(
        self, item: AssistantMessageItem
    ) -> TResponseInputItem | list[TResponseInputItem] | None:
        text = "".join(part.text for part in item.content)
        return {"role": "assistant", "content": text}


class _TurnIds:
    """The ids a run's model-named items (assistant messages, client tool calls) are stored
    under, and the ids of every assistant message the run added (what a tripped guardrail
    withdraws).

    The model's item id is kept unless it is `__fake_id__`, is already stored in the thread,
    or was given to another item earlier in this turn: then the item gets a fresh id, since
    the store's `save_item` upserts by id and would overwrite the earlier item.
    """

    def __init__(
        self, new_id: Callable[[StoreItemType], str], stored: Callable[[str], Awaitable[bool]]
    ) -> None:
        self._new_id = new_id
        self._stored = stored
        self._open: dict[str, str] = {}  # model id -> the id of its item still streaming
        self._given: dict[str, list[str]] = {}  # model id -> every id its items got this turn
        self.added_messages: list[str] = []

    async def _assign(self, item: ThreadItem) -> str:
        model_id = item.id
        fresh = (
            model_id == FAKE_RESPONSES_ID or model_id in self._given or await self._stored(model_id)
        )
        kind: StoreItemType = "tool_call" if isinstance(item, ClientToolCallItem) else "message"
        item_id = self._new_id(kind) if fresh else model_id
        self._given.setdefault(model_id, []).append(item_id)
        return item_id

    async def relabel(self, event: ThreadStreamEvent) -> list[ThreadStreamEvent]:
        if isinstance(event, ThreadItemAddedEvent) and _model_named(event.item):
            item_id = self._open[event.item.id] = await self._assign(event.item)
            if isinstance(event.item, AssistantMessageItem):
                self.added_messages.append(item_id)
            return [event.model_copy(update={"item": _with_id(event.item, item_id)})]
        if isinstance(event, ThreadItemUpdatedEvent) and event.item_id in self._open:
            return [event.model_copy(update={"item_id": self._open[event.item_id]})]
        if isinstance(event, ThreadItemDoneEvent) and _model_named(event.item):
            # the item added under this model id, or (a client tool call) one never added
            opened = self._open.pop(event.item.id, "")
            item_id = opened or await self._assign(event.item)
            return [event.model_copy(update={"item": _with_id(event.item, item_id)})]
        if isinstance(event, ThreadItemRemovedEvent) and event.item_id in self._given:
            # a tripped guardrail removes "every item the run produced" by the model's ids
            # (with chat completions all __fake_id__): each under the id it got here
            return [
                ThreadItemRemovedEvent(item_id=item_id) for item_id in self._given[event.item_id]
            ]
        return [event]


def _model_named(item: ThreadItem) -> bool:
    """Whether chatkit named `item` after the model's output item (other items, such as a
    workflow carried over from the last turn, have store ids and are meant to be upserted)."""
    return isinstance(item, AssistantMessageItem | ClientToolCallItem)


def _with_id(item: Any, item_id: str) -> Any:
    return item.model_copy(update={"id": item_id})


# chatkit 1.6.5's `process` builds this adapter for every request: about 10 ms of a busy loop
# each, while every open stream's next chunk waits (docs/benchmarks.md#known-limits)
_REQUEST = TypeAdapter[ChatKitReq](ChatKitReq)


class AgentChatKitServer(ChatKitServer[RequestContext]):
    """Runs `agent` for every turn, with the thread's recent items as its input."""

    def __init__(
        self,
        store: ThreadStore,
        agent: Agent[Any],
        run_config: RunConfig,
        *,
        history_items: int,
        max_turns: int,
        metrics: AgentMetrics | None = None,
    ) -> None:
        super().__init__(store)
        self.metrics = metrics or AgentMetrics()
        self.thread_store = store
        self._agent = agent
        self.run_config = run_config
        self._history_items = history_items
        self._max_turns = max_turns
        self._converter = PlainAssistantMessages()

    async def process(
        self, request: str | bytes | bytearray, context: RequestContext
    ) -> StreamingResult | NonStreamingResult:
        """The SDK's `process`, with the request adapter built once (pinned chatkit 1.6.5)."""
        return await self.process_parsed(self.parse(request), context)

    @staticmethod
    def parse(request: str | bytes | bytearray) -> ChatKitReq:
        """The ChatKit request in `request` (pydantic's ValidationError if it is none)."""
        return _REQUEST.validate_json(request)

    async def process_parsed(
        self, parsed: ChatKitReq, context: RequestContext
    ) -> StreamingResult | NonStreamingResult:
        """`process` of a request `parse` read (the HTTP layer counts it by its operation)."""
        if is_streaming_req(parsed):
            return StreamingResult(self._process_streaming(parsed, context))
        return NonStreamingResult(await self._process_non_streaming(parsed, context))

    async def handle_stream_cancelled(
        self, thread: ThreadMetadata, pending_items: list[ThreadItem], context: RequestContext
    ) -> None:
        """Keep the partial answer (the SDK's default), shielded: Starlette cancels the
        response's task when the caller leaves, and anyio's cancellation would otherwise cancel
        these writes too, so nothing was kept."""
        with anyio.CancelScope(shield=True):
            await super().handle_stream_cancelled(thread, pending_items, context)

    async def respond(
        self,
        thread: ThreadMetadata,
        input_user_message: UserMessageItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        # counted inline, not by a wrapping generator: that would add a step to every delta
        started = self.metrics.turn_started()
        result: RunResultStreaming | None = None
        failure: TurnFailure | None = None
        finished = False
        try:
            # the user's message is stored already; after a client tool output, so is the
            # completed call, which the converter sends as function_call + function_call_output
            page = await self.store.load_thread_items(
                thread.id, None, self._history_items, "desc", context
            )
            agent_input = await self._converter.to_agent_input(list(reversed(page.data)))
            agent_context = AgentContext[RequestContext](
                thread=thread, store=self.store, request_context=context
            )
            result = Runner.run_streamed(
                self._agent,
                agent_input,
                context=agent_context,
                run_config=self.run_config,
                max_turns=self._max_turns,
            )

            async def stored(item_id: str) -> bool:
                try:
                    await self.store.load_item(thread.id, item_id, context)
                except NotFoundError:
                    return False
                return True

            ids = _TurnIds(lambda kind: self.store.generate_item_id(kind, thread, context), stored)
            try:
                async for event in stream_agent_response(agent_context, result):
                    for relabelled in await ids.relabel(event):
                        yield relabelled
            except Exception as exc:
                failure = classify_failure(exc, ids.added_messages)
                if failure is None:
                    log.exception("the agent run failed", thread_id=thread.id)
                    failure = _AGENT_FAILED
                else:
                    log.info(
                        "agent turn failed",
                        thread_id=thread.id,
                        reason=failure.reason,
                        kind=failure.kind,
                    )
            finally:
                # the caller left (CancelledError or GeneratorExit here) or the run failed: stop
                # the run, which closes the model request
                if not result.is_complete:
                    result.cancel()
            if failure is not None:
                if failure.reason == INPUT_REFUSED and input_user_message is not None:
                    # a refused message is not part of the conversation: left in the thread, the
                    # model would read it again every later turn
                    yield ThreadItemRemovedEvent(item_id=input_user_message.id)
                yield ClientEffectEvent(name=ERROR_EFFECT, data=failure.effect_data())
                yield ErrorEvent(
                    code="custom", message=failure.message, allow_retry=failure.retryable
                )
                return
            usage = result.context_wrapper.usage
            yield ClientEffectEvent(
                name=USAGE_EFFECT,
                data={
                    "input_tokens": usage.input_tokens,
                    "output_tokens": usage.output_tokens,
                    "total_tokens": usage.total_tokens,
                },
            )
            finished = True
        except Exception as exc:
            # before or after the run (the thread's items, the store): chatkit sends its own
            # error event; counted here under the reason it stands for
            failure = classify_failure(exc, ()) or _AGENT_FAILED
            raise
        finally:
            # failed, or completed with its last event taken; anything else is the caller
            # leaving (CancelledError or GeneratorExit)
            outcome = (
                TurnOutcome.FAILED
                if failure is not None
                else TurnOutcome.COMPLETED
                if finished
                else TurnOutcome.CANCELLED
            )
            # tokens the model reported, whatever the outcome: a failed or withdrawn answer
            # cost them too
            spent = result.context_wrapper.usage if result is not None else None
            self.metrics.turn_ended(
                started,
                outcome,
                failure=failure,
                input_tokens=spent.input_tokens if spent is not None else 0,
                output_tokens=spent.output_tokens if spent is not None else 0,
            )
