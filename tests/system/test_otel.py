"""OpenTelemetry GenAI metering on the real broker and worker.

The real opentelemetry-sdk and the real OpenAI instrumentation
(opentelemetry-instrumentation-openai-v2) trace calls of the real openai client,
whose HTTP goes to a stub model (httpx.MockTransport: no network). Each GenAI span
becomes a usage event equal, byte for byte, to the one MeterClient's
record_openai_usage produces for the same usage, ids and time.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
import pytest
from google.protobuf import json_format
from opentelemetry import baggage, context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meterstream.producers import MeterClient
from meterstream.producers.genai import event_id_for
from meterstream.producers.otel import MeteringSpanProcessor
from meterstream.schemas.events import UsageEvent
from tests.servers import free_port

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
CHAT_USAGE = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}
EMBED_USAGE = {"prompt_tokens": 64, "total_tokens": 64}


def _stub_model(request: httpx.Request) -> httpx.Response:
    """What api.openai.com answers, for a chat completion and an embedding."""
    body = json.loads(request.content)
    if request.url.path.endswith("/chat/completions"):
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1764590400, "model": body["model"] + "-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Done."}, "finish_reason": "stop"}],
            "usage": CHAT_USAGE})  # fmt: skip
    return httpx.Response(200, json={
        "object": "list", "model": body["model"], "usage": EMBED_USAGE,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})  # fmt: skip


def _client() -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(_stub_model)))  # fmt: skip


def _traffic(provider: TracerProvider) -> None:
    """Three calls for two customers, and one with no customer anywhere."""
    client = _client()
    tracer = provider.get_tracer("support-bot")
    ids = {"meterstream.customer_id": "acme", "meterstream.workflow_id": "support-agent", "meterstream.run_id": "run-7"}
    with tracer.start_as_current_span("handle-ticket", attributes=ids):
        with tracer.start_as_current_span("plan"):  # ids reach grandchildren too
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        client.embeddings.create(model="text-embedding-3-small", input="refund policy")
    token = context.attach(baggage.set_baggage("meterstream.customer_id", "globex"))
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    finally:
        context.detach(token)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "anonymous"}])


def _expected(meter: MeterClient, spans) -> list[UsageEvent]:
    """What the SDK helper produces for the same usage, ids and times."""
    events = []
    for span in spans:
        attrs = span.attributes
        if "gen_ai.usage.input_tokens" not in attrs:
            continue
        ctx = span.get_span_context()
        chat = attrs["gen_ai.request.model"] == "gpt-4o-mini"
        customer = "acme" if span.parent is not None else ("globex" if len(events) == 2 else None)
        if customer is None:
            continue
        extra = {"workflow_id": "support-agent", "run_id": "run-7"} if customer == "acme" else {}
        end = span.end_time
        at = datetime.fromtimestamp(end // 10**9, tz=timezone.utc).replace(microsecond=(end // 1000) % 10**6)
        events.append(meter.record_openai_usage(customer, attrs["gen_ai.request.model"],
                                                CHAT_USAGE if chat else EMBED_USAGE,
                                                event_id=event_id_for(ctx.trace_id, ctx.span_id),
                                                occurred_at=at, **extra))  # fmt: skip
    return events


def _events_on(pipeline, expected: int) -> list[UsageEvent]:
    messages = pipeline.read_topic(pipeline.topics.usage.name, expected)
    return sorted((UsageEvent.model_validate_json(m.value()) for m in messages), key=lambda e: e.event_id)


def _stored_tokens(pipeline, customer: str, period: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-m", "meterstream.cli", "usage", "--period", period, "--customer",
                           customer, "--json", "--no-spend"], env={**pipeline.env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    return int(row["input_tokens"]), int(row["output_tokens"])


@pytest.fixture
def instrumented():
    provider = TracerProvider(resource=Resource.create({"service.name": "support-bot"}))
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield provider, spans
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_span_processor_meters_instrumented_openai_calls(pipeline_factory, instrumented):
    provider, spans = instrumented
    pipeline = pipeline_factory()
    meter = MeterClient(pipeline.kafka)
    unmetered = []
    processor = MeteringSpanProcessor(meter, on_unmetered=lambda span, why: unmetered.append((span.name, why.reason)))
    provider.add_span_processor(processor)
    _traffic(provider)
    assert processor.force_flush()
    meter.close()

    assert processor.counts == {"metered": 3, "no_customer": 1}
    assert unmetered == [("chat gpt-4o-mini", "no_customer")]
    # The same events through the SDK helper, sent to a topic of their own.
    reference = pipeline.kafka.model_copy(update={"topic_prefix": pipeline.kafka.topic_prefix + "ref."})
    with MeterClient(reference) as helper_meter:
        expected = sorted(_expected(helper_meter, spans.get_finished_spans()), key=lambda e: e.event_id)
    got = _events_on(pipeline, 3)
    assert got == expected
    assert [e.wire_bytes() for e in got] == [e.wire_bytes() for e in expected]
    assert {(e.customer_id, e.model, e.provider) for e in got} == {
        ("acme", "gpt-4o-mini", "openai"), ("acme", "text-embedding-3-small", "openai"),
        ("globex", "gpt-4o-mini", "openai")}  # fmt: skip

    # ...and the worker rates and stores them like any other event.
    pipeline.wait_processed(3)
    period = got[0].period
    assert _stored_tokens(pipeline, "acme", period) == (1200 + 64, 300)
    assert _stored_tokens(pipeline, "globex", period) == (1200, 300)


def _to_otlp_json(message) -> bytes:
    """OTLP/JSON as other languages' SDKs send it: protobuf JSON with hex trace and span ids."""
    data = json_format.MessageToDict(message)

    def hexify(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId"):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for item in node:
                hexify(item)

    hexify(data)
    return json.dumps(data).encode()


def test_otlp_receiver_meters_protobuf_and_json_exports(pipeline_factory, instrumented, tmp_path):
    provider, spans = instrumented
    pipeline = pipeline_factory()
    port = free_port()
    log = (tmp_path / "otlp.log").open("w")
    receiver = subprocess.Popen([sys.executable, "-m", "meterstream.cli", "otlp", "--port", str(port)],
                                env=pipeline.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and receiver.poll() is None, (tmp_path / "otlp.log").read_text()
            time.sleep(0.2)

        # protobuf, through the real OTLP/HTTP exporter
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        _traffic(provider)
        finished = spans.get_finished_spans()
        reference = pipeline.kafka.model_copy(update={"topic_prefix": pipeline.kafka.topic_prefix + "ref."})
        with MeterClient(reference) as helper_meter:
            expected = sorted(_expected(helper_meter, finished), key=lambda e: e.event_id)
        # SimpleSpanProcessor exports span by span, children before their parents: no GenAI
        # span has its customer in its request (baggage does not travel in OTLP), none is metered
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()
        assert stats["spans"] == len(finished) and stats["no_customer"] == 4 and "metered" not in stats

        # JSON: the whole trace in one request, as a batching exporter sends it (parents included)
        body = _to_otlp_json(encode_spans(finished))
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/traces", content=body,
                            headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
        assert answer.status_code == 200, answer.text
        partial = json.loads(answer.text)["partialSuccess"]
        assert int(partial["rejectedSpans"]) == 2 and "no_customer" in partial["errorMessage"]

        # a protobuf export of the same batch: same events (same ids), a proto response
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/traces", content=encode_spans(finished).SerializeToString(),
                            headers={"Content-Type": "application/x-protobuf"}, timeout=30)  # fmt: skip
        assert answer.status_code == 200
        response = ExportTraceServiceResponse()
        response.ParseFromString(answer.content)
        assert response.partial_success.rejected_spans == 2

        bad = httpx.post(f"http://127.0.0.1:{port}/v1/traces", content=b"{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400
    finally:
        receiver.terminate()
        receiver.wait(30)
        log.close()

    # Span by span (SimpleSpanProcessor) the acme spans had no parent in their request and
    # baggage does not travel in OTLP, so only the batch exports could meter them; every
    # event is the helper's event, and a span exported three times is one event per id.
    got = _events_on(pipeline, len(expected))
    distinct = {e.event_id: e for e in got}
    assert sorted(distinct.values(), key=lambda e: e.event_id) == [e for e in expected if e.customer_id == "acme"]
    pipeline.wait_processed(len(got))
    assert _stored_tokens(pipeline, "acme", expected[0].period) == (1200 + 64, 300)


def test_worked_example_runs(pipeline_factory):
    pipeline = pipeline_factory()
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "otel" / "metered_openai_app.py")],
                          env=pipeline.env, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "metered 3 spans; 1 without a customer" in done.stdout
    got = _events_on(pipeline, 3)
    assert sorted((e.customer_id, e.run_id, e.input_tokens, e.output_tokens) for e in got) == [
        ("acme", "T-1", 1200, 300), ("acme", "T-2", 1200, 300), ("globex", "T-3", 1200, 300)]  # fmt: skip
    pipeline.wait_processed(3)
    assert _stored_tokens(pipeline, "acme", got[0].period) == (2400, 600)
