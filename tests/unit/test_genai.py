"""GenAI span attributes -> usage: the mapping the span processor and `meterstream otlp` share (no processes)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from meterstream.producers.genai import GenAIMapping, Skipped, SpanUsage, span_usage
from meterstream.producers.llm import usage_from_anthropic, usage_from_openai

END = 1_764_590_400_123_456_789  # 2025-12-01T12:00:00.123456789Z
MAPPING = GenAIMapping()


def _usage(attributes, **kw):
    return span_usage(attributes, trace_id=0xABC, span_id=0x12, end_time_ns=END, mapping=MAPPING, **kw)


def test_an_openai_span_gives_what_the_openai_helper_reads_from_the_same_usage():
    usage = {"prompt_tokens": 1200, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 400}}
    got = _usage({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                  "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 1200,
                  "gen_ai.usage.output_tokens": 300, "gen_ai.usage.cache_read.input_tokens": 400,
                  "meterstream.customer_id": "acme"})  # fmt: skip
    assert isinstance(got, SpanUsage)
    want = usage_from_openai(usage)
    assert (got.input_tokens, got.output_tokens, got.cached_input_tokens) == (
        want.input_tokens, want.output_tokens, want.cached_input_tokens)  # fmt: skip
    assert got.model == "gpt-4o"  # the requested name (a price book's key), not the dated snapshot
    assert got.customer_id == "acme"
    assert got.fields == {"event_id": "otel-00000000000000000000000000000abc-0000000000000012",
                          "occurred_at": datetime(2025, 12, 1, 12, 0, 0, 123456, tzinfo=timezone.utc),
                          "provider": "openai"}  # fmt: skip


def test_an_anthropic_span_reporting_input_without_the_cache_is_normalised_like_the_helper():
    usage = {"input_tokens": 50, "output_tokens": 700, "cache_read_input_tokens": 9000,
             "cache_creation_input_tokens": 1000}  # fmt: skip
    got = _usage({"gen_ai.system": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
                  "gen_ai.usage.input_tokens": 50, "gen_ai.usage.output_tokens": 700,
                  "gen_ai.usage.cache_read_input_tokens": 9000, "gen_ai.usage.cache_creation_input_tokens": 1000,
                  "meterstream.customer_id": "acme"})  # fmt: skip
    want = usage_from_anthropic(usage)
    assert (got.input_tokens, got.output_tokens, got.cached_input_tokens) == (10_050, 700, 9000) == (
        want.input_tokens, want.output_tokens, want.cached_input_tokens)  # fmt: skip
    assert got.fields["provider"] == "anthropic"


def test_ids_come_from_the_span_then_what_it_inherits_then_the_resource():
    attributes = {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1, "gen_ai.usage.output_tokens": 1}
    got = _usage(attributes, inherited={"meterstream.customer_id": "parent", "meterstream.run_id": "r1"},
                 resource={"meterstream.customer_id": "resource", "meterstream.workflow_id": "wf"})  # fmt: skip
    assert (got.customer_id, got.fields["run_id"], got.fields["workflow_id"]) == ("parent", "r1", "wf")
    got = _usage({**attributes, "meterstream.customer_id": "own"}, inherited={"meterstream.customer_id": "parent"})
    assert got.customer_id == "own"
    custom = GenAIMapping(customer_keys=("tenant.id", "enduser.id"))
    got = span_usage({**attributes, "enduser.id": "u-1"}, trace_id=1, span_id=2, end_time_ns=END, mapping=custom)
    assert got.customer_id == "u-1"


def test_a_span_without_a_customer_is_never_guessed():
    got = _usage({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 10,
                  "enduser.id": "someone"}, resource={"service.name": "bot"})  # fmt: skip
    assert got == Skipped("no_customer", "none of meterstream.customer_id is set")


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"http.method": "POST"}, "not_genai"),
        ({"gen_ai.request.model": "gpt-4o", "gen_ai.operation.name": "chat"}, "not_genai"),  # failed call: no usage
        ({"gen_ai.usage.input_tokens": 10, "meterstream.customer_id": "a"}, "invalid"),  # no model
        ({"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": "ten", "meterstream.customer_id": "a"}, "invalid"),
    ],
)
def test_spans_that_are_not_metered(attributes, reason):
    got = _usage(attributes)
    assert isinstance(got, Skipped) and got.reason == reason


def test_otlp_json_int64_strings_are_token_counts():
    got = _usage({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": "12",
                  "gen_ai.usage.output_tokens": "3", "meterstream.customer_id": "acme"})  # fmt: skip
    assert (got.input_tokens, got.output_tokens) == (12, 3)


def test_otlp_json_request_decodes_hex_ids_and_inherits_from_parents_in_the_request():
    from meterstream.producers.otlp import JSON, decode_request, request_usage

    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "meterstream.workflow_id", "value": {"stringValue": "wf"}}]},
        "scopeSpans": [{"spans": [
            {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "name": "handle",
             "startTimeUnixNano": "1", "endTimeUnixNano": "2",
             "attributes": [{"key": "meterstream.customer_id", "value": {"stringValue": "acme"}}]},
            {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b173",
             "parentSpanId": "eee19b7ec3c1b174", "name": "chat gpt-4o",
             "startTimeUnixNano": "1", "endTimeUnixNano": "1764590400000000000",
             "attributes": [{"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}},
                            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "100"}},
                            {"key": "gen_ai.usage.output_tokens", "value": {"intValue": 20}}]},
        ]}],
    }]}  # fmt: skip
    request = decode_request(json.dumps(body).encode(), JSON)
    results = list(request_usage(request, MAPPING))
    assert results[0] == Skipped("not_genai")
    usage = results[1]
    assert (usage.customer_id, usage.model, usage.input_tokens, usage.output_tokens) == ("acme", "gpt-4o", 100, 20)
    assert usage.fields["event_id"] == "otel-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b173"
    assert usage.fields["workflow_id"] == "wf"
    assert usage.fields["occurred_at"] == datetime(2025, 12, 1, 12, 0, tzinfo=timezone.utc)
