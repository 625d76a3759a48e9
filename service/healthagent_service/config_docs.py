"""docs/configuration.md, generated from the settings models in `config`.

Regenerate it with `python -m healthagent_service.config_docs > docs/configuration.md`; a test
fails while the committed file differs from what this prints.
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from healthagent_service.config import Settings, SettingsGroup

REGENERATE = "python -m healthagent_service.config_docs > docs/configuration.md"

_TITLES = {
    "server": "Server",
    "upstream": "Upstream",
    "agent": "Agent server",
    "realtime": "Realtime",
    "sessions": "Upstream sessions",
    "auth": "Authentication",
    "tls": "TLS",
    "limits": "Limits",
    "database": "Database",
    "http": "HTTP listener",
    "emulator": "Emulator",
    "log": "Logging",
    "tuning": "Tuning",
}

_INTRODUCTION = f"""\
# Configuration

<!-- Generated from service/healthagent_service/config.py: do not edit by hand.
     Regenerate with `{REGENERATE}`. -->

Every setting is an environment variable, read once at start-up. Names are not case-sensitive;
a secret set to the empty string counts as unset. A value that is not valid
stops the command before it starts, with exit status 2 and a line naming the variable, e.g.
`healthagent: invalid setting HEALTHAGENT_WORKERS: Input should be less than or equal to 256`.
`serve --listen`, `serve --workers` and `serve --http` override HEALTHAGENT_LISTEN,
HEALTHAGENT_WORKERS and HEALTHAGENT_HTTP_LISTEN; `agent --listen` overrides
HEALTHAGENT_AGENT_LISTEN.

In the code, the settings are one typed model a group (`settings.server.listen`,
`settings.auth.jwks_url`, ...): `healthagent_service.config.Settings`.
"""

_OTHER_VARIABLES = """\
## Other variables

These are read but are not settings:

- `HEALTHAGENT_TOKEN`: the default `--token` of `healthagent chat` and `healthagent mint`.
- `HEALTHAGENT_SUPERVISOR_PID`: set by `serve` in the environment of its workers and of its agent
  child, which end when that process does; not to be set by hand.
"""


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        remaining = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(remaining) == 1:
            return remaining[0]
    return annotation


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _constraints(field: FieldInfo) -> list[str]:
    lower: str | None = None
    upper: str | None = None
    notes: list[str] = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            lower = f">= {_number(item.ge)}"
        elif isinstance(item, annotated_types.Gt):
            lower = f"> {_number(item.gt)}"
        elif isinstance(item, annotated_types.Le):
            upper = f"<= {_number(item.le)}"
        elif isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            notes.append("not empty")
        elif getattr(item, "pattern", None):
            notes.append(f"matching `{item.pattern}`")
    if lower and upper and lower.startswith(">="):
        return [f"{lower[3:]} to {upper[3:]}", *notes]
    return [bound for bound in (lower, upper) if bound] + notes


def _type(field: FieldInfo) -> str:
    annotation = _without_none(field.annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        kind = " | ".join(f"`{member.value}`" for member in annotation)
    elif get_origin(annotation) is list:
        kind = "JSON list"
    else:
        names = {str: "string", int: "integer", float: "number", bool: "boolean"}
        names |= {Path: "path", SecretStr: "secret"}
        kind = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return ", ".join([kind, *_constraints(field)])


def _default(name: str, field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{_number(value)}`"
    if isinstance(value, int) and name.endswith("_bytes") and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    if isinstance(value, int) and name.endswith("_bytes") and value % 1024 == 0:
        return f"`{value}` ({value // 1024} KiB)"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _group_section(attribute: str, model: type[SettingsGroup]) -> str:
    lines = [
        f"## {_TITLES.get(attribute, attribute.title())} (`settings.{attribute}`)",
        "",
        " ".join((model.__doc__ or "").split()),
        "",
        "| Variable | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in model.model_fields.items():
        cells = [
            f"`{field.alias}`",
            _cell(_type(field)),
            _cell(_default(name, field)),
            _cell(field.description or ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def configuration_markdown() -> str:
    """The text of docs/configuration.md."""
    sections = [_INTRODUCTION]
    sections += [_group_section(name, model) for name, model in Settings.groups().items()]
    sections.append(_OTHER_VARIABLES)
    return "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(configuration_markdown())
