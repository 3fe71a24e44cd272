"""JSON Schema for each event, so services in other languages produce the same wire format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.records import BudgetAlert, DeadLetter, EnforcementState

EXPORTED: dict[str, type[BaseModel]] = {
    "usage_event": UsageEvent,
    "outcome_event": OutcomeEvent,
    "budget_alert": BudgetAlert,
    "dead_letter": DeadLetter,
    "enforcement_state": EnforcementState,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Schemas of the JSON as it travels (``mode="serialization"`` for records we emit)."""
    out = {}
    for name, model in EXPORTED.items():
        mode: Literal["validation", "serialization"] = (
            "validation" if model in (UsageEvent, OutcomeEvent) else "serialization"
        )
        schema = model.model_json_schema(mode=mode)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://meterstream.dev/schemas/{name}.schema.json"
        out[name] = schema
    return out


def export_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
