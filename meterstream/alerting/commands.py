"""The alert consumers' commands: ``meterstream alerts tail``, ``alerts forward`` and ``alerts redeliver``.

Registered in :mod:`meterstream.cli`; this module does not import it (``python -m
meterstream.cli`` would import it twice). Kafka and HTTP clients are imported
when a command runs, so ``meterstream --help`` stays quick.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.markup import escape

from meterstream.cli_common import fail
from meterstream.config import AlertForwarderSettings, get_settings

if TYPE_CHECKING:
    from meterstream.alerting.forwarder import ForwarderStats, Handled

err_console = Console(stderr=True)

CustomerOption = Annotated[str | None, typer.Option("--customer", help="Only this customer's alerts.")]
MaxOption = Annotated[int | None, typer.Option("--max", min=1, help="Stop after this many (for scripts and tests).")]
TimeoutOption = Annotated[float | None, typer.Option("--timeout", min=0, help="Stop after this many seconds.")]


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
            f"[yellow]skipped[/] {escape(f'{message.topic}[{message.partition}]')} offset {message.offset}: "
            f"{escape(message.reason)}",
            highlight=False, soft_wrap=True,
        )

    with stop_on_signals(threading.Event()) as stop:
        try:
            result = tail_alerts(
                get_settings().kafka, topic, emit=emit, from_beginning=from_beginning, customer=customer,
                max_alerts=max_alerts, timeout=timeout, stop=stop, on_unreadable=unreadable,
                on_ready=lambda: err_console.print(f"following {topic} from the {where} (Ctrl-C stops)",
                                                   highlight=False, markup=False, soft_wrap=True),
            )  # fmt: skip
        except AlertSourceError as exc:
            raise fail(str(exc)) from None
        except BrokenPipeError:  # `... | head`: the reader has gone, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            raise typer.Exit(0) from None
    if result.timed_out and max_alerts is not None:
        raise fail(f"timed out after {timeout:g} s with {result.shown} of {max_alerts} alerts", code=2)


UrlOption = Annotated[str | None, typer.Option("--url", help="Webhook URL; default METERSTREAM_ALERT_FORWARDER__URL.")]
SecretEnvOption = Annotated[
    str | None, typer.Option("--secret-env", help="NAME of the environment variable holding the HMAC-SHA256 secret.")
]
GroupOption = Annotated[
    str | None, typer.Option("--group", help="Consumer group (and ledger name); default from settings.")
]


@dataclass(frozen=True)
class _Forwarding:
    settings: AlertForwarderSettings
    url: str
    secret: SecretStr | None


def _forwarding(url: str | None, secret_env: str | None, group: str | None) -> _Forwarding:
    """The forwarder's settings with the command-line overrides, validated; the secret read from its variable."""
    from meterstream.alerting.forwarder import ForwarderError, secret_from_env

    overrides = {key: value for key, value in {"url": url, "secret_env": secret_env, "group_id": group}.items()
                 if value is not None}  # fmt: skip
    try:
        settings = AlertForwarderSettings.model_validate({**get_settings().alert_forwarder.model_dump(), **overrides})
    except ValidationError as exc:  # the messages name the field, never the value (a URL may hold a token)
        raise fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    if settings.url is None:
        raise fail("no webhook URL: pass --url or set METERSTREAM_ALERT_FORWARDER__URL")
    try:
        secret = secret_from_env(settings.secret_env) if settings.secret_env else None
    except ForwarderError as exc:
        raise fail(str(exc)) from None
    return _Forwarding(settings, settings.url.get_secret_value(), secret)


def _print_handled(handled: Handled) -> None:
    message, alert, delivery = handled.message, handled.message.alert, handled.delivery
    if alert is None:
        where = f"{message.topic}[{message.partition}] offset {message.offset}"
        line = f"unreadable {where} -> dead letters: {handled.detail}"
    else:
        what = f"{alert.alert_id} {alert.customer_id} {alert.period} {alert.threshold_percent}%"
        if handled.action == "delivered" and delivery is not None:
            line = f"delivered {what} (HTTP {delivery.status}, attempt {delivery.attempts})"
        elif handled.action == "skipped":
            line = f"skipped {what} ({handled.detail})"
        else:
            line = f"{handled.action} {what}: {handled.detail}"
    print(line, flush=True)


def _print_summary(stats: ForwarderStats, forwarding: _Forwarding) -> None:
    from meterstream.alerting.forwarder import dead_letter_path

    dead = stats.dead_lettered + stats.unreadable
    summary = (
        f"handled {stats.messages}: {stats.delivered} delivered, {stats.skipped} skipped as already handled, "
        f"{dead} dead-lettered, {stats.resent_after_crash} resent after a crash; {stats.attempts} HTTP attempts"
    )
    if dead:
        summary += f"; dead letters in {dead_letter_path(forwarding.settings, forwarding.settings.group_id)}"
    err_console.print(summary, highlight=False, markup=False, soft_wrap=True)


def forward_command(
    url: UrlOption = None,
    secret_env: SecretEnvOption = None,
    group: GroupOption = None,
    max_messages: MaxOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """POST each budget alert to a webhook as JSON, with retries, never the same alert twice.

    Idempotency-Key: <alert_id> on every request; X-Meterstream-Signature: sha256=<hmac>
    with a secret. Delivered ids are kept in a ledger in the state directory; alerts
    refused permanently (4xx other than 429) or failing max_attempts times go to the
    dead-letter file. SIGINT/SIGTERM stop between alerts. docs/budgets.md: "Alert consumers".
    """
    from meterstream.alerting.forwarder import ForwarderError, ledger_path, run_forwarder, stop_on_signals
    from meterstream.alerting.ledger import LedgerError
    from meterstream.alerting.webhook import url_origin

    forwarding = _forwarding(url, secret_env, group)
    settings, group_id = get_settings(), forwarding.settings.group_id
    topic = _alert_topic()

    def ready() -> None:
        signing = f"signed with ${forwarding.settings.secret_env}" if forwarding.secret is not None else "unsigned"
        err_console.print(
            f"forwarding {topic} to {url_origin(forwarding.url)} as group {group_id} ({signing}); "
            f"ledger {ledger_path(forwarding.settings, group_id)}",
            highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip

    with stop_on_signals(threading.Event()) as stop:
        try:
            stats = run_forwarder(
                settings.kafka, forwarding.settings, topic, url=forwarding.url, group_id=group_id,
                secret=forwarding.secret, max_messages=max_messages, timeout=timeout, stop=stop,
                on_handled=_print_handled, on_ready=ready,
            )  # fmt: skip
        except (ForwarderError, LedgerError) as exc:
            raise fail(str(exc)) from None
    _print_summary(stats, forwarding)


def redeliver_command(url: UrlOption = None, secret_env: SecretEnvOption = None, group: GroupOption = None) -> None:
    """Send the dead-lettered alerts of a forwarder group again, once the cause is fixed.

    Each alert the ledger has as dead is POSTed under the same rules as `alerts forward`
    (retries, signature, Idempotency-Key); delivered ones are never sent again. Run it
    while that group's forwarder is stopped (they share the ledger).
    """
    from meterstream.alerting.forwarder import AlertForwarder, stop_on_signals
    from meterstream.alerting.ledger import LedgerError

    forwarding = _forwarding(url, secret_env, group)
    with stop_on_signals(threading.Event()) as stop:
        try:
            forwarder = AlertForwarder(forwarding.settings, forwarding.url, group_id=forwarding.settings.group_id,
                                       secret=forwarding.secret, stop=stop)  # fmt: skip
        except LedgerError as exc:
            raise fail(str(exc)) from None
        try:
            stats = forwarder.redeliver_dead(on_handled=_print_handled)
        finally:
            forwarder.close()
    _print_summary(stats, forwarding)
