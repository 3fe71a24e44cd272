"""``meterstream dlq list|show|replay|skip`` and ``meterstream reconcile``.

Registered in :mod:`meterstream.cli`; this module does not import it (``python -m
meterstream.cli`` would import it twice). Kafka clients are imported when a command runs.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meterstream.cli_common import check_period
from meterstream.cli_common import fail as _fail
from meterstream.config import get_settings
from meterstream.cs.render import stdout_console

console = stdout_console()  # full width when piped: nothing cut
err_console = Console(stderr=True)

dlq_app = typer.Typer(
    help="The dead-letter topic: messages the worker rejected, with their raw bytes and the reason.",
    no_args_is_help=True,
)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Errors reading Kafka or the store exit 2 (1 means: differences found)."""
    return _fail(message, code)


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TimeoutOption = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to read the topics to their end.")]


def _entries(timeout: float) -> list[Any]:
    from confluent_kafka import KafkaException

    from meterstream.ops.dlq import read_dead_letters
    from meterstream.ops.kafka_read import TopicReadError

    try:
        return read_dead_letters(get_settings().kafka, timeout)
    except (TopicReadError, KafkaException) as exc:
        raise fail(str(exc)) from None


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the N most recent.")] = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Dead letters, oldest first: where (partition:offset), when, source, reason, size in bytes."""
    entries = _entries(timeout)
    if limit is not None:
        entries = entries[-limit:]
    rows = [e.summary() for e in entries]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no dead letters")
        return
    table = Table(title=f"Dead letters ({len(rows)})")
    for column in ("partition:offset", "rejected at", "source", "size", "reason"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for row in rows:
        source = f"{row['source_topic']}[{row['source_partition']}]@{row['source_offset']}" if row["source_topic"] else "-"
        table.add_row(f"{row['partition']}:{row['offset']}", row["rejected_at"] or "-", source, str(row["size"]),
                      escape(row["reason"]))  # fmt: skip
    console.print(table)


@dlq_app.command("show")
def dlq_show(
    offset: Annotated[str, typer.Argument(help="OFFSET or PARTITION:OFFSET on the dead-letter topic.")],
    partition: Annotated[int | None, typer.Option("--partition", help="The dead-letter partition.")] = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """One dead letter with its raw bytes: as text when they are UTF-8, else hex and base64."""
    from meterstream.ops.dlq import DeadLetterError, parse_ref, select

    try:
        part, off = parse_ref(offset, partition)
        entry = select(_entries(timeout), part, off)
    except DeadLetterError as exc:
        raise fail(str(exc)) from None
    detail = entry.detail()
    if as_json:
        print(json.dumps(detail, indent=2))
        return
    for name in ("partition", "offset", "key", "rejected_at", "source_topic", "source_partition", "source_offset",
                 "reason", "size"):  # fmt: skip
        console.print(f"{name:>16}: {escape(str(detail[name]))}", highlight=False, soft_wrap=True)
    if detail["raw_text"] is not None:
        console.print(f"{'raw (utf-8)':>16}: {escape(detail['raw_text'])}", highlight=False, soft_wrap=True)
    else:
        console.print(f"{'raw (hex)':>16}: {detail['raw_hex']}", highlight=False, soft_wrap=True)
        console.print(f"{'raw (base64)':>16}: {detail['raw_base64']}", highlight=False, soft_wrap=True)


@dlq_app.command("replay")
def dlq_replay(
    offsets: Annotated[
        list[str] | None,
        typer.Option("--offset", help="OFFSET or PARTITION:OFFSET of a dead letter; repeat for several."),
    ] = None,
    partition: Annotated[int | None, typer.Option("--partition", help="Partition for bare --offset values.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter on the topic.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be replayed; produce nothing.")] = False,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Re-produce dead letters' raw bytes to their source topic, keyed as before (e.g. after adding a missing price).

    Safe to repeat: the worker dedupes by (customer_id, event_id) and the store is keyed
    the same way (ReplacingMergeTree, read with FINAL), so a replayed event is billed
    once however often it is replayed. A message that is still invalid is dead-lettered
    again. Uses the idempotent, murmur2-partitioned producer of the SDK.
    """
    from confluent_kafka import KafkaException

    from meterstream.ops.dlq import DeadLetterError, parse_ref, replay, select

    if not offsets and not replay_all:
        raise fail("choose dead letters with --offset (repeatable) or --all")
    if offsets and replay_all:
        raise fail("--offset and --all exclude each other")
    entries = _entries(timeout)
    if not replay_all:
        try:
            chosen = []
            for text in offsets or []:
                part, off = parse_ref(text, partition)
                entry = select(entries, part, off)
                if entry not in chosen:
                    chosen.append(entry)
            entries = chosen
        except DeadLetterError as exc:
            raise fail(str(exc)) from None
    try:
        result = replay(get_settings().kafka, entries, dry_run=dry_run, timeout=timeout)
    except KafkaException as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        verb = "would replay" if dry_run else "replayed"
        for row in result.replayed:
            where = "" if row["to_offset"] is None else f"[{row['to_partition']}]@{row['to_offset']}"
            console.print(f"{verb} {row['partition']}:{row['offset']} -> {row['to_topic']}{where} "
                          f"key={row['key']} ({row['size']} bytes; was: {escape(row['reason_was'])})",
                          highlight=False, soft_wrap=True)  # fmt: skip
        for row in result.skipped:
            console.print(f"skipped {row['partition']}:{row['offset']}: {escape(row['why'])}", highlight=False)
        console.print(f"{verb} {len(result.replayed)}, skipped {len(result.skipped)}", highlight=False)
    if result.skipped and not dry_run:
        raise typer.Exit(1)


@dlq_app.command("skip")
def dlq_skip(
    message: Annotated[str, typer.Argument(help="TOPIC:PARTITION:OFFSET, as the worker's log names it.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded on the dead letter).")],
    group: Annotated[str | None, typer.Option("--group", help="Consumer group (default: the worker's app id).")] = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Move a message the worker cannot get past to the dead-letter topic and commit past it.

    Stop the worker first. Only the message the worker's group is stopped at can be skipped.
    The dead letter records the operator (the OS user), the reason and the time; exit 2 when
    refused (the group still has members, the offset is not where the group stopped).
    """
    import getpass

    from confluent_kafka import KafkaException

    from meterstream.clock import utc_now
    from meterstream.ops.dlq import DeadLetterError, parse_message_ref, skip

    settings = get_settings()
    try:
        topic, partition, offset = parse_message_ref(message)
        result = skip(
            settings.kafka, group or settings.worker.app_id, topic, partition, offset, reason,
            operator=getpass.getuser(), now=utc_now(), timeout=timeout,
        )  # fmt: skip
    except (DeadLetterError, KafkaException) as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(
            f"skipped {result['skipped']} ({result['size']} bytes) -> dead letter {result['dead_letter']}; "
            f"group {result['group']} committed at {result['committed']}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip


def reconcile_command(
    period: Annotated[str, typer.Option("--period", help="Billing period YYYY-MM (UTC).")],
    as_json: JsonOption = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds to read each topic to its end.")] = 60.0,
    show: Annotated[int, typer.Option("--show", min=0, help="List at most this many events per difference.")] = 20,
    stuck_after: Annotated[float, typer.Option(
        "--stuck-after", min=0.1, help="Minutes a partition's first uncommitted message may wait (with no commit) "
        "before the worker's group counts as stuck.")] = 5.0,
) -> None:
    """Compare a period across Kafka, ClickHouse and the invoices; exit 1 on any difference.

    Kafka: distinct (customer_id, event_id) of the valid events of the period on the usage
    and outcome topics, rated offline with the catalog. Store: events_raw and usage_rated
    (FINAL). Reports events missing in the store, extra in the store, and per-customer
    credit mismatches; prints the invoice total of the customers with usage. Exit 0 when
    everything agrees, 1 on a difference, 2 when it cannot read Kafka or the store.
    """

    from confluent_kafka import KafkaException

    from meterstream.ops.kafka_read import TopicReadError
    from meterstream.ops.reconcile import reconcile
    from meterstream.pricing.plans import PlanError, load_catalog
    from meterstream.storage.clickhouse import StoreError
    from meterstream.storage.queries import run_saved_query

    period = check_period(period, code=2)
    settings = get_settings()

    def run_query(name: str, **params: str) -> Any:
        return run_saved_query(settings.clickhouse, name, **params)

    try:
        catalog = load_catalog(settings.worker.plans_file)
        report = reconcile(settings, run_query, catalog, period, timeout, stuck_after=timedelta(minutes=stuck_after))
    except (TopicReadError, KafkaException, StoreError, PlanError) as exc:
        raise fail(str(exc)) from None
    data = report.as_dict()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _print_report(data, show)
    if not report.reconciled:
        raise typer.Exit(1)


def _print_report(data: dict[str, Any], show: int) -> None:
    k, s = data["kafka"], data["store"]

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    say(f"period {data['period']}")
    say(f"  kafka : {k['events']} events priced ({k['usage_and_outcome_credits']} usage + outcome credits), {k['unpriced']} not priceable, "
        f"{k['duplicates']} duplicates, {k['invalid']} invalid messages, {k['other_periods']} in other periods; "
        f"{k['dead_letters']} dead letters on the topic")  # fmt: skip
    say(f"  store : {s['raw_events']} raw events, {s['rated_rows']} rated rows ({s['usage_and_outcome_credits']} usage + outcome credits), "
        f"{s['customers']} customers; invoices total {s['invoice_total']}")  # fmt: skip
    for topic in k["retention_dropped"]:
        say(f"  note  : {topic} no longer starts at offset 0 (retention dropped old messages); "
            "store rows of those events show as extra")  # fmt: skip
    a = k["committed_accounting"]
    if a:
        say(f"  offsets: {a['committed']} messages below the committed offsets = {a['stored']} stored + "
            f"{a['duplicates']} duplicates + {a['dead_lettered']} dead letters + {a['unaccounted']} unaccounted; "
            f"{a['uncommitted']} not committed yet")  # fmt: skip
    for item in k["unaccounted"][:show]:
        say(f"[bold red]  unaccounted: {escape(item)}[/]")
    for item in k["stuck"]:
        say(f"[bold red]  stuck: {escape(item)}[/]")
    for topic, behind in k["worker_lag"].items():
        say(f"  note  : the worker has not committed {behind} messages of {topic} yet; differences may be lag")
    for customer, error in s["invoice_errors"].items():
        say(f"  note  : no invoice for {customer}: {escape(error)}")
    for title, name in (("missing in store (raw)", "missing_raw"), ("missing in store (rated)", "missing_rated"),
                        ("extra in store", "extra_in_store"), ("raw and rated rows disagree", "raw_not_rated")):  # fmt: skip
        items = data[name]
        if items:
            say(f"[bold red]{title}: {len(items)}[/]")
            for item in items[:show]:
                say(f"    {escape(item['customer_id'])}  {escape(item['event_id'])}")
            if len(items) > show:
                say(f"    ... and {len(items) - show} more (--json lists all)")
    if data["credit_mismatches"]:
        say(f"[bold red]credit mismatches: {len(data['credit_mismatches'])}[/]")
        for m in data["credit_mismatches"][:show]:
            say(f"    {escape(m['customer_id'])}  stored {m['stored']}  kafka {m['kafka']}  difference {m['difference']}")
    if data["reconciled"]:
        say(f"[bold green]reconciled[/]: {k['events']} events on Kafka = {s['raw_events']} raw = "
            f"{s['rated_rows']} rated; usage + outcome credits {s['usage_and_outcome_credits']} match per customer ({s['customers']} customers)")  # fmt: skip
    else:
        say("[bold red]NOT reconciled[/]")
