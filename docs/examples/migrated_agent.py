"""The sleep coach workflow of `agent_builder_export.py`, in the shape the agent server runs.

    HEALTHAGENT_AGENT=docs.examples.migrated_agent:build_agent

`build_agent()` returns the agent the server runs for every turn, over the thread's stored
history (docs/migrating-from-agent-builder.md walks through each change):

- the Triage classifier and the if/else after it are a router agent with two handoffs: the
  Sleep coach, and the service's built-in health agent for everything else;
- state variables come from the request (MintSession's `state_variables`, carried in the user
  token), with the export's defaults when a request has none;
- the Guardrails nodes are Agents SDK guardrails that check text in plain Python, no model call;
- the approval node is a client tool the app answers, and the tool it guarded checks that answer;
- file search is OpenAI's hosted FileSearchTool only when SLEEP_GUIDE_VECTOR_STORE_ID is set,
  else a function tool over a small local index;
- the `get_sleep_log` stub is the service's `get_health_data` client tool, answered by the app
  from the phone's health data.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import structlog
from agents import (
    Agent,
    FileSearchTool,
    GuardrailFunctionOutput,
    RunContextWrapper,
    StopAtTools,
    Tool,
    TResponseInputItem,
    function_tool,
    input_guardrail,
    output_guardrail,
)
from chatkit.agents import AgentContext, ClientToolCall
from chatkit.types import ClientToolCallItem, UserMessageItem, UserMessageTextContent

from healthagent_service.agent.health_agent import (
    CLIENT_TOOL_NAME,
    build_health_agent,
    get_health_data,
)
from healthagent_service.agent.thread_store import RequestContext

log = structlog.get_logger(__name__)

Context = AgentContext[RequestContext]

# the Start node's state variables and their defaults
STATE_DEFAULTS: dict[str, Any] = {"user_name": "", "sleep_goal_hours": 8}
MAX_NAME_LENGTH = 40
APPROVAL_TOOL_NAME = "request_approval"
VECTOR_STORE_SETTING = "SLEEP_GUIDE_VECTOR_STORE_ID"
# how far back in the thread the approval check and the redaction look
LOOKBACK_ITEMS = 20

# -- state variables ---------------------------------------------------------------------------


def workflow_state(request: RequestContext) -> dict[str, Any]:
    """The workflow's state variables: the defaults, overridden by the ones MintSession put in
    the user's token. A turn forwarded by the service (Chat) carries none."""
    supplied = {k: v for k, v in request.state_variables.items() if k in STATE_DEFAULTS}
    return {**STATE_DEFAULTS, **supplied}


def _user_name(state: dict[str, Any]) -> str:
    # goes into the instructions: only a short, printable name, never a paragraph of text
    name = str(state["user_name"]).strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        return "the user"
    return name


def _sleep_goal_hours(state: dict[str, Any]) -> float:
    try:
        hours = float(state["sleep_goal_hours"])
    except (TypeError, ValueError):
        return float(STATE_DEFAULTS["sleep_goal_hours"])
    return hours if 4 <= hours <= 12 else float(STATE_DEFAULTS["sleep_goal_hours"])


def sleep_coach_instructions(ctx: RunContextWrapper[Context], agent: Agent[Context]) -> str:
    """The export's `sleep_coach_instructions`, reading the state from the request."""
    state = workflow_state(ctx.context.request_context)
    return f"""\
You are a sleep coach in a personal health app. You are talking with {_user_name(state)}, whose
sleep goal is {_sleep_goal_hours(state):g} hours a night.

- Before judging their sleep, call {CLIENT_TOOL_NAME} with metric "sleep" for the days you need.
- Ground advice in search_sleep_guide (or file search) and say where it comes from.
- Never recommend a medicine, supplement or dose: say that is a question for their clinician.
- If they want their plan shared with their care team, call {APPROVAL_TOOL_NAME} first; only
  after they approve, call send_to_care_team with a short summary.
- Keep answers short and practical."""


TRIAGE_INSTRUCTIONS = """\
You route each turn of a health conversation. Read the user's latest message (and a tool result
that follows it, if any) and hand off, without answering yourself:
- questions about sleep, tiredness, bedtime routines or sharing a sleep plan: the Sleep coach;
- anything else: the general health agent."""

# -- tools -------------------------------------------------------------------------------------

# A stand-in for your own index of the documents the vector store held. Replace it with a
# search over your own store (SQLite FTS, PostgreSQL, a vector database).
SLEEP_GUIDE: tuple[dict[str, str], ...] = (
    {
        "title": "Regular schedule",
        "text": "Go to bed and get up at the same times every day, weekends included; a "
        "regular wake time anchors the body clock more than an early bedtime does.",
        "source": "American Academy of Sleep Medicine, healthy sleep habits",
    },
    {
        "title": "Light and screens",
        "text": "Dim the lights and put screens away for the last hour before bed; get "
        "daylight soon after waking.",
        "source": "CDC, tips for better sleep",
    },
    {
        "title": "Caffeine and alcohol",
        "text": "Avoid caffeine in the afternoon and evening, and alcohol close to bedtime: "
        "both fragment sleep even when falling asleep seems easy.",
        "source": "CDC, tips for better sleep",
    },
    {
        "title": "Can't fall asleep",
        "text": "If you are awake for about 20 minutes, get up, do something calm in dim light, "
        "and go back to bed when sleepy.",
        "source": "AASM clinical guideline on behavioural treatment of insomnia (2021)",
    },
    {
        "title": "When to see a clinician",
        "text": "Loud snoring with pauses in breathing, long-lasting insomnia, or daytime "
        "sleepiness that affects driving or work are worth raising with a clinician.",
        "source": "American Academy of Sleep Medicine",
    },
)
_WORD = re.compile(r"[a-z]+")


def search_guide(query: str, limit: int = 3) -> list[dict[str, str]]:
    """The guide's passages that share the most words with `query`, best first."""
    wanted = set(_WORD.findall(query.lower()))
    scored = [
        (len(wanted & set(_WORD.findall(f"{p['title']} {p['text']}".lower()))), index)
        for index, p in enumerate(SLEEP_GUIDE)
    ]
    ranked = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))
    return [SLEEP_GUIDE[index] for _, index in ranked[:limit]]


@function_tool
def search_sleep_guide(query: str) -> str:
    """Search the sleep hygiene guide for passages about a question.

    Args:
        query: what to look for, in a few words.
    """
    return json.dumps({"results": search_guide(query)})


def sleep_guide_tool(vector_store_id: str | None) -> Tool:
    """OpenAI's hosted file search over the export's vector store when one is named (it runs
    only on OpenAI's Responses API, with a key), else the local search."""
    if vector_store_id:
        return FileSearchTool(vector_store_ids=[vector_store_id])
    return search_sleep_guide


@function_tool(name_override=APPROVAL_TOOL_NAME)
async def request_approval(ctx: RunContextWrapper[Context], message: str) -> str:
    """Ask the user to approve an action; their app answers {"approved": true} or false.

    Args:
        message: the question to show the user, naming what will happen.
    """
    # a client tool, like get_health_data: the run stops here (StopAtTools) and the turn ends
    # with a pending call; the app's answer resumes it
    ctx.context.client_tool_call = ClientToolCall(
        name=APPROVAL_TOOL_NAME, arguments={"message": message}
    )
    return "Asked the user."


async def approved_since_last_message(agent_context: Context) -> bool:
    """True when the user approved a `request_approval` after their latest message: the app's
    answer is in the thread, where the model cannot write."""
    page = await agent_context.store.load_thread_items(
        agent_context.thread.id,
        None,
        LOOKBACK_ITEMS,
        "desc",
        agent_context.request_context,
    )
    for item in page.data:
        if isinstance(item, UserMessageItem):
            return False
        if isinstance(item, ClientToolCallItem) and item.name == APPROVAL_TOOL_NAME:
            output = item.output
            return (
                item.status == "completed"
                and isinstance(output, dict)
                and output.get("approved") is True
            )
    return False


@function_tool
async def send_to_care_team(ctx: RunContextWrapper[Context], summary: str) -> str:
    """Send a short summary of the user's sleep plan to their care team. Needs the user's
    approval (request_approval) first.

    Args:
        summary: the plan, in a few sentences.
    """
    if not await approved_since_last_message(ctx.context):
        return json.dumps({"error": "not approved: call request_approval and wait for the answer"})
    # The export's stub. Connect your care-team system here; this example only logs it.
    log.info("care team summary", user=ctx.context.request_context.user, characters=len(summary))
    return json.dumps({"status": "recorded (example agent: nothing was sent)"})


# -- guardrails --------------------------------------------------------------------------------

# The export's input Guardrails node ("Contains PII", blocking US_SSN and CREDIT_CARD).
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
# The export's output Guardrails node ("Custom Prompt Check" for dosing advice).
_DOSE = re.compile(
    r"\b\d+(?:[.,]\d+)?\s*(?:mg|mcg|µg|ml|iu|milligrams?|micrograms?)\b",
    re.IGNORECASE,
)


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def identifiers_in(text: str) -> list[str]:
    """The kinds of identifier in `text`: "US_SSN", "CREDIT_CARD"."""
    found: list[str] = []
    if _SSN.search(text):
        found.append("US_SSN")
    for match in _CARD.finditer(text):
        if _luhn(re.sub(r"[ -]", "", match.group())):
            found.append("CREDIT_CARD")
            break
    return found


def doses_in(text: str) -> list[str]:
    """Every amount with a dose unit in `text` ("5 mg", "0.5mg", "400 IU")."""
    return [match.group() for match in _DOSE.finditer(text)]


def latest_user_text(agent_input: str | list[TResponseInputItem]) -> str:
    """The text of the last user message in the run's input (the thread's history)."""
    if isinstance(agent_input, str):
        return agent_input
    for item in reversed(agent_input):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "input_text"
            )
    return ""


@input_guardrail(run_in_parallel=False)
async def no_identifiers(
    ctx: RunContextWrapper[Context], agent: Agent[Any], agent_input: str | list[TResponseInputItem]
) -> GuardrailFunctionOutput:
    """Refuses a message carrying a social security or payment card number. It runs before the
    model is called (`run_in_parallel=False`), so nothing is sent to the model; and since
    ChatKit stored the message before the run, it is redacted in the thread, or every later
    turn would send it to the model with the rest of the history."""
    found = identifiers_in(latest_user_text(agent_input))
    if found:
        await redact_latest_user_message(ctx.context, found)
    return GuardrailFunctionOutput(output_info={"found": found}, tripwire_triggered=bool(found))


async def redact_latest_user_message(agent_context: Context, found: list[str]) -> None:
    """Replace the text of the thread's latest user message with a note of what it held."""
    store, thread, request = (
        agent_context.store,
        agent_context.thread,
        agent_context.request_context,
    )
    page = await store.load_thread_items(thread.id, None, LOOKBACK_ITEMS, "desc", request)
    for item in page.data:
        if isinstance(item, UserMessageItem):
            note = f"[removed: the message contained {' and '.join(found)}]"
            redacted = item.model_copy(
                update={"content": [UserMessageTextContent(text=note)], "quoted_text": None}
            )
            await store.save_item(thread.id, redacted, request)
            return


@output_guardrail
async def no_dosing_instructions(
    ctx: RunContextWrapper[Context], agent: Agent[Any], output: Any
) -> GuardrailFunctionOutput:
    """Withdraws an answer that names a dose: the coach must not recommend medicines."""
    doses = doses_in(str(output))
    return GuardrailFunctionOutput(output_info={"doses": doses}, tripwire_triggered=bool(doses))


# -- agents ------------------------------------------------------------------------------------


def build_sleep_workflow(
    model: str | None = None, vector_store_id: str | None = None
) -> Agent[Context]:
    """The router and its two agents. `model` goes to all three (None: the Agents SDK's
    default); `vector_store_id` picks hosted file search over the local guide."""
    sleep_coach = Agent[Context](
        name="Sleep coach",
        handoff_description="Sleep, tiredness, bedtime routines, sharing a sleep plan.",
        instructions=sleep_coach_instructions,
        model=model,
        tools=[
            get_health_data,
            sleep_guide_tool(vector_store_id),
            request_approval,
            send_to_care_team,
        ],
        # the two client tools end the turn; the app's answer resumes it
        tool_use_behavior=StopAtTools(stop_at_tool_names=[CLIENT_TOOL_NAME, APPROVAL_TOOL_NAME]),
        output_guardrails=[no_dosing_instructions],
    )
    general = build_health_agent(model).clone(
        handoff_description="Any health question that is not about sleep.",
        output_guardrails=[no_dosing_instructions],
    )
    return Agent[Context](
        name="Triage",
        instructions=TRIAGE_INSTRUCTIONS,
        model=model,
        handoffs=[sleep_coach, general],
        input_guardrails=[no_identifiers],
        # should it answer instead of handing off, its answer is checked too
        output_guardrails=[no_dosing_instructions],
    )


def build_agent() -> Agent[Context]:
    """What HEALTHAGENT_AGENT names. No model named: the agent server runs every agent that
    names none on HEALTHAGENT_AGENT_MODEL."""
    return build_sleep_workflow(
        model=None, vector_store_id=os.environ.get(VECTOR_STORE_SETTING) or None
    )
