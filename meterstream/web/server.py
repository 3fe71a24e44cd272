"""``meterstream serve``: the customer-visible usage page and its read-only JSON API.

Every ``/api/`` request carries ``Authorization: Bearer <token>``; the token
resolves to one customer (:mod:`meterstream.web.tokens`) and every query binds
that customer server-side. Routes:

    GET /                                              the page (static HTML + JS, no build step)
    GET /healthz                                       liveness, no data
    GET /api/v1/me                                     the token's customer, the current period
    GET /api/v1/customers/{id}/usage?days=30&bucket=day|hour
    GET /api/v1/customers/{id}/budget                  month-to-date vs budget, thresholds, projection
    GET /api/v1/customers/{id}/enforcement             ok | warn | downgrade | block (the worker's decision)

A missing or unknown token is 401; a customer id other than the token's is 403,
whether or not that customer exists. Tokens never reach a log: the access log
records method, path (no query string) and status only.
"""

from __future__ import annotations

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
from meterstream.periods import period_of
from meterstream.pricing.plans import load_catalog, period_bounds
from meterstream.producers.guard import EnforcementView
from meterstream.storage.clickhouse import StoreError
from meterstream.topics import Topics
from meterstream.web.store import CustomerQueries, Rows
from meterstream.web.tokens import ReloadingTokenBook, TokenFileError, TokenLookup
from meterstream.web.views import burn_down_view, enforcement_view, sql_time, usage_view, usage_window

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
API_PREFIX = "/api/"

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
TOKENS: web.AppKey[TokenLookup] = web.AppKey("tokens")
QUERIES: web.AppKey[Rows] = web.AppKey("queries")
BUDGETS: web.AppKey[BudgetBook] = web.AppKey("budgets")
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
#: The worker's decisions from the compacted enforcement-state topic (None: not followed).
DECISIONS: web.AppKey[dict[str, Any] | None] = web.AppKey("decisions")
#: The customer the request's token resolved to; set before any /api/ handler runs.
CUSTOMER: web.RequestKey[str] = web.RequestKey("customer_id")

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
    customer = request.app[TOKENS].customer_for(token)
    if customer is None:
        return _unauthorized("the API token is not valid", error="invalid_token")
    request[CUSTOMER] = customer
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


def _period(now: datetime) -> str:
    return period_of(now)


async def me(request: web.Request) -> web.Response:
    settings: Settings = request.app[SETTINGS]
    now = request.app[CLOCK]()
    return _json(
        {
            "customer_id": request[CUSTOMER],
            "period": _period(now),
            "show_cost_to_serve": settings.web.show_cost_to_serve,
            "default_days": min(settings.web.default_days, settings.web.max_days),
            "max_days": settings.web.max_days,
            "max_hourly_days": settings.web.max_hourly_days,
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
        "customer_usage_series", customer, bucket=bucket, since=sql_time(window.since), until=sql_time(window.until)
    )
    view = usage_view(customer, window, rows, show_cost=web_settings.show_cost_to_serve)
    view["days"] = days
    return _json(view)


async def budget(request: web.Request) -> web.Response:
    customer = _own_customer(request)
    now = request.app[CLOCK]()
    period = _period(now)
    start, end = period_bounds(period)
    queries: Rows = request.app[QUERIES]
    rows = await queries("customer_usage_series", customer, bucket="day", since=sql_time(start), until=sql_time(end))
    view = burn_down_view(
        customer, period, now, rows, request.app[BUDGETS].for_customer(customer),
        show_cost=request.app[SETTINGS].web.show_cost_to_serve,
    )  # fmt: skip
    return _json(view)


async def enforcement(request: web.Request) -> web.Response:
    customer = _own_customer(request)
    period = _period(request.app[CLOCK]())
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
            remaining_credits=None if decided.remaining_credits is None else str(decided.remaining_credits),
            since=decided.updated_at.isoformat(),
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
) -> web.Application:
    app = web.Application(middlewares=[security_headers, authenticate])
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
        budgets = load_budgets(settings.worker.budgets_file, load_catalog(settings.worker.plans_file))
    except (TokenFileError, BudgetBookError) as exc:
        raise WebError(str(exc)) from None
    queries = CustomerQueries(settings.clickhouse, web_settings.query_timeout)
    # Follow the worker's decisions (the same local view SDK guards keep).
    view = EnforcementView(settings.kafka, Topics.from_settings(settings.kafka).enforcement.name).start()
    app = create_app(settings, tokens, queries, budgets, decisions=view.states)

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
