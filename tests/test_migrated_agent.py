"""The migrated Agent Builder example (docs/examples/migrated_agent.py), piece by piece: the agent
`HEALTHAGENT_AGENT` loads, its guardrails on real text, its state variables, its approval gate
over a real thread store."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from agents import Agent, FileSearchTool, FunctionTool, RunContextWrapper, TResponseInputItem
from agents.tool_context import ToolContext
from chatkit.agents import AgentContext
from chatkit.types import (
    ClientToolCallItem,
    InferenceOptions,
    ThreadMetadata,
    UserMessageItem,
    UserMessageTextContent,
)

from docs.examples import migrated_agent
from docs.examples.migrated_agent import (
    APPROVAL_TOOL_NAME,
    Context,
    approved_since_last_message,
    build_agent,
    build_sleep_workflow,
    no_dosing_instructions,
    no_identifiers,
    request_approval,
    sleep_coach_instructions,
)
from healthagent_service.agent.database import SqliteDatabase
from healthagent_service.agent.health_agent import CLIENT_TOOL_NAME
from healthagent_service.agent.loading import load_agent
from healthagent_service.agent.thread_store import RequestContext, ThreadStore

SPEC = "docs.examples.migrated_agent:build_agent"


@asynccontextmanager
async def agent_context(request: RequestContext | None = None) -> AsyncIterator[Context]:
    """An AgentContext as the agent server builds one, on a real thread store in a temporary
    SQLite file, with one saved thread."""
    request = request or RequestContext("alice", "service")
    with tempfile.TemporaryDirectory() as directory:
        database = SqliteDatabase(Path(directory) / "agent.db")
        await database.open()
        try:
            store = ThreadStore(database)
            thread = ThreadMetadata(id=store.generate_thread_id(request), created_at=datetime.now())
            await store.save_thread(thread, request)
            yield AgentContext[RequestContext](thread=thread, store=store, request_context=request)
        finally:
            await database.close()


async def add_user_message(context: Context, text: str) -> UserMessageItem:
    """Store a user message in the context's thread, as ChatKit does before a turn."""
    store, thread, request = context.store, context.thread, context.request_context
    item = UserMessageItem(
        id=store.generate_item_id("message", thread, request),
        thread_id=thread.id,
        created_at=datetime.now(),
        content=[UserMessageTextContent(text=text)],
        attachments=[],
        inference_options=InferenceOptions(),
    )
    await store.add_thread_item(thread.id, item, request)
    return item


def _sub_agents(triage: Agent[Any]) -> dict[str, Agent[Any]]:
    agents = {h.name: h for h in triage.handoffs if isinstance(h, Agent)}
    assert len(agents) == len(triage.handoffs)
    return agents


def _tool_names(agent: Agent[Any]) -> set[str]:
    return {tool.name for tool in agent.tools}


def _user_message(text: str) -> TResponseInputItem:
    # what chatkit's converter makes of a stored user message
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def test_build_agent_is_what_the_agent_server_loads() -> None:
    agent = build_agent()
    assert isinstance(agent, Agent) and agent.name == "Triage"
    # the server takes the same spec; no agent names a model, so HEALTHAGENT_AGENT_MODEL
    # (the model provider's default) runs them all
    loaded = load_agent(SPEC, "gpt-test")
    assert isinstance(loaded, Agent) and loaded.name == "Triage" and loaded.model is None
    assert all(sub.model is None for sub in _sub_agents(loaded).values())
    # a router: no tools, two handoffs, both answering agents guarded
    assert agent.tools == []
    sub_agents = _sub_agents(agent)
    assert set(sub_agents) == {"Sleep coach", "HealthAgent"}
    assert [g.get_name() for g in agent.input_guardrails] == ["no_identifiers"]
    assert not agent.input_guardrails[0].run_in_parallel  # checked before the model is called
    for guarded in (agent, *sub_agents.values()):
        assert guarded.output_guardrails == [no_dosing_instructions]


def test_the_sleep_coach_has_the_client_tools_and_stops_at_them() -> None:
    coach = _sub_agents(build_sleep_workflow())["Sleep coach"]
    assert _tool_names(coach) == {
        CLIENT_TOOL_NAME,
        "search_sleep_guide",
        APPROVAL_TOOL_NAME,
        "send_to_care_team",
    }
    assert coach.tool_use_behavior == {"stop_at_tool_names": [CLIENT_TOOL_NAME, APPROVAL_TOOL_NAME]}
    general = _sub_agents(build_sleep_workflow())["HealthAgent"]
    assert CLIENT_TOOL_NAME in _tool_names(general)  # the built-in agent, guarded


def test_file_search_is_hosted_only_when_a_vector_store_is_named() -> None:
    coach = _sub_agents(build_sleep_workflow(vector_store_id="vs_sleep_guide"))["Sleep coach"]
    hosted = [tool for tool in coach.tools if isinstance(tool, FileSearchTool)]
    assert len(hosted) == 1 and hosted[0].vector_store_ids == ["vs_sleep_guide"]
    assert "search_sleep_guide" not in _tool_names(coach)


def test_the_model_reaches_every_agent() -> None:
    triage = build_sleep_workflow(model="gpt-test")
    assert triage.model == "gpt-test"
    assert {a.model for a in _sub_agents(triage).values()} == {"gpt-test"}


async def test_the_output_guardrail_withdraws_a_dose_and_passes_advice() -> None:
    async with agent_context() as context:
        ctx = RunContextWrapper(context)
        agent = build_agent()
        tripped = await no_dosing_instructions.run(
            ctx, agent, "Try 0.5 mg of melatonin an hour before bed."
        )
        assert tripped.output.tripwire_triggered
        assert tripped.output.output_info == {"doses": ["0.5 mg"]}
        passed = await no_dosing_instructions.run(
            ctx, agent, "Keep the same wake time every day, and dim the lights after 9 pm."
        )
        assert not passed.output.tripwire_triggered


async def test_the_input_guardrail_refuses_identifiers_in_the_latest_message() -> None:
    async with agent_context() as context:
        ctx = RunContextWrapper(context)
        agent = build_agent()

        async def trips(*messages: str) -> bool:
            history = [_user_message(text) for text in messages]
            result = await no_identifiers.run(agent, history, ctx)
            return result.output.tripwire_triggered

        assert await trips("my card is 4111 1111 1111 1111, can you store it?")
        assert await trips("My SSN is 123-45-6789.")
        assert not await trips("I slept 6 hours; my step count was 1234567890123.")
        # the next message is judged on its own
        assert not await trips("My SSN is 123-45-6789.", "How much sleep do I need?")


async def test_a_refused_message_is_redacted_in_the_thread() -> None:
    async with agent_context() as context:
        earlier = await add_user_message(context, "I go to bed at 11.")
        refused = await add_user_message(context, "Card 4111-1111-1111-1111 and SSN 123-45-6789")
        history = [_user_message("I go to bed at 11."), _user_message(refused.content[0].text)]
        result = await no_identifiers.run(build_agent(), history, RunContextWrapper(context))
        assert result.output.tripwire_triggered
        assert result.output.output_info == {"found": ["US_SSN", "CREDIT_CARD"]}
        page = await context.store.load_thread_items(
            context.thread.id, None, 10, "asc", context.request_context
        )
        texts = {
            item.id: item.content[0].text for item in page.data if isinstance(item, UserMessageItem)
        }
        assert texts == {
            earlier.id: "I go to bed at 11.",
            refused.id: "[removed: the message contained US_SSN and CREDIT_CARD]",
        }


async def test_instructions_read_the_state_variables_of_the_request() -> None:
    agent = build_agent()
    token_request = RequestContext(
        "alice", "token", {"user_name": "Sam", "sleep_goal_hours": 7.5, "other": "x"}
    )
    async with agent_context(token_request) as context:
        text = sleep_coach_instructions(RunContextWrapper(context), agent)
        assert "talking with Sam, whose\nsleep goal is 7.5 hours" in text
    # a Chat turn (forwarded by the service) carries none: the export's defaults
    async with agent_context() as context:
        text = sleep_coach_instructions(RunContextWrapper(context), agent)
        assert "talking with the user, whose\nsleep goal is 8 hours" in text
    odd = RequestContext("alice", "token", {"user_name": "x" * 200, "sleep_goal_hours": "lots"})
    async with agent_context(odd) as context:
        text = sleep_coach_instructions(RunContextWrapper(context), agent)
        assert "talking with the user, whose\nsleep goal is 8 hours" in text


async def test_request_approval_is_a_client_tool_call() -> None:
    async with agent_context() as context:
        arguments = json.dumps({"message": "Share your sleep plan with your care team?"})
        tool_context = ToolContext(
            context, tool_name=APPROVAL_TOOL_NAME, tool_call_id="call_1", tool_arguments=arguments
        )
        assert isinstance(request_approval, FunctionTool)
        await request_approval.on_invoke_tool(tool_context, arguments)
        call = context.client_tool_call
        assert call is not None and call.name == APPROVAL_TOOL_NAME
        assert call.arguments == {"message": "Share your sleep plan with your care team?"}


async def test_sending_needs_the_users_approval_after_their_latest_message() -> None:
    async with agent_context() as context:
        store, thread, request = context.store, context.thread, context.request_context

        await add_user_message(context, "Please share my plan with my care team.")
        assert not await approved_since_last_message(context)
        call = ClientToolCallItem(
            id=store.generate_item_id("tool_call", thread, request),
            thread_id=thread.id,
            created_at=datetime.now(),
            call_id="call_1",
            name=APPROVAL_TOOL_NAME,
            arguments={"message": "Share?"},
        )
        await store.add_thread_item(thread.id, call, request)
        assert not await approved_since_last_message(context)  # pending
        declined = call.model_copy(update={"status": "completed", "output": {"approved": False}})
        await store.save_item(thread.id, declined, request)
        assert not await approved_since_last_message(context)
        approved = call.model_copy(update={"status": "completed", "output": {"approved": True}})
        await store.save_item(thread.id, approved, request)
        assert await approved_since_last_message(context)
        # an approval answers one request: a later message needs a new one
        await add_user_message(context, "And share it again next week.")
        assert not await approved_since_last_message(context)


def test_the_local_guide_search_ranks_by_shared_words() -> None:
    results = migrated_agent.search_guide("caffeine in the evening")
    assert results and results[0]["title"] == "Caffeine and alcohol"
    assert migrated_agent.search_guide("zzzz") == []
