# An Agent Builder "export to code" file, as users hold them (Agent Builder shut down on
# 2026-11-30): the sleep coach workflow that docs/migrating-from-agent-builder.md migrates to
# migrated_agent.py. Kept as exported apart from this comment and ruff's formatting (exports
# are indented by two spaces); the workflow and vector store ids are made up.
#
# It is a picture, not a program: it imports `guardrails` (the openai-guardrails package, not
# installed here), so nothing imports it and mypy skips it (pyproject.toml).
#
# The workflow: Start (state variables user_name, sleep_goal_hours) -> Guardrails (PII,
# jailbreak) -> Triage (classifier) -> If/else on its category -> Sleep coach (sleep log, file
# search) -> Guardrails (dosing check) -> User approval -> Care team summary; else General
# health.

from types import SimpleNamespace

from agents import (
    Agent,
    FileSearchTool,
    ModelSettings,
    RunConfig,
    RunContextWrapper,
    Runner,
    TResponseInputItem,
    function_tool,
    trace,
)
from guardrails.runtime import instantiate_guardrails, load_config_bundle, run_guardrails
from openai import AsyncOpenAI
from openai.types.shared.reasoning import Reasoning
from pydantic import BaseModel


# Tool definitions
@function_tool
def get_sleep_log(days: int):
    pass


@function_tool
def send_to_care_team(summary: str):
    pass


file_search = FileSearchTool(vector_store_ids=["vs_68f3a1c2e4b08191a5d2c7e9f0b1a2c3"])
# Shared client for guardrails and file search
client = AsyncOpenAI()
ctx = SimpleNamespace(guardrail_llm=client)
# Guardrails definitions
guardrails_config = {
    "guardrails": [
        {
            "name": "Contains PII",
            "config": {"block": True, "entities": ["CREDIT_CARD", "US_SSN"]},
        },
        {"name": "Jailbreak", "config": {"model": "gpt-5-nano", "confidence_threshold": 0.7}},
    ]
}
guardrails1_config = {
    "guardrails": [
        {
            "name": "Custom Prompt Check",
            "config": {
                "model": "gpt-5-nano",
                "confidence_threshold": 0.7,
                "system_prompt_details": "Flag any answer that recommends a medicine, a "
                "supplement or a dose.",
            },
        }
    ]
}
# Guardrails utils


def guardrails_has_tripwire(results):
    return any(getattr(r, "tripwire_triggered", False) is True for r in (results or []))


def get_guardrail_checked_text(results, fallback_text):
    for r in results or []:
        info = getattr(r, "info", None) or {}
        if isinstance(info, dict) and ("checked_text" in info):
            return info.get("checked_text") or fallback_text
    return fallback_text


def build_guardrail_fail_output(results):
    failures = []
    for r in results or []:
        if getattr(r, "tripwire_triggered", False):
            info = getattr(r, "info", None) or {}
            failure = {
                "guardrail_name": info.get("guardrail_name"),
            }
            for key in ("flagged", "confidence", "threshold", "detected_entities"):
                if key in (info or {}):
                    failure[key] = info.get(key)
            failures.append(failure)
    return {"failed": len(failures) > 0, "failures": failures}


class TriageSchema(BaseModel):
    category: str


triage = Agent(
    name="Triage",
    instructions="""Classify the user's message. Answer with category "sleep" for questions
about sleep, tiredness or bedtime routines, and "general" for anything else.""",
    model="gpt-5-nano",
    output_type=TriageSchema,
    model_settings=ModelSettings(store=True, reasoning=Reasoning(effort="minimal", summary="auto")),
)


class SleepCoachContext:
    def __init__(self, state_user_name: str, state_sleep_goal_hours: float):
        self.state_user_name = state_user_name
        self.state_sleep_goal_hours = state_sleep_goal_hours


def sleep_coach_instructions(
    run_context: RunContextWrapper[SleepCoachContext], _agent: Agent[SleepCoachContext]
):
    state_user_name = run_context.context.state_user_name
    state_sleep_goal_hours = run_context.context.state_sleep_goal_hours
    return f"""You are a sleep coach in a personal health app. You are talking with \
{state_user_name}, whose sleep goal is {state_sleep_goal_hours} hours a night.

- Before judging their sleep, call get_sleep_log for the days you need.
- Ground advice in the sleep hygiene guide (file search) and say where it comes from.
- Never recommend a medicine, supplement or dose: say that is a question for their clinician.
- Keep answers short and practical."""


sleep_coach = Agent(
    name="Sleep coach",
    instructions=sleep_coach_instructions,
    model="gpt-5",
    tools=[get_sleep_log, file_search],
    model_settings=ModelSettings(store=True, reasoning=Reasoning(effort="low", summary="auto")),
)


general_health = Agent(
    name="General health",
    instructions="""You are a careful health assistant. You are not a doctor: say when a
question needs a clinician, and tell the user to call their local emergency number at once if
they describe signs of an emergency.""",
    model="gpt-5-mini",
    model_settings=ModelSettings(store=True, reasoning=Reasoning(effort="low", summary="auto")),
)


care_team_summary = Agent(
    name="Care team summary",
    instructions="""Summarize the sleep plan from the conversation in three sentences for the
user's care team, and send it with send_to_care_team.""",
    model="gpt-5-mini",
    tools=[send_to_care_team],
    model_settings=ModelSettings(store=True, reasoning=Reasoning(effort="low", summary="auto")),
)


def approval_request(message: str):
    # TODO: Implement
    return True


class WorkflowInput(BaseModel):
    input_as_text: str


# Main code entrypoint
async def run_workflow(workflow_input: WorkflowInput):
    with trace("Sleep coach"):
        state = {"user_name": "", "sleep_goal_hours": 8}
        workflow = workflow_input.model_dump()
        conversation_history: list[TResponseInputItem] = [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": workflow["input_as_text"]}],
            }
        ]
        guardrails_inputtext = workflow["input_as_text"]
        guardrails_result = await run_guardrails(
            ctx,
            guardrails_inputtext,
            "text/plain",
            instantiate_guardrails(load_config_bundle(guardrails_config)),
            suppress_tripwire=True,
            raise_guardrail_errors=True,
        )
        guardrails_hastripwire = guardrails_has_tripwire(guardrails_result)
        guardrails_anonymizedtext = get_guardrail_checked_text(
            guardrails_result, guardrails_inputtext
        )
        guardrails_output = (
            guardrails_hastripwire and build_guardrail_fail_output(guardrails_result or [])
        ) or (guardrails_anonymizedtext or guardrails_inputtext)
        if guardrails_hastripwire:
            return guardrails_output
        else:
            triage_result_temp = await Runner.run(
                triage,
                input=[*conversation_history],
                run_config=RunConfig(
                    trace_metadata={
                        "__trace_source__": "agent-builder",
                        "workflow_id": "wf_68f3a0b7c1d48190b2e5f6a7c8d9e0f10a1b2c3d4e5f6a7b",
                    }
                ),
            )

            conversation_history.extend(
                [item.to_input_item() for item in triage_result_temp.new_items]
            )

            triage_result = {
                "output_text": triage_result_temp.final_output.json(),
                "output_parsed": triage_result_temp.final_output.model_dump(),
            }
            if triage_result["output_parsed"]["category"] == "sleep":
                sleep_coach_result_temp = await Runner.run(
                    sleep_coach,
                    input=[*conversation_history],
                    run_config=RunConfig(
                        trace_metadata={
                            "__trace_source__": "agent-builder",
                            "workflow_id": "wf_68f3a0b7c1d48190b2e5f6a7c8d9e0f10a1b2c3d4e5f6a7b",
                        }
                    ),
                    context=SleepCoachContext(
                        state_user_name=state["user_name"],
                        state_sleep_goal_hours=state["sleep_goal_hours"],
                    ),
                )

                conversation_history.extend(
                    [item.to_input_item() for item in sleep_coach_result_temp.new_items]
                )

                sleep_coach_result = {"output_text": sleep_coach_result_temp.final_output_as(str)}
                guardrails_inputtext = sleep_coach_result["output_text"]
                guardrails_result = await run_guardrails(
                    ctx,
                    guardrails_inputtext,
                    "text/plain",
                    instantiate_guardrails(load_config_bundle(guardrails1_config)),
                    suppress_tripwire=True,
                    raise_guardrail_errors=True,
                )
                guardrails_hastripwire = guardrails_has_tripwire(guardrails_result)
                guardrails_anonymizedtext = get_guardrail_checked_text(
                    guardrails_result, guardrails_inputtext
                )
                guardrails_output = (
                    guardrails_hastripwire and build_guardrail_fail_output(guardrails_result or [])
                ) or (guardrails_anonymizedtext or guardrails_inputtext)
                if guardrails_hastripwire:
                    return guardrails_output
                else:
                    approval_message = "Share this sleep plan with your care team?"

                    if approval_request(approval_message):
                        care_team_summary_result_temp = await Runner.run(
                            care_team_summary,
                            input=[*conversation_history],
                            run_config=RunConfig(
                                trace_metadata={
                                    "__trace_source__": "agent-builder",
                                    "workflow_id": (
                                        "wf_68f3a0b7c1d48190b2e5f6a7c8d9e0f10a1b2c3d4e5f6a7b"
                                    ),
                                }
                            ),
                        )

                        conversation_history.extend(
                            [
                                item.to_input_item()
                                for item in care_team_summary_result_temp.new_items
                            ]
                        )

                        care_team_summary_result = {
                            "output_text": care_team_summary_result_temp.final_output_as(str)
                        }
                        return care_team_summary_result
                    else:
                        return sleep_coach_result
            else:
                general_health_result_temp = await Runner.run(
                    general_health,
                    input=[*conversation_history],
                    run_config=RunConfig(
                        trace_metadata={
                            "__trace_source__": "agent-builder",
                            "workflow_id": "wf_68f3a0b7c1d48190b2e5f6a7c8d9e0f10a1b2c3d4e5f6a7b",
                        }
                    ),
                )

                conversation_history.extend(
                    [item.to_input_item() for item in general_health_result_temp.new_items]
                )

                general_health_result = {
                    "output_text": general_health_result_temp.final_output_as(str)
                }
                return general_health_result
