"""The benchmark's traffic: realistic events as plain field dicts (cheap to hold, built untimed).

Same shape as ``meterstream.demo.generate_traffic`` (its model mix, workflows and
customer names), but generated in O(1) per event so that 10,000 customers and a
few hundred thousand events take about a second: the demo draws each customer
with ``rng.choices(customers, weights)``, which recomputes the cumulative
weights on every call (O(customers) per event).

- customers: power law (weight ``1 / rank ** 1.3``, as in the demo), and every
  customer sends at least one event, so the run has exactly ``customers``
  active customers (the memory figure is "with N active customers");
- usage events on tokens meters, models drawn from the demo's mix of models in
  the default price book, log-normal token counts, prompt-cache hits;
- a share of non-token meter events (``documents``, a decimal ``quantity``);
- a share of outcome events (``resolved_ticket`` / ``verified_application``);
- a share of resends: the same event (same ``event_id``) sent again a little later.

The SDK benchmark builds the pydantic events from these dicts inside the timed
loop, as an application would; the pre-filled topics get the bytes the SDK
would have produced (``model_dump_json(exclude_none=True)``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from meterstream.demo import MODEL_MIX, WORKFLOWS, customer_ids
from meterstream.schemas.events import Attribution, Meter, OutcomeEvent, UsageEvent

#: Shares of the generated messages (the rest are token events).
OUTCOME_SHARE = 0.08
DOCUMENTS_SHARE = 0.02
DUPLICATE_SHARE = 0.01
#: Events in a pre-filled backlog occurred within this many seconds before generation.
BACKLOG_SECONDS = 1800
POWER = 1.3


@dataclass
class Spec:
    """One message to send: ``kind`` ("usage" | "outcome") and the event's fields."""

    kind: str
    fields: dict[str, Any]

    def build(self, occurred_at: datetime | None = None) -> UsageEvent | OutcomeEvent:
        fields = self.fields if occurred_at is None else {**self.fields, "occurred_at": occurred_at}
        return OutcomeEvent(**fields) if self.kind == "outcome" else UsageEvent(**fields)


@dataclass
class Workload:
    #: Messages in send order; a resend is the same ``Spec`` object appearing twice.
    messages: list[Spec] = field(default_factory=list)
    customers: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.messages)

    @property
    def distinct(self) -> int:
        return len({id(m) for m in self.messages})

    @property
    def duplicates(self) -> int:
        return self.total - self.distinct

    def counts(self) -> dict[str, int]:
        seen: set[int] = set()
        usage = outcomes = documents = 0
        for m in self.messages:
            if id(m) in seen:
                continue
            seen.add(id(m))
            if m.kind == "outcome":
                outcomes += 1
            elif m.fields.get("meter") == Meter.DOCUMENTS:
                documents += 1
            else:
                usage += 1
        return {
            "messages": self.total,
            "distinct_events": len(seen),
            "token_events": usage,
            "document_events": documents,
            "outcome_events": outcomes,
            "resent_duplicates": self.total - len(seen),
            "active_customers": len({m.fields["customer_id"] for m in self.messages}),
        }


def generate(
    messages: int,
    customers: int,
    *,
    seed: int = 7,
    now: datetime | None = None,
    backlog_seconds: float | None = BACKLOG_SECONDS,
) -> Workload:
    """``messages`` messages in total (resends included) from ``customers`` customers.

    ``backlog_seconds``: events occurred uniformly within that many seconds
    before ``now`` (clamped to the current month, so one billing period);
    ``None`` leaves ``occurred_at`` out (the sender stamps it at send time).
    """
    rng = random.Random(seed)
    now = now or datetime.now(timezone.utc)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    names = customer_ids(customers)
    cum_weights = list(itertools.accumulate(1 / (rank + 1) ** POWER for rank in range(len(names))))
    models = list(MODEL_MIX)
    model_cum = list(itertools.accumulate(MODEL_MIX.values()))
    distinct_target = max(1, round(messages / (1 + DUPLICATE_SHARE)))
    # Everyone once (in random order), then the power law.
    order = names[: min(len(names), distinct_target)]
    rng.shuffle(order)
    order += rng.choices(names, cum_weights=cum_weights, k=distinct_target - len(order))
    rng.shuffle(order)

    if backlog_seconds is None:
        earliest = None
    else:
        earliest = max(month_start + timedelta(seconds=1), now - timedelta(seconds=backlog_seconds))
    span = (now - earliest).total_seconds() - 1 if earliest is not None else 0.0

    runs: dict[tuple[str, str], str] = {}
    workload = Workload(customers=names)
    out = workload.messages
    pending_resends: list[tuple[int, int, Spec]] = []  # heap of (position, tiebreak, spec)
    for customer in order:
        workflow = rng.choice(WORKFLOWS)
        run_key = (customer, workflow)
        if run_key not in runs or rng.random() < 0.2:
            runs[run_key] = f"run-{rng.getrandbits(48):012x}"
        common: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "customer_id": customer,
            "workflow_id": workflow,
            "run_id": runs[run_key],
        }
        if earliest is not None:
            common["occurred_at"] = earliest + timedelta(seconds=rng.uniform(0, span))
        roll = rng.random()
        if roll < OUTCOME_SHARE:
            spec = Spec(
                "outcome",
                {
                    **common,
                    "outcome_type": "resolved_ticket" if workflow == "support-agent" else "verified_application",
                    "attribution": Attribution.AI_ONLY if rng.random() < 0.8 else Attribution.HUMAN_ASSISTED,
                },
            )
        elif roll < OUTCOME_SHARE + DOCUMENTS_SHARE:
            spec = Spec(
                "usage",
                {
                    **common,
                    "meter": Meter.DOCUMENTS,
                    "quantity": Decimal(rng.randint(1, 40)),
                    "unit": "page",
                    "attributes": {"environment": "production", "feature": workflow},
                },
            )
        else:
            input_tokens = max(1, int(rng.lognormvariate(math.log(1500), 0.9)))
            spec = Spec(
                "usage",
                {
                    **common,
                    "model": models[_pick(rng.random() * model_cum[-1], model_cum)],
                    "input_tokens": input_tokens,
                    "cached_input_tokens": int(input_tokens * rng.choice((0, 0, 0.3, 0.6))),
                    "output_tokens": max(1, int(rng.lognormvariate(math.log(300), 0.8))),
                    "attributes": {"environment": "production", "feature": workflow},
                },
            )
        out.append(spec)
        if rng.random() < DUPLICATE_SHARE:  # a client retry: the same event again, a little later
            heapq.heappush(pending_resends, (len(out) + rng.randint(1, 2000), len(out), spec))
        while pending_resends and pending_resends[0][0] <= len(out):
            out.append(heapq.heappop(pending_resends)[2])
    out.extend(spec for _, _, spec in sorted(pending_resends))
    return workload


def _pick(x: float, cum: list[int]) -> int:
    for i, c in enumerate(cum):
        if x < c:
            return i
    return len(cum) - 1


def serialize(workload: Workload) -> list[tuple[str, bytes, bytes]]:
    """(kind, key, value) per message: exactly the bytes the SDK produces for each event."""
    cache: dict[int, tuple[str, bytes, bytes]] = {}
    out = []
    for spec in workload.messages:
        item = cache.get(id(spec))
        if item is None:
            event = spec.build()
            item = (spec.kind, event.customer_id.encode(), event.model_dump_json(exclude_none=True).encode())
            cache[id(spec)] = item
        out.append(item)
    return out
