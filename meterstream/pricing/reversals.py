"""Outcome reversals: matched to a billed outcome, at most once, at the price it was billed. Pure.

An outcome event with ``reversal_of`` (a reopened ticket) credits back the
outcome it names. The rules, shared by the worker and the offline commands:

1. **It needs a billed outcome.** ``reversal_of`` must name an outcome of the
   same customer that was rated and stored (not a reversal, and not an event
   that was refused). Otherwise the reversal is refused.
2. **At most once.** An outcome already reversed by another event is not
   reversed again: the second reversal is refused, naming the first. (A resend
   of the same reversal event is a duplicate, deduplicated like any event.)
3. **At the billed price.** The reversal's rated row copies the original's
   outcome type, attribution, plan version (``price_book_version``), credits
   and cost to serve with the sign turned, so the invoice prices it with the
   plan version and attribution that billed the outcome, whatever changed
   since. Only the reversal's own id, time and period are its own.
4. **Not before the outcome.** A reversal that occurred before the outcome it
   names is refused.
5. **Refused, never dropped.** A refused reversal is credited nothing and is
   kept with its reason: the worker sends it to the dead-letter topic (raw
   bytes + reason; ``meterstream dlq replay`` can send it again once its
   outcome has arrived), ``meterstream rate`` reports it on stderr and on the
   invoice of its period (``refused``).

Offline (:func:`match_reversals`) the whole set of events is known, so the
result does not depend on their order: for each outcome the earliest reversal
(by ``occurred_at``, then ``event_id``) is the one accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from meterstream.schemas.events import OutcomeEvent, UsageEvent
from meterstream.schemas.records import RatedUsage

REVERSAL_SUFFIX = ":reversal"


class ReversalRefused(ValueError):
    """A reversal that cannot be credited; the message is the reason kept with it."""


@dataclass(frozen=True)
class RefusedReversal:
    event_id: str
    customer_id: str
    period: str
    reversal_of: str
    reason: str


def is_reversal(row: RatedUsage) -> bool:
    return row.kind == "outcome" and row.rule.endswith(REVERSAL_SUFFIX)


class Reversal(Protocol):
    """What a reversal is matched by: an outcome event, or the rating engine's row of one."""

    @property
    def event_id(self) -> str: ...

    @property
    def customer_id(self) -> str: ...

    @property
    def reversal_of(self) -> str | None: ...


def reverse_billed_outcome(
    reversal: Reversal, rated: RatedUsage, original: RatedUsage | None, reversed_by: str | None
) -> RatedUsage:
    """The rated row of ``reversal`` (rated as ``rated``), or :class:`ReversalRefused` with the reason.

    ``original`` is the billed outcome ``reversal.reversal_of`` names (None if none is
    known); ``reversed_by`` the id of an earlier accepted reversal of it, if any.
    """
    target = reversal.reversal_of or ""
    if original is None or original.kind != "outcome" or original.customer_id != reversal.customer_id:
        raise ReversalRefused(f"reversal_of {target!r}: no billed outcome with that id for customer {reversal.customer_id!r}")
    if is_reversal(original):
        raise ReversalRefused(f"reversal_of {target!r} names a reversal, not an outcome")
    if reversed_by is not None and reversed_by != reversal.event_id:
        raise ReversalRefused(f"outcome {target!r} was already reversed by {reversed_by!r}")
    if rated.occurred_at < original.occurred_at:
        raise ReversalRefused(
            f"reversal at {rated.occurred_at.isoformat()} precedes outcome {target!r} at {original.occurred_at.isoformat()}"
        )
    return original.model_copy(
        update={
            "event_id": rated.event_id,
            "occurred_at": rated.occurred_at,
            "period": rated.period,
            "workflow_id": rated.workflow_id or original.workflow_id,
            "run_id": rated.run_id or original.run_id,
            "credits": -original.credits,
            "cost_to_serve": -original.cost_to_serve,
            "rule": original.rule + REVERSAL_SUFFIX,
            "billed_in": rated.billed_in,
        }
    )


def match_reversals(
    pairs: Iterable[tuple[UsageEvent | OutcomeEvent, RatedUsage]],
    billed: Mapping[tuple[str, str], RatedUsage] | None = None,
) -> tuple[list[RatedUsage], list[RefusedReversal]]:
    """Apply the rules to a whole set of rated events, independently of their order.

    ``billed`` adds outcomes billed before this set, keyed by (customer, event id).
    Returns the rated rows to bill (non-reversals unchanged, accepted reversals at the
    billed price) and the refused reversals with their reasons.
    """
    rows: list[RatedUsage] = []
    reversals: list[tuple[OutcomeEvent, RatedUsage]] = []
    outcomes: dict[tuple[str, str], RatedUsage] = dict(billed or {})
    for event, rated in pairs:
        if isinstance(event, OutcomeEvent) and event.reversal_of:
            reversals.append((event, rated))
            continue
        rows.append(rated)
        if rated.kind == "outcome":
            outcomes[(rated.customer_id, rated.event_id)] = rated
    reversed_by: dict[tuple[str, str], str] = {}
    refused: list[RefusedReversal] = []
    for event, rated in sorted(reversals, key=lambda p: (p[1].occurred_at, p[1].event_id)):
        target = (event.customer_id, event.reversal_of or "")
        try:
            rows.append(reverse_billed_outcome(event, rated, outcomes.get(target), reversed_by.get(target)))
        except ReversalRefused as exc:
            refused.append(RefusedReversal(event.event_id, event.customer_id, rated.period, target[1], str(exc)))
            continue
        reversed_by[target] = event.event_id
    return rows, refused
