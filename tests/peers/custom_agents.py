"""Agents that `HEALTHAGENT_AGENT` names in the tests: a custom one, and one with guardrails."""

from __future__ import annotations

from typing import Any

from agents import (
    Agent,
    GuardrailFunctionOutput,
    RunContextWrapper,
    input_guardrail,
    output_guardrail,
)

CUSTOM_INSTRUCTIONS = "You are the custom sleep coach of the tests."
WITHDRAWN_WORD = "forbidden"
REFUSED_WORD = "refuse-me"

sleep_coach = Agent(name="Sleep coach", instructions=CUSTOM_INSTRUCTIONS)


@output_guardrail
async def no_forbidden_words(
    ctx: RunContextWrapper[Any], agent: Agent[Any], output: Any
) -> GuardrailFunctionOutput:
    """Trips when the answer contains the forbidden word."""
    return GuardrailFunctionOutput(
        output_info="checked", tripwire_triggered=WITHDRAWN_WORD in str(output)
    )


@input_guardrail
async def refuse_marked_messages(
    ctx: RunContextWrapper[Any], agent: Agent[Any], message: Any
) -> GuardrailFunctionOutput:
    """Trips when the user's message carries the refusal marker."""
    return GuardrailFunctionOutput(
        output_info="checked", tripwire_triggered=REFUSED_WORD in str(message)
    )


def guarded_agent() -> Agent[Any]:
    """A zero-argument callable, the other form HEALTHAGENT_AGENT accepts."""
    return Agent(
        name="Guarded",
        instructions="Answer briefly.",
        output_guardrails=[no_forbidden_words],
        input_guardrails=[refuse_marked_messages],
    )


not_an_agent = 42
