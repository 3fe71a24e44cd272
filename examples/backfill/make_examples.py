"""Writes events.jsonl and events.csv: three months (2026-08 to 2026-10) of one team's usage
(the worked example of docs/backfill.md). Deterministic: run it again and
the files are byte-identical.

    python examples/backfill/make_examples.py
"""

import csv
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).parent
MODELS = [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude-sonnet-4-5", "anthropic")]
FIELDS = ["type", "event_id", "customer_id", "occurred_at", "meter", "model", "provider", "input_tokens",
          "cached_input_tokens", "output_tokens", "quantity", "unit", "workflow_id", "run_id",
          "outcome_type", "attribution", "attributes"]


def events() -> list[dict]:
    rng = random.Random(19)
    start = datetime(2026, 8, 1, tzinfo=timezone.utc)
    out = []
    for i in range(120):
        at = start + timedelta(minutes=rng.randrange(0, 92 * 24 * 60))
        customer = rng.choice(["acme", "globex", "initech"])
        model, provider = rng.choice(MODELS)
        prompt = rng.randrange(200, 20_000)
        out.append({"type": "usage", "event_id": f"hist-{i:04d}", "customer_id": customer,
                    "occurred_at": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "meter": "tokens", "model": model,
                    "provider": provider, "input_tokens": prompt, "cached_input_tokens": prompt // 4,
                    "output_tokens": rng.randrange(50, 2_000), "workflow_id": "support-agent",
                    "run_id": f"run-{i // 3:03d}", "attributes": {"source": "backfill"}})
        if i % 3 == 2:
            out.append({"type": "outcome", "event_id": f"hist-outcome-{i:04d}", "customer_id": customer,
                        "occurred_at": (at + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "outcome_type": "resolved_ticket", "attribution": rng.choice(["ai_only", "human_assisted"]),
                        "run_id": f"run-{i // 3:03d}"})
    return sorted(out, key=lambda e: (e["occurred_at"], e["event_id"]))


def main() -> None:
    rows = events()
    with (HERE / "events.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    with (HERE / "events.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            row = dict(row)
            if "attributes" in row:
                row["attributes"] = json.dumps(row["attributes"], separators=(",", ":"))
            writer.writerow(row)


if __name__ == "__main__":
    main()
