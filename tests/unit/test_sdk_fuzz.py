"""Property-based fuzzing of the SDK: any input is recorded or refused with a ValidationError.

Nothing else may escape `record_usage`, and whatever it produces must decode on
the worker's side as an event (never as an exception). No broker: the producer
points at a closed port and only queues.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meterstream.config import KafkaSettings
from meterstream.producers import MeterClient
from meterstream.stream_processors.decode import Rejection, decode_event

produced: list[bytes] = []


class Capture(MeterClient):
    def _produce(self, topic, key, value, event_id, customer_id):
        produced.append(value)


CLIENT = Capture(KafkaSettings(bootstrap_servers="127.0.0.1:1"))

text = st.text(max_size=300)  # includes lone surrogates, which are not valid UTF-8
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True), text,
)  # fmt: skip
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=30)  # fmt: skip
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(text, st.sampled_from(["gpt-4o", "no-such-model", ""])),
        "meter": st.one_of(st.sampled_from(["tokens", "requests", "documents", "nope"]), nested),
        "input_tokens": st.one_of(st.integers(-5, 10**10), nested),
        "output_tokens": st.one_of(st.integers(-5, 10**10), nested),
        "cached_input_tokens": st.integers(-5, 10**9),
        "quantity": st.one_of(st.decimals(allow_nan=True), st.floats(), st.integers(-10, 10**13), text),
        "attributes": st.one_of(st.dictionaries(text, nested, max_size=40), nested),
        "occurred_at": st.one_of(
            st.datetimes(timezones=st.just(timezone.utc), min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)),
            st.datetimes(), text,
        ),  # fmt: skip
        "workflow_id": st.one_of(text, nested),
        "event_id": text,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(customer=st.one_of(text, st.just("acme")), extra=fields)
def test_any_input_is_recorded_or_refused_with_a_reason(customer, extra):
    produced.clear()
    try:
        event = CLIENT.record_usage(customer, **extra)
    except ValidationError as exc:
        assert exc.error_count() > 0 and str(exc)  # the reason names what is wrong
        assert produced == []
        return
    [value] = produced
    decoded = decode_event(value, "usage")
    # Accepted by the SDK: the worker reads back the same event, unless time moved it too far.
    if isinstance(decoded, Rejection):
        assert "future" in decoded.reason and event.occurred_at > datetime.now(timezone.utc) - timedelta(minutes=1)
    else:
        assert decoded == event
        assert not (isinstance(decoded.quantity, float) and math.isnan(decoded.quantity))
