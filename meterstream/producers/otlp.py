"""``meterstream otlp``: an OTLP/HTTP trace receiver that meters GenAI spans from applications in any language.

    POST /v1/traces   ExportTraceServiceRequest, protobuf (application/x-protobuf) or JSON (application/json)
    GET  /stats       spans received, metered, without a customer, invalid
    GET  /healthz

Point an OpenTelemetry SDK's OTLP/HTTP exporter (or a Collector's ``otlphttp``
exporter) at ``http://HOST:4318``. Each span becomes what the in-process
processor makes of it (:mod:`meterstream.producers.genai`): the ids are looked up
on the span, then on its ancestors *in the same request* (parents are usually
exported with their children), then on the resource. The response is sent once
the broker has confirmed every event of the request; if it has not (broker
down), the answer is 503 and the exporter retries — safe, since each event id is
derived from its trace and span ids. GenAI spans that cannot be metered (no
customer, invalid) are reported in ``partial_success`` (``rejected_spans`` and
the reasons), as OTLP specifies, and counted in ``/stats``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from pydantic import ValidationError

from meterstream.producers.genai import GenAIMapping, Skipped, SpanUsage, record, span_usage

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: How far up a span's parents the ids are looked for within one request.
MAX_DEPTH = 64


class BadRequest(ValueError):
    pass


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping wants base64 for bytes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id") and isinstance(
                value, str
            ):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise BadRequest(f"{key} is not hex: {value[:40]!r}") from None
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def decode_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadRequest(f"not an ExportTraceServiceRequest: {exc}") from None
    elif content_type == JSON:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"not JSON: {exc}") from None
        _hex_ids_to_base64(data)
        try:
            json_format.ParseDict(data, request, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise BadRequest(f"not an ExportTraceServiceRequest: {exc}") from None
    else:
        raise BadRequest(f"Content-Type must be {PROTOBUF} or {JSON}, not {content_type or 'none'}")
    return request


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind in ("string_value", "bool_value", "int_value", "double_value"):
        return getattr(value, kind)
    return None  # arrays, maps and bytes carry no ids or token counts


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def request_usage(request: ExportTraceServiceRequest, mapping: GenAIMapping) -> Iterator[SpanUsage | Skipped]:
    """The usage (or the reason there is none) of every span of an export request."""
    keys = mapping.inherited_keys
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
        by_id = {span.span_id: (_attributes(span.attributes), span.parent_span_id) for span in spans}
        for span in spans:
            attributes, parent = by_id[span.span_id]
            inherited: dict[str, Any] = {}
            depth = 0
            while parent and parent in by_id and depth < MAX_DEPTH and len(inherited) < len(keys):
                parent_attributes, parent = by_id[parent]
                for key in keys:
                    if key not in inherited and parent_attributes.get(key) not in (None, ""):
                        inherited[key] = parent_attributes[key]
                depth += 1
            yield span_usage(
                attributes,
                trace_id=int.from_bytes(span.trace_id or b"\0", "big"),
                span_id=int.from_bytes(span.span_id or b"\0", "big"),
                end_time_ns=span.end_time_unix_nano,
                mapping=mapping,
                inherited=inherited,
                resource=resource,
            )


class Receiver:
    """Meters the GenAI spans of each export request through one ``MeterClient``."""

    def __init__(self, meter: Any, mapping: GenAIMapping | None = None, flush_timeout: float = 30.0) -> None:
        self.meter = meter
        self.mapping = mapping or GenAIMapping()
        self.flush_timeout = flush_timeout
        self.counts: Counter[str] = Counter()

    def meter_request(self, request: ExportTraceServiceRequest) -> tuple[int, list[str]]:
        """Record the request's GenAI spans; ``(metered, reasons for the spans that could not be)``."""
        metered, problems = 0, []
        for usage in request_usage(request, self.mapping):
            self.counts["spans"] += 1
            if isinstance(usage, SpanUsage):
                try:
                    record(self.meter, usage)
                except (ValidationError, ValueError) as exc:
                    usage = Skipped("invalid", str(exc).splitlines()[0])
                else:
                    metered += 1
                    self.counts["metered"] += 1
                    continue
            if usage.reason != "not_genai":
                self.counts[usage.reason] += 1
                problems.append(f"{usage.reason}: {usage.detail}")
        return metered, problems

    async def handle_traces(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        try:
            export = decode_request(await request.read(), content_type)
        except BadRequest as exc:
            self.counts["bad_requests"] += 1
            return web.json_response({"error": str(exc)}, status=400)
        failed_before = self.meter.failed
        metered, problems = self.meter_request(export)
        if metered:
            remaining = await asyncio.get_running_loop().run_in_executor(None, self.meter.flush, self.flush_timeout)
            if remaining or self.meter.failed > failed_before:
                # The exporter retries a 503; the events' ids make the retry idempotent.
                return web.json_response({"error": "the broker did not confirm the usage events"}, status=503)
        response = ExportTraceServiceResponse()
        if problems:
            response.partial_success.rejected_spans = len(problems)
            distinct = sorted(Counter(problems).items())
            response.partial_success.error_message = "; ".join(f"{n} x {p}" for p, n in distinct)[:1000]
            log.warning("GenAI spans not metered: %s", response.partial_success.error_message)
        if content_type == JSON:
            body = json_format.MessageToJson(response).encode()
        else:
            body = response.SerializeToString()
        return web.Response(body=body, content_type=content_type)

    async def handle_stats(self, _: web.Request) -> web.Response:
        return web.json_response(dict(self.counts))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/traces", self.handle_traces)
        app.router.add_get("/stats", self.handle_stats)
        app.router.add_get("/healthz", _healthz)
        return app


def mapping_from_options(customer: list[str], workflow: list[str], run: list[str]) -> GenAIMapping:
    default = GenAIMapping()
    return GenAIMapping(
        customer_keys=tuple(customer) or default.customer_keys,
        workflow_keys=tuple(workflow) or default.workflow_keys,
        run_keys=tuple(run) or default.run_keys,
    )


def serve(meter: Any, mapping: GenAIMapping, bind: str, port: int) -> None:  # pragma: no cover - CLI loop
    web.run_app(Receiver(meter, mapping).app(), host=bind, port=port, access_log=None, print=None)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})
