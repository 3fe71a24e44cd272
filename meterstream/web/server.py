"""``meterstream serve``: the customer-visible usage page and its read-only JSON API.

Every ``/api/`` request carries ``Authorization: Bearer <token>``; the token
resolves to one customer (:mod:`meterstream.web.tokens`) and every query binds
that customer server-side. Routes:

    GET /                                              the page (static HTML + JS, no build step)
    GET /healthz                                       liveness, no data
    GET /api/v1/me                                     the token's customer, the current period
    GET /api/v1/customers/{id}/usage?days=30&bucket=day|hour
    GET /api/v1/customers/{id}/budget                  month-to-date vs budget (its own unit), thresholds, projection
    GET /api/v1/customers/{id}/enforcement             ok | warn | downgrade | block (the worker's decision)
    GET /api/v1/customers/{id}/invoice?period=current|previous   the invoice (preview) as `invoice --json`
    GET /api/v1/customers/{id}/invoices                issued invoices of closed periods (newest first)
    GET /api/v1/customers/{id}/breakdown               usage by model and by workflow, this period vs the last

A token may expire (401 afterwards) and may be limited to some meters: such a token
reads usage and the breakdown of those meters only, and gets 403 for the money and
budget routes (invoice, invoices, budget, enforcement), which cover every meter.

A missing or unknown token is 401; a customer id other than the token's is 403,
whether or not that customer exists. Tokens never reach a log: the access log
records method, path (no query string) and status only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from meterstream.budgets import BudgetBook, BudgetBookError, load_budgets
from meterstream.clock import utc_now
from meterstream.config import Settings
from meterstream.periods import previous_period
from meterstream.pricing.invoice import InvoiceError
from meterstream.pricing.plans import Catalog, PlanError, load_catalog
from meterstream.producers.guard import EnforcementView
from meterstream.storage.clickhouse import StoreError
from meterstream.topics import Topics
from meterstream.web.invoices import bound_runner, invoice_for, invoice_json, issued_invoices
from meterstream.web.store import CustomerQueries, Rows
from meterstream.web.tokens import ReloadingTokenBook, TokenFileError, TokenGrant, TokenLookup
from meterstream.web.views import (
    breakdown_view,
    burn_down_view,
    dec,
    enforcement_view,
    iso,
    sql_time,
    usage_view,
    usage_window,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
API_PREFIX = "/api/"

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
TOKENS: web.AppKey[TokenLookup] = web.AppKey("tokens")
QUERIES: web.AppKey[Rows] = web.AppKey("queries")
BUDGETS: web.AppKey[BudgetBook] = web.AppKey("budgets")
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog")
#: The worker's decisions from the compacted enforcement-state topic (None: not followed).
DECISIONS: web.AppKey[dict[str, Any] | None] = web.AppKey("decisions")
#: The customer the request's token resolved to; set before any /api/ handler runs.
CUSTOMER: web.RequestKey[str] = web.RequestKey("customer_id")
#: What the token grants: its expiry and meter scope.
GRANT: web.RequestKey[TokenGrant] = web.RequestKey("grant")

SECURITY_HEADERS = {
    # The page loads its own script and style only, and talks only to this server.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class WebError(RuntimeError):
    """The server cannot start: a setting or file is missing or invalid."""


def utcnow() -> datetime:
    return utc_now()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _unauthorized(description: str, error: str | None = None) -> web.Response:
    challenge = 'Bearer realm="meterstream"' + (f', error="{error}"' if error else "")
    return _json({"error": description}, status=401, headers={"WWW-Authenticate": challenge})


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the customer from the token before any /api/ handler runs."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    token = _bearer_token(request)
    if token is None:
        return _unauthorized("an API token is required: Authorization: Bearer <token>")
    tokens = request.app[TOKENS]
    grant_for = getattr(tokens, "grant_for", None)
    if grant_for is not None:
        grant = grant_for(token)
    else:
        customer_only = tokens.customer_for(token)
        grant = TokenGrant(customer_only) if customer_only is not None else None
    if grant is None:
        return _unauthorized("the API token is not valid", error="invalid_token")
    if grant.expired(request.app[CLOCK]()):
        return _unauthorized("the API token has expired", error="invalid_token")
    request[CUSTOMER] = grant.customer
    request[GRANT] = grant
    try:
        return await handler(request)
    except StoreError as exc:
        log.warning("store unavailable for %s %s: %s", request.method, request.path, exc)
        return _json({"error": "usage data is unavailable right now; try again shortly"}, status=503)


def _own_customer(request: web.Request) -> str:
    """The token's customer, if the path names it; 403 for any other id, existing or not."""
    customer = request[CUSTOMER]
    if request.match_info["customer_id"] != customer:
        raise web.HTTPForbidden(
            text=orjson.dumps({"error": "this token does not grant access to that customer"}).decode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
    return customer


def _money_scope(request: web.Request) -> str:
    """The token's customer, for routes that show money or whole-budget figures: not for meter-scoped tokens."""
    customer = _own_customer(request)
    if request[GRANT].meters is not None:
        raise web.HTTPForbidden(
            text=orjson.dumps({"error": "this token is limited to some meters: it cannot read invoices or budgets"}).decode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
    return customer


def _meters(request: web.Request) -> str:
    meters = request[GRANT].meters
    return ",".join(sorted(meters)) if meters is not None else ""


def _period(request: web.Request, customer: str, now: datetime) -> str:
    """The customer's current billing period (an anniversary customer's starts on its anchor day)."""
    return request.app[CATALOG].billing_period(customer, now)


async def _billing(request: web.Request, customer: str, work: Callable[[Callable[..., Any]], Any]) -> Any:
    """Run billing code (synchronous, saved queries through ``run``) in a thread, bound to ``customer``."""
    run = bound_runner(request.app[QUERIES], customer, asyncio.get_running_loop(), request.app[SETTINGS].web.query_timeout)
    try:
        return await asyncio.to_thread(work, run)
    except (InvoiceError, PlanError) as exc:
        raise web.HTTPConflict(
            text=orjson.dumps({"error": f"no invoice can be computed: {exc}"}).decode(), content_type="application/json"
        ) from None


async def me(request: web.Request) -> web.Response:
    settings: Settings = request.app[SETTINGS]
    now = request.app[CLOCK]()
    grant = request[GRANT]
    return _json(
        {
            "customer_id": request[CUSTOMER],
            "period": _period(request, request[CUSTOMER], now),
            "show_cost_to_serve": settings.web.show_cost_to_serve,
            "default_days": min(settings.web.default_days, settings.web.max_days),
            "max_days": settings.web.max_days,
            "max_hourly_days": settings.web.max_hourly_days,
            "meters": sorted(grant.meters) if grant.meters is not None else None,
            "token_expires": grant.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if grant.expires is not None else None,
        }
    )


async def usage(request: web.Request) -> web.Response:
    customer = _own_customer(request)
    web_settings = request.app[SETTINGS].web
    requested = request.query.get("bucket", "day")
    if requested not in ("day", "hour"):
        return _json({"error": "bucket must be day or hour"}, status=400)
    bucket: Literal["day", "hour"] = "hour" if requested == "hour" else "day"
    try:
        days = int(request.query.get("days", min(web_settings.default_days, web_settings.max_days)))
    except ValueError:
        return _json({"error": "days must be a whole number"}, status=400)
    limit = web_settings.max_hourly_days if bucket == "hour" else web_settings.max_days
    if not 1 <= days <= limit:
        return _json({"error": f"days must be between 1 and {limit} for {bucket}ly buckets"}, status=400)
    window = usage_window(request.app[CLOCK](), days, bucket)
    queries: Rows = request.app[QUERIES]
    rows = await queries(
        "customer_usage_series", customer, bucket=bucket, since=sql_time(window.since), until=sql_time(window.until),
        meters=_meters(request),
    )  # fmt: skip
    view = usage_view(customer, window, rows, show_cost=web_settings.show_cost_to_serve)
    view["days"] = days
    return _json(view)


async def budget(request: web.Request) -> web.Response:
    customer = _money_scope(request)
    now = request.app[CLOCK]()
    period = _period(request, customer, now)
    start, end = request.app[CATALOG].billing_bounds(customer, period)
    queries: Rows = request.app[QUERIES]
    rows = await queries(
        "customer_usage_series", customer, bucket="day", since=sql_time(start), until=sql_time(end), meters=""
    )
    view = burn_down_view(
        customer, period, now, rows, request.app[BUDGETS].for_customer(customer),
        show_cost=request.app[SETTINGS].web.show_cost_to_serve, currency=request.app[CATALOG].currency,
        bounds=(start, end),
    )  # fmt: skip
    return _json(view)


async def invoice(request: web.Request) -> web.Response:
    customer = _money_scope(request)
    now = request.app[CLOCK]()
    which = request.query.get("period", "current")
    if which not in ("current", "previous"):
        return _json({"error": "period must be current or previous"}, status=400)
    period = _period(request, customer, now)
    period = period if which == "current" else previous_period(period)
    catalog = request.app[CATALOG]
    result = await _billing(request, customer, lambda run: invoice_for(run, catalog, customer, period, now))
    body = invoice_json(result)
    if not request.app[SETTINGS].web.show_cost_to_serve:  # cost to serve and margin reveal ours
        body["usage"] = {k: v for k, v in body["usage"].items() if k not in ("cost_to_serve", "margin")}
        body["by_meter"] = [{k: v for k, v in m.items() if k != "cost_to_serve"} for m in body["by_meter"]]
    return _json(body)


async def invoices(request: web.Request) -> web.Response:
    customer = _money_scope(request)
    now = request.app[CLOCK]()
    catalog = request.app[CATALOG]
    issued = await _billing(request, customer, lambda run: issued_invoices(run, catalog, customer, now))
    return _json({
        "customer_id": customer,
        "source": "closed periods, computed by the invoice engine as issued",
        "invoices": [
            {"period": inv.period, "status": inv.status, "plan_id": inv.plan_id, "plan_version": inv.plan_version,
             "currency": inv.currency, "total": invoice_json(inv)["total"], "lines": len(inv.lines)}
            for inv in issued
        ],
    })  # fmt: skip


async def breakdown(request: web.Request) -> web.Response:
    customer = _own_customer(request)
    period = _period(request, customer, request.app[CLOCK]())
    previous = previous_period(period)
    queries: Rows = request.app[QUERIES]
    meters = _meters(request)
    this, last = await asyncio.gather(
        queries("customer_usage_breakdown", customer, period=period, meters=meters),
        queries("customer_usage_breakdown", customer, period=previous, meters=meters),
    )
    view = breakdown_view(customer, period, previous, this, last, show_cost=request.app[SETTINGS].web.show_cost_to_serve)
    return _json(view)


async def enforcement(request: web.Request) -> web.Response:
    customer = _money_scope(request)
    period = _period(request, customer, request.app[CLOCK]())
    queries: Rows = request.app[QUERIES]
    alerts = await queries("customer_budget_alerts", customer, period=period)
    view = enforcement_view(customer, period, alerts)
    decisions = request.app.get(DECISIONS)
    decided = decisions.get(customer) if decisions is not None else None
    if decided is not None and decided.period == period:
        # The worker's own decision, as SDK guards see it, replaces the one derived from alerts.
        view.update(
            state=decided.decision.value,
            derived_from="enforcement-state",
            note="The worker's current decision from the enforcement-state topic, as SDK guards see it.",
            reason=decided.reason,
            remaining_credits=None if decided.remaining_credits is None else dec(decided.remaining_credits),
            since=iso(decided.updated_at),  # to the second, UTC, like every time the API gives
        )
    return _json(view)


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def api_not_found(request: web.Request) -> web.Response:
    return _json({"error": "no such API route"}, status=404)


def create_app(
    settings: Settings,
    tokens: TokenLookup,
    queries: Rows,
    budgets: BudgetBook,
    clock: Callable[[], datetime] = utcnow,
    decisions: dict[str, Any] | None = None,
    catalog: Catalog | None = None,
) -> web.Application:
    app = web.Application(middlewares=[security_headers, authenticate])
    app[CATALOG] = catalog if catalog is not None else load_catalog(settings.worker.plans_file)
    app[DECISIONS] = decisions
    app[SETTINGS] = settings
    app[TOKENS] = tokens
    app[QUERIES] = queries
    app[BUDGETS] = budgets
    app[CLOCK] = clock
    customer_path = "/api/v1/customers/{customer_id:.+}"
    app.router.add_get("/", page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/me", me)
    app.router.add_get(f"{customer_path}/usage", usage)
    app.router.add_get(f"{customer_path}/budget", budget)
    app.router.add_get(f"{customer_path}/enforcement", enforcement)
    app.router.add_get(f"{customer_path}/invoice", invoice)
    app.router.add_get(f"{customer_path}/invoices", invoices)
    app.router.add_get(f"{customer_path}/breakdown", breakdown)
    app.router.add_get("/api/{tail:.*}", api_not_found)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, append_version=False)
    return app


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Method, path and status: never the query string or headers (where a token could be)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.1f ms", request.remote, request.method, request.path, response.status, time * 1000
        )


def serve(settings: Settings, *, port: int | None = None, bind: str | None = None) -> None:
    """Run the server until SIGINT or SIGTERM."""
    web_settings = settings.web
    if web_settings.tokens_file is None:
        raise WebError("set METERSTREAM_WEB__TOKENS_FILE to the tokens file (see meterstream/web/tokens.py)")
    try:
        tokens = ReloadingTokenBook(web_settings.tokens_file)
        catalog = load_catalog(settings.worker.plans_file)
        budgets = load_budgets(settings.worker.budgets_file, catalog)
    except (TokenFileError, BudgetBookError, PlanError) as exc:
        raise WebError(str(exc)) from None
    queries = CustomerQueries(settings.clickhouse, web_settings.query_timeout)
    # Follow the worker's decisions (the same local view SDK guards keep).
    view = EnforcementView(settings.kafka, Topics.from_settings(settings.kafka).enforcement.name).start()
    app = create_app(settings, tokens, queries, budgets, decisions=view.states, catalog=catalog)

    async def close_queries(_: web.Application) -> None:
        await queries.close()
        view.stop()

    app.on_cleanup.append(close_queries)
    for name in ("meterstream.web", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.INFO)
    host = bind or web_settings.bind
    listen = port or web_settings.port
    web.run_app(
        app,
        host=host,
        port=listen,
        access_log_class=PathOnlyAccessLogger,
        print=lambda _: log.info("serving customer usage on http://%s:%d/", host, listen),
        handle_signals=True,
    )
