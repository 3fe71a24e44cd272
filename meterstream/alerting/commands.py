"""The alert consumers' commands: ``meterstream alerts tail`` and ``meterstream alerts forward``.

Registered in :mod:`meterstream.cli`; this module does not import it (``python -m
meterstream.cli`` would import it twice). Kafka and HTTP clients are imported
when a command runs, so ``meterstream --help`` stays quick.
"""

from __future__ import annotations

import threading
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from meterstream.config import AlertForwarderSettings, get_settings

err_console = Console(stderr=True)

CustomerOption = Annotated[str | None, typer.Option("--customer", help="Only this customer's alerts.")]
MaxOption = Annotated[int | None, typer.Option("--max", min=1, help="Stop after this many (for scripts and tests).")]
TimeoutOption = Annotated[float | None, typer.Option("--timeout", min=0, help="Stop after this many seconds.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _alert_topic() -> str:
    from meterstream.topics import Topics

    return Topics.from_settings(get_settings().kafka).budget_alerts.name


def tail_command(
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest alert kept, not at the end.")
    ] = False,
    customer: CustomerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line (the wire format).")] = False,
    max_alerts: MaxOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """Follow budget alerts as the worker raises them: time, customer, period, threshold, spent / budget, action.

    Starts at the end of the topic unless --from-beginning; Ctrl-C stops. An alert
    repeated on the topic is shown once. With --max and --timeout, exits 2 if the
    timeout comes first.
    """
    from meterstream.alerting.forwarder import stop_on_signals
    from meterstream.alerting.source import AlertMessage, AlertSourceError
    from meterstream.alerting.tail import format_alert, tail_alerts
    from meterstream.schemas.records import BudgetAlert

    topic = _alert_topic()
    where = "beginning" if from_beginning else "end"

    def emit(alert: BudgetAlert) -> None:
        print(alert.model_dump_json() if as_json else format_alert(alert), flush=True)

    def unreadable(message: AlertMessage) -> None:
        err_console.print(
            f"[yellow]skipped[/] {message.topic}[{message.partition}] offset {message.offset}: {message.reason}",
            highlight=False,
        )

    with stop_on_signals(threading.Event()) as stop:
        try:
            result = tail_alerts(
                get_settings().kafka, topic, emit=emit, from_beginning=from_beginning, customer=customer,
                max_alerts=max_alerts, timeout=timeout, stop=stop, on_unreadable=unreadable,
                on_ready=lambda: err_console.print(f"following {topic} from the {where} (Ctrl-C stops)", highlight=False),
            )  # fmt: skip
        except AlertSourceError as exc:
            raise fail(str(exc)) from None
        except BrokenPipeError:  # `... | head`: the reader has gone, which is not an error
            raise typer.Exit(0) from None
    if result.timed_out and max_alerts is not None:
        raise fail(f"timed out after {timeout:g} s with {result.shown} of {max_alerts} alerts", code=2)


def forward_command(
    url: Annotated[
        str | None, typer.Option("--url", help="Webhook URL; default METERSTREAM_ALERT_FORWARDER__URL.")
    ] = None,
    secret_env: Annotated[
        str | None,
        typer.Option("--secret-env", help="NAME of the environment variable holding the HMAC-SHA256 secret."),
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", help="Consumer group (and ledger name); default from settings.")
    ] = None,
    max_messages: MaxOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """POST each budget alert to a webhook as JSON, with retries, never the same alert twice.

    Idempotency-Key: <alert_id> on every request; X-Meterstream-Signature: sha256=<hmac>
    with a secret. Delivered ids are kept in a ledger in the state directory; alerts
    refused permanently (4xx other than 429) or failing max_attempts times go to the
    dead-letter file. SIGINT/SIGTERM stop between alerts. README: "Alert consumers".
    """
    from meterstream.alerting.forwarder import (
        ForwarderError,
        Handled,
        dead_letter_path,
        ledger_path,
        run_forwarder,
        secret_from_env,
        stop_on_signals,
    )
    from meterstream.alerting.ledger import LedgerError
    from meterstream.alerting.webhook import url_origin

    settings = get_settings()
    overrides = {key: value for key, value in {"url": url, "secret_env": secret_env, "group_id": group}.items()
                 if value is not None}  # fmt: skip
    try:
        forwarding = AlertForwarderSettings.model_validate({**settings.alert_forwarder.model_dump(), **overrides})
    except ValidationError as exc:
        raise fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    if forwarding.url is None:
        raise fail("no webhook URL: pass --url or set METERSTREAM_ALERT_FORWARDER__URL")
    target = forwarding.url.get_secret_value()
    try:
        secret = secret_from_env(forwarding.secret_env) if forwarding.secret_env else None
    except ForwarderError as exc:
        raise fail(str(exc)) from None
    topic = _alert_topic()

    def report(handled: Handled) -> None:
        message, alert, delivery = handled.message, handled.message.alert, handled.delivery
        if alert is None:
            line = f"unreadable {message.topic}[{message.partition}] offset {message.offset} -> dead letters: {handled.detail}"
        else:
            what = f"{alert.alert_id} {alert.customer_id} {alert.period} {alert.threshold_percent}%"
            if handled.action == "delivered" and delivery is not None:
                line = f"delivered {what} (HTTP {delivery.status}, attempt {delivery.attempts})"
            elif handled.action == "skipped":
                line = f"skipped {what} ({handled.detail})"
            else:
                line = f"{handled.action} {what}: {handled.detail}"
        print(line, flush=True)

    def ready() -> None:
        signing = f"signed with ${forwarding.secret_env}" if secret is not None else "unsigned"
        err_console.print(
            f"forwarding {topic} to {url_origin(target)} as group {forwarding.group_id} ({signing}); "
            f"ledger {ledger_path(forwarding, forwarding.group_id)}",
            highlight=False,
        )

    with stop_on_signals(threading.Event()) as stop:
        try:
            stats = run_forwarder(
                settings.kafka, forwarding, topic, url=target, group_id=forwarding.group_id, secret=secret,
                max_messages=max_messages, timeout=timeout, stop=stop, on_handled=report, on_ready=ready,
            )  # fmt: skip
        except (ForwarderError, LedgerError) as exc:
            raise fail(str(exc)) from None
    err_console.print(
        f"{stats.messages} messages: {stats.delivered} delivered, {stats.skipped} skipped as already handled, "
        f"{stats.dead_lettered + stats.unreadable} dead-lettered ({dead_letter_path(forwarding, forwarding.group_id)}), "
        f"{stats.resent_after_crash} resent after a crash, {stats.attempts} POSTs",
        highlight=False,
    )
