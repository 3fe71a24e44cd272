"""What every ``meterstream`` command shares: errors, the period option, the catalog, store reads.

Command modules (:mod:`meterstream.cli`, ``cs``, ``ops``, ``alerting``) import these
instead of each keeping a copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from meterstream.clock import utc_now
from meterstream.config import Settings
from meterstream.periods import Period, period_of

err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise (``raise fail(...)``)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def check_period(period: str | None, *, code: int = 1) -> str:
    """A billing period ``YYYY-MM`` (UTC); the current month when not given."""
    period = period or period_of(utc_now())
    try:
        Period.parse(period)
    except ValueError:
        raise fail(f"--period must look like 2026-11, got {period!r}", code) from None
    return period


def load_catalog_or_fail(path: Path | None, settings: Settings) -> Any:
    from meterstream.pricing.plans import PlanError, load_catalog

    try:
        return load_catalog(path or settings.worker.plans_file)
    except PlanError as exc:
        raise fail(str(exc)) from None


@contextmanager
def query_runner(settings: Settings) -> Iterator[Any]:
    """``run(name, **params)`` for the saved queries of one command; store errors end the command.

    The store is opened once for the whole command rather than once per query (a
    report may run dozens), as a reader: nothing is created or migrated, and with
    ``METERSTREAM_CLICKHOUSE__CS_DSN`` set it connects as that (read-only) user.
    """
    from meterstream.storage.clickhouse import StoreError, open_store
    from meterstream.storage.queries import saved_query

    try:
        store = open_store(settings.clickhouse.for_reports(), apply_migrations=False)

        def run(name: str, **params: str) -> Any:
            return store.query(saved_query(name), params)

        try:
            yield run
        finally:
            store.close()
    except StoreError as exc:
        raise fail(str(exc)) from None


@contextmanager
def pricing_errors() -> Iterator[None]:
    """Pricing and plan errors end the command with their message."""
    from meterstream.pricing.invoice import InvoiceError
    from meterstream.pricing.plans import PlanError

    try:
        yield
    except (InvoiceError, PlanError) as exc:
        raise fail(str(exc)) from None
