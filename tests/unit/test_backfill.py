"""meterstream import: reading JSON Lines / CSV / Parquet, per-line errors, repeats, pricing (no processes)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.billing import rate_events, read_events
from meterstream.pricing.plans import load_catalog
from meterstream.producers import backfill

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "backfill"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(days=3)


class _Result:
    def __init__(self, rows):
        self.rows = rows

    def dicts(self):
        return self.rows


def _store(keys: set[tuple[str, str]]):
    """A saved-query runner answering stored_event_ids from a set (the real one is tested in integration)."""
    calls = []

    def run(name, **params):
        calls.append((name, params))
        assert name == "stored_event_ids"
        return _Result([{"customer_id": c, "event_id": e} for c, e in sorted(keys)
                        if params["customer"] in ("", c)])  # fmt: skip

    run.calls = calls
    return run


def _line(**fields) -> str:
    base = {"event_id": "e1", "customer_id": "acme", "occurred_at": "2026-10-05T10:00:00Z", "model": "gpt-4o",
            "input_tokens": 1000, "output_tokens": 100}  # fmt: skip
    base.update(fields)
    return json.dumps(base)


def test_scan_reports_each_bad_line_with_its_number_and_reason(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([
        _line(event_id="a"),
        _line(event_id="b", input_tokens="12"),        # a string is not a token count
        "",                                             # blank lines are skipped, not errors
        "{not json",
        _line(event_id="a"),                            # repeats line 1: sent once
        _line(event_id="c", occurred_at="2026-10-05T10:00:00"),  # no timezone
        _line(event_id="d", customer_id="globex", occurred_at="2026-09-30T23:59:59Z"),
    ]) + "\n")  # fmt: skip
    scanned = backfill.scan(path, "jsonl")
    assert scanned.records == 6 and scanned.valid == 2
    assert [b.line for b in scanned.bad] == [2, 4, 6]
    assert scanned.bad[0].reason.startswith("input_tokens:")
    assert "occurred_at" in scanned.bad[2].reason
    assert scanned.repeated_lines == {5}
    assert dict(scanned.customers_by_period) == {"2026-10": {"acme"}, "2026-09": {"globex"}}


def test_the_three_formats_read_the_same_events(tmp_path):
    jsonl = [e for _, e in backfill.iter_events(EXAMPLE / "events.jsonl", "jsonl")]
    from_csv = [e for _, e in backfill.iter_events(EXAMPLE / "events.csv", "csv")]
    rows = [json.loads(line) for line in (EXAMPLE / "events.jsonl").read_text().splitlines()]
    columns = sorted({k for row in rows for k in row})
    for row in rows:  # Parquet: attributes as a JSON string column, like CSV; a null is an absent field
        if "attributes" in row:
            row["attributes"] = json.dumps(row["attributes"])
        for column in columns:
            row.setdefault(column, None)
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_parquet = [e for _, e in backfill.iter_events(parquet, "parquet")]
    assert len(jsonl) == 160
    assert not any(isinstance(e, backfill.BadRecord) for e in jsonl)
    assert from_csv == jsonl
    assert from_parquet == jsonl
    # ...and the same events `meterstream rate` reads
    assert read_events(EXAMPLE / "events.jsonl") == (jsonl, [])


def test_csv_errors_name_the_file_line(tmp_path):
    path = tmp_path / "events.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["event_id", "customer_id", "occurred_at", "model", "input_tokens", "output_tokens"])
        writer.writerow(["a", "acme", "2026-10-05T10:00:00Z", "gpt-4o", "100", "10"])
        writer.writerow(["b", "acme", "2026-10-05T10:00:00Z", "gpt-4o", "1.5", "10"])
        writer.writerow(["c", "acme", "2026-10-05T10:00:00Z", "gpt-4o", "100", "10", "extra"])
        writer.writerow(["d", "", "2026-10-05T10:00:00Z", "gpt-4o", "100", "10"])
    scanned = backfill.scan(path, "csv")
    assert scanned.valid == 1
    assert [(b.line, b.reason.split(":")[0]) for b in scanned.bad] == [
        (3, "input_tokens"), (4, "1 more cells than the header has columns"), (5, "customer_id")]  # fmt: skip


def test_dry_run_prices_with_the_engine_and_skips_what_is_stored():
    catalog = load_catalog(ROOT / "meterstream" / "data" / "plans.yaml")
    scanned = backfill.scan(EXAMPLE / "events.jsonl", "jsonl")
    events = [e for _, e in backfill.iter_events(EXAMPLE / "events.jsonl", "jsonl")]
    stored = {(events[0].customer_id, events[0].event_id), (events[1].customer_id, events[1].event_id)}
    run = _store(stored)
    keys = backfill.stored_keys(run, scanned)
    assert keys == stored
    # three customers a period: one lookup per customer and period
    assert {(c[1]["period"], c[1]["customer"]) for c in run.calls} == {
        (p, c) for p, cs in scanned.customers_by_period.items() for c in cs}  # fmt: skip
    priced = backfill.price(scanned, keys, catalog, now=NOW, late_grace=GRACE)
    assert priced.already_stored == 2 and priced.events == 158 and not priced.unpriced
    rated, errors = rate_events(catalog, events[2:])
    assert not errors
    assert priced.usage_credits == sum((r.credits for r in rated if r.kind == "usage"), Decimal(0))
    assert priced.outcome_credits == sum((r.credits for r in rated if r.kind == "outcome"), Decimal(0))
    assert priced.outcome_credits > 0  # the example has outcomes: the two kinds are really apart
    assert priced.cost_to_serve == sum((r.cost_to_serve for r in rated), Decimal(0))
    by_group = {(g.customer_id, g.period): g for g in priced.groups}
    acme_sep = [r for r in rated if r.customer_id == "acme" and r.period == "2026-09"]
    assert by_group[("acme", "2026-09")].usage_credits == sum(
        (r.credits for r in acme_sep if r.kind == "usage"), Decimal(0))  # fmt: skip
    assert by_group[("acme", "2026-09")].outcome_credits == sum(
        (r.credits for r in acme_sep if r.kind == "outcome"), Decimal(0))  # fmt: skip
    # every period of the file is closed at NOW: billed on the open invoice, as late usage
    assert {g.billed_in for g in priced.groups} == {"2026-12"}


def test_a_period_is_closed_after_its_grace():
    assert not backfill.period_closed("2026-11", datetime(2026, 12, 3, 23, 59, tzinfo=timezone.utc), GRACE)
    assert backfill.period_closed("2026-11", datetime(2026, 12, 4, tzinfo=timezone.utc), GRACE)


def test_format_from_suffix(tmp_path):
    assert backfill.detect_format(Path("a.ndjson")) == "jsonl"
    assert backfill.detect_format(Path("a.parquet")) == "parquet"
    assert backfill.detect_format(Path("a.txt"), "csv") == "csv"
    with pytest.raises(backfill.BackfillError):
        backfill.detect_format(Path("a.txt"))


def test_the_parallel_scan_finds_what_one_process_finds(tmp_path, monkeypatch):
    monkeypatch.setattr(backfill, "_CHUNK_BYTES", 4096)  # many chunks, repeats and errors across them
    lines = []
    for i in range(600):
        if i % 97 == 5:
            lines.append(_line(event_id=f"e{i}", output_tokens=-1))
        elif i % 50 == 7:
            lines.append(_line(event_id=f"e{i - 300 if i > 300 else i}"))  # repeats an earlier line, far back
        elif i % 113 == 0:
            lines.append("")
        elif i % 31 == 2:
            lines.append(_line(event_id=f"e{i}").replace(", ", ",\r", 1))  # JSON whitespace: a CR inside the line
        else:
            lines.append(_line(event_id=f"e{i}", customer_id=f"c{i % 7}",
                               occurred_at=f"2026-{9 + i % 2:02d}-0{1 + i % 9}T10:00:00Z"))  # fmt: skip
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines))  # no newline at the end
    one = backfill.scan(path, "jsonl", workers=1)
    many = backfill.scan(path, "jsonl", workers=2)
    assert len(backfill._chunks(path)) > 10
    assert one.repeated_lines and one.bad
    per_event = backfill.scan(path, "jsonl", columns=False)  # every line through the model
    for name in ("records", "valid", "bad", "repeated_lines", "first_at", "last_at"):
        assert getattr(many, name) == getattr(one, name) == getattr(per_event, name), name
    assert dict(many.customers_by_period) == dict(one.customers_by_period) == dict(per_event.customers_by_period)
    # what the send produces: the valid first-seen lines as written, in file order, once each
    sent = [raw.strip() for n, raw in enumerate(path.read_bytes().split(b"\n"), 1)
            if raw.strip() and n not in per_event.bad_lines | per_event.repeated_lines]  # fmt: skip
    assert [value for *_, value in many.spooled()] == [value for *_, value in one.spooled()] == sent


def _table_rows(n: int) -> list[list[str]]:
    """CSV-like rows of n records: bad cells, repeats far back, hostile quoting (no line break inside a value)."""
    rows = []
    for i in range(n):
        source, tokens, attributes = i, str(100 + i), ""
        if i % 97 == 5:
            tokens = "-1"  # bad
        elif i % 50 == 7 and i > 300:
            source = i - 300  # repeats an earlier row's (customer, event id), far back
        elif i % 41 == 3 and i < 200:  # quoted cells in the first chunks only: the others split without csv.reader
            attributes = json.dumps({"note": 'a "quoted", comma', "n": i})
        rows.append([f"e{source}", f"c{source % 7}", f"2026-{9 + i % 2:02d}-0{1 + i % 9}T10:00:00Z", "gpt-4o", tokens,
                     "10", attributes])  # fmt: skip
    return rows


_TABLE_HEADER = ["event_id", "customer_id", "occurred_at", "model", "input_tokens", "output_tokens", "attributes"]


def _scans_of(path: Path, fmt: str) -> list[backfill.Scan]:
    """The file scanned by two processes, by one, and per event (every record through the model)."""
    return [backfill.scan(path, fmt, workers=2), backfill.scan(path, fmt, workers=1),  # type: ignore[arg-type]
            backfill.scan(path, fmt, columns=False, workers=1)]  # type: ignore[arg-type]  # fmt: skip


def _assert_same(many: backfill.Scan, *others: backfill.Scan) -> None:
    assert many.bad and many.repeated_lines
    for other in others:
        for name in ("records", "valid", "bad", "repeated_lines", "first_at", "last_at"):
            assert getattr(many, name) == getattr(other, name), name
        assert dict(many.customers_by_period) == dict(other.customers_by_period)
        assert list(many.spooled()) == list(other.spooled())  # the bytes the send produces, in order


def test_the_parallel_csv_scan_finds_what_one_process_finds(tmp_path, monkeypatch):
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # \r\n line ends, as Excel writes them
    writer.writerow(_TABLE_HEADER)
    for i, row in enumerate(_table_rows(900)):
        if i % 61 == 9:
            row = [*row, "extra"]  # more cells than the header has columns
        elif i % 67 == 4:
            row = row[:5]  # fewer: the rest are empty
        elif i % 11 == 1:
            row[4] = "x"  # bad, after 60 blank lines: its number is the line after the previous row's
        writer.writerow(row)
        if (i % 5 == 2 or i % 11 == 0) and i < 450:  # blank lines (numbered as csv.reader counts them); none after
            buffer.write("\r\n" * (1 + i % 3 if i % 11 else 60))
    path = tmp_path / "big.csv"
    data = buffer.getvalue().encode()
    path.write_bytes(data[:-2])  # no line end at the end
    # chunks of about 4 KB, the first ending inside a run of blank lines
    monkeypatch.setattr(backfill, "_CHUNK_BYTES", data.index(b"\r\n" * 60, 3000) + 40)
    chunks = backfill._chunks(path)
    assert len(chunks) > 10
    assert any(data[a - 4:a] == b"\r\n\r\n" for a, _ in chunks[1:]), "a chunk ending with a blank line"
    many, one, per_event = _scans_of(path, "csv")
    assert len(many.spools) == len(chunks)  # scanned in chunks
    _assert_same(many, one, per_event)


def test_a_csv_value_with_a_line_break_across_a_chunk_boundary_is_scanned_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(backfill, "_CHUNK_BYTES", 4096)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(_TABLE_HEADER)
    for i, row in enumerate(_table_rows(400)):
        writer.writerow([*row[:6], json.dumps({"n": i}, indent=1)])  # attributes on three lines: every record spans them
    path = tmp_path / "multiline.csv"
    path.write_text(buffer.getvalue(), newline="")
    reported: list[int] = []
    many = backfill.scan(path, "csv", reported.append, workers=2)
    assert [s.name for s in many.spools] == ["events.spool"]  # started again in one process
    assert sum(reported) == many.records == 400  # each record reported once
    _assert_same(many, *_scans_of(path, "csv")[1:])


def test_the_parallel_parquet_scan_finds_what_one_process_finds(tmp_path, monkeypatch):
    monkeypatch.setattr(backfill, "_TABLE_BATCH", 20)  # a row group of 50 rows is scanned in two pieces
    rows = _table_rows(900)
    columns = {name: [r[i] for r in rows] for i, name in enumerate(_TABLE_HEADER)}
    columns["input_tokens"] = [int(v) for v in columns["input_tokens"]]
    columns["attributes"] = [v or None for v in columns["attributes"]]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=50)
    assert len(backfill._table_tasks(path, "parquet", NOW, tmp_path)) == 36
    many, one, per_event = _scans_of(path, "parquet")
    assert len(many.spools) == 36
    _assert_same(many, one, per_event)


@given(st.lists(st.sampled_from(["a", "7", ",", "\n", "\r\n", " ", "\x00", "\x0b", "\u2028", "\x1c", "é", "\t", "'",
                                  "\\", "\r", '"']), max_size=40))  # fmt: skip
def test_a_chunk_without_quotes_is_split_as_csv_reader_reads_it(pieces):
    text = "".join(pieces)
    chunk = backfill._CsvChunk(text, last=True)
    plain = chunk.plain_rows()
    if '"' in text or text.count("\r") != text.count("\r\n"):
        assert plain is None  # read by csv.reader
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    assert plain == list(reader)
    assert chunk.lines == reader.line_num


def test_events_the_broker_never_confirms_are_reported_by_id(tmp_path):
    from meterstream.config import KafkaSettings

    scanned = backfill.scan(EXAMPLE / "events.jsonl", "jsonl")
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="nobroker.")
    sent = backfill.send(scanned, set(), kafka, flush_timeout=10, producer_config={"message.timeout.ms": 10, "linger.ms": 1})
    assert sent.sent == 160 and sent.delivered == 0
    assert len(sent.failed) == 160
    assert {event_id for event_id, _ in sent.failed} == {
        e.event_id for _, e in backfill.iter_events(EXAMPLE / "events.jsonl", "jsonl")}  # fmt: skip


def test_a_csv_cell_over_the_reader_limit_is_a_clear_error_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from meterstream.cli import app

    path = tmp_path / "huge-cell.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_TABLE_HEADER)
        for i, row in enumerate(_table_rows(40_000)):  # a few chunks: the cell is in one the processes read
            writer.writerow([*row[:6], "x" * 200_000] if i == 20_000 else row)
    result = CliRunner().invoke(app, ["import", str(path), "--dry-run", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert f"cannot read {path}: field larger than field limit (131072)" in result.output
    assert "Traceback" not in result.output
