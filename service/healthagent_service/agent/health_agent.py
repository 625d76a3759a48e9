"""The built-in health agent: careful instructions, one client tool, two server tools.

- `get_health_data(metric, days)` is a client tool: the app answers it from the phone's health
  store. The run stops there; the turn ends with a pending `client_tool_call`, and the app's
  answer (`Chat` with `tool_output`, or ChatKit's `threads.add_client_tool_output`) resumes it.
- `lookup_reference_range(metric)` and `calculate_bmi(weight_kg, height_cm)` run here: reference
  figures the model should not recite from memory, and arithmetic it should not do in its head.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from agents import Agent, RunContextWrapper, StopAtTools, function_tool
from chatkit.agents import AgentContext, ClientToolCall

CLIENT_TOOL_NAME = "get_health_data"

HealthMetric = Literal[
    "steps",
    "heart_rate",
    "resting_heart_rate",
    "sleep",
    "weight",
    "blood_pressure",
    "blood_glucose",
    "oxygen_saturation",
    "active_energy",
]

INSTRUCTIONS = """\
You are HealthAgent, a careful and friendly health assistant inside a personal health app.

How you work:
- You are not a doctor and you do not diagnose, prescribe or change treatment. Say so plainly
  when a question needs a clinician, and encourage the user to talk to one.
- If the user describes signs of an emergency (chest pain or pressure, trouble breathing, signs
  of a stroke such as face drooping, arm weakness or slurred speech, severe bleeding, thoughts of
  harming themselves or others, fainting), tell them at once to call their local emergency
  number or go to the nearest emergency department, before anything else.
- When the answer depends on the user's own measurements, call get_health_data for the metric
  and the number of days you need; never invent or guess measurements.
- Compare measurements with reference ranges from lookup_reference_range, and use
  calculate_bmi for body-mass index, rather than figures from memory.
- Explain in plain language, briefly. Say what is within the usual range, what is not, and what
  the user could do or ask a clinician about. Mention when a single reading or a few days of
  data cannot support a conclusion.
- Respect privacy: do not ask for more personal information than the question needs.
"""

# Typical adult reference figures, with where they come from; the model quotes these rather
# than its own memory. Not individual medical advice: the instructions say so.
REFERENCE_RANGES: dict[str, dict[str, str]] = {
    "resting_heart_rate": {
        "range": "60-100 beats per minute for most adults at rest",
        "note": "Trained athletes are often lower (40-60). Persistently above 100 or below 50 "
        "with dizziness or fainting deserves a clinician's attention.",
        "source": "American Heart Association",
    },
    "heart_rate": {
        "range": "60-100 beats per minute at rest; during exercise it rises with effort",
        "note": "A rough maximum is 220 minus age; moderate exercise is 50-70% of it.",
        "source": "American Heart Association",
    },
    "blood_pressure": {
        "range": "normal below 120/80 mmHg; elevated 120-129 and below 80; stage 1 "
        "hypertension 130-139 or 80-89; stage 2 at or above 140/90",
        "note": "Above 180/120 is a hypertensive crisis: seek care at once, urgently with "
        "symptoms such as chest pain, shortness of breath or vision changes.",
        "source": "2017 ACC/AHA guideline",
    },
    "sleep": {
        "range": "7 or more hours a night for adults 18-60; 7-9 hours for most adults",
        "note": "Regular timing matters as well as length; loud snoring with daytime "
        "sleepiness is worth raising with a clinician.",
        "source": "American Academy of Sleep Medicine; National Sleep Foundation",
    },
    "steps": {
        "range": "no official target; about 7,000-10,000 steps a day is linked with lower "
        "mortality in adults, with most of the benefit by about 8,000",
        "note": "Guidelines count activity, not steps: 150-300 minutes of moderate activity "
        "a week.",
        "source": "WHO physical activity guidelines; Paluch et al., Lancet Public Health 2022",
    },
    "oxygen_saturation": {
        "range": "95-100% at sea level for healthy adults",
        "note": "Below 92% at rest, or a sudden drop, needs prompt medical advice; wrist "
        "sensors read less accurately than clinical pulse oximeters.",
        "source": "British Thoracic Society; FDA guidance on pulse oximeters",
    },
    "blood_glucose": {
        "range": "fasting 70-99 mg/dL (3.9-5.5 mmol/L) is normal; 100-125 mg/dL suggests "
        "prediabetes; 126 mg/dL or above on two tests suggests diabetes",
        "note": "Below 70 mg/dL is low; below 54 mg/dL needs treatment at once.",
        "source": "American Diabetes Association Standards of Care",
    },
    "weight": {
        "range": "a body-mass index of 18.5-24.9 kg/m2 is the usual healthy range for adults",
        "note": "BMI does not tell muscle from fat; waist size and trends add context. An "
        "unexplained loss of more than 5% in 6-12 months deserves a clinician's attention.",
        "source": "World Health Organization",
    },
    "active_energy": {
        "range": "no single target; it depends on body size and activity",
        "note": "Trends over weeks say more than single days.",
        "source": "general guidance",
    },
}


@function_tool(name_override=CLIENT_TOOL_NAME)
async def get_health_data(
    ctx: RunContextWrapper[AgentContext[Any]], metric: HealthMetric, days: int
) -> str:
    """Read the user's own measurements from their phone's health data.

    Args:
        metric: which measurement to read.
        days: how many days back to read, 1 to 90.
    """
    # Answered by the app, not here: the run stops at this tool (StopAtTools) and the turn
    # ends with a pending client tool call that the app's output completes.
    ctx.context.client_tool_call = ClientToolCall(
        name=CLIENT_TOOL_NAME, arguments={"metric": metric, "days": max(1, min(90, days))}
    )
    return "Requested from the user's device."


@function_tool
def lookup_reference_range(metric: HealthMetric) -> str:
    """Typical adult reference range for a health metric, with a note and its source.

    Args:
        metric: the measurement to look up.
    """
    found = REFERENCE_RANGES.get(metric)
    if found is None:
        return json.dumps({"metric": metric, "error": "no reference range for this metric"})
    return json.dumps({"metric": metric, **found})


@function_tool
def calculate_bmi(weight_kg: float, height_cm: float) -> str:
    """Body-mass index from weight and height, with its WHO adult category.

    Args:
        weight_kg: body weight in kilograms.
        height_cm: height in centimetres.
    """
    if not (20 <= weight_kg <= 500 and 50 <= height_cm <= 272):
        return json.dumps({"error": "weight or height out of the plausible adult range"})
    bmi = weight_kg / (height_cm / 100) ** 2
    if bmi < 18.5:
        category = "underweight"
    elif bmi < 25:
        category = "healthy weight"
    elif bmi < 30:
        category = "overweight"
    else:
        category = "obesity"
    return json.dumps({"bmi": round(bmi, 1), "category": category, "source": "WHO"})


def build_health_agent(model: str | None = None) -> Agent[AgentContext[Any]]:
    """The default agent (`HEALTHAGENT_AGENT` unset)."""
    return Agent[AgentContext[Any]](
        name="HealthAgent",
        instructions=INSTRUCTIONS,
        model=model,
        tools=[get_health_data, lookup_reference_range, calculate_bmi],
        tool_use_behavior=StopAtTools(stop_at_tool_names=[CLIENT_TOOL_NAME]),
    )
