"""Which agent the server runs: the built-in one, or `HEALTHAGENT_AGENT=package.module:attr`."""

from __future__ import annotations

import importlib
from typing import Any

from agents import Agent

from healthagent_service.agent.health_agent import build_health_agent


class AgentLoadError(ValueError):
    """HEALTHAGENT_AGENT does not name an agent; the message says what it names instead."""


def load_agent(spec: str | None, model: str | None) -> Agent[Any]:
    """The agent `spec` names (`package.module:attribute`: an `agents.Agent`, or a callable
    taking no arguments that returns one), or the built-in health agent when `spec` is None.

    `model` (HEALTHAGENT_AGENT_MODEL) is the built-in agent's; agents that name none get it
    from the model provider (`model.DefaultModelProvider`).
    """
    if spec is None:
        return build_health_agent(model)
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise AgentLoadError(
            f"HEALTHAGENT_AGENT must look like 'package.module:attribute', got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentLoadError(f"HEALTHAGENT_AGENT: cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AgentLoadError(
                f"HEALTHAGENT_AGENT: {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(target, Agent) and callable(target):
        target = target()
    if not isinstance(target, Agent):
        raise AgentLoadError(
            f"HEALTHAGENT_AGENT: {spec!r} is a {type(target).__name__}, not an agents.Agent "
            "or a function returning one"
        )
    agent: Agent[Any] = target
    return agent
