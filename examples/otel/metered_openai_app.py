"""Worked example: an OpenAI app metered with no metering code at its call sites.

The OpenTelemetry SDK with the official OpenAI instrumentation traces each call;
MeteringSpanProcessor turns every GenAI span into a usage event for the customer
named on an enclosing span. The model is a local stub (httpx.MockTransport), so the
example runs without an API key; drop `http_client=` to call the real API.

    METERSTREAM_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/otel/metered_openai_app.py

Prints one line per metered event and the processor's counts.
"""

from __future__ import annotations

import httpx
import openai
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from meterstream.producers import MeterClient
from meterstream.producers.otel import MeteringSpanProcessor


def stub_model(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1764590400, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Refund issued."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}})  # fmt: skip


def main() -> dict[str, int]:
    provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    client = openai.OpenAI(api_key="sk-example", http_client=httpx.Client(transport=httpx.MockTransport(stub_model)))
    tracer = provider.get_tracer("support-bot")
    with MeterClient() as meter:
        processor = MeteringSpanProcessor(meter)
        provider.add_span_processor(processor)
        for customer, ticket in [("acme", "T-1"), ("acme", "T-2"), ("globex", "T-3")]:
            ids = {"meterstream.customer_id": customer, "meterstream.workflow_id": "support-agent",
                   "meterstream.run_id": ticket}  # fmt: skip
            with tracer.start_as_current_span("handle-ticket", attributes=ids):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": ticket}])
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "no customer"}])
        processor.force_flush()
    instrumentor.uninstrument()
    provider.shutdown()
    print(f"metered {processor.counts['metered']} spans; {processor.counts['no_customer']} without a customer (not billed)")
    return dict(processor.counts)


if __name__ == "__main__":
    main()
