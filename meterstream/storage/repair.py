"""Repair after a crash: what a killed worker's last insert may not have pushed to the views.

Its own module so that the store (:mod:`meterstream.storage.clickhouse`) can run it without
importing the settle step, which imports the store.
"""

from __future__ import annotations

import logging
from datetime import timedelta, timezone

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

# -- after a crash ---------------------------------------------------------------------------------
#
# An insert into usage_rated commits its part, then pushes the block to the views one table at
# a time (the rollups, usage_recent, then usage_day_counts). A worker killed in between (SIGKILL,
# OOM, power) leaves rows in usage_rated that a view never received, and its restart skips the
# batch because usage_rated has it. So when a worker takes partitions (start-up or rebalance) it
# first repairs the window in which a killed worker can have written: every row rated within
# REPAIR_WINDOW before the newest rated row.

#: How far before the newest rated row a killed worker's last insert can lie: its last batch,
#: plus the rebalance (SESSION_TIMEOUT, 10 s by default) before another worker takes over.
REPAIR_WINDOW = timedelta(minutes=5)

# The rows of the window that usage_recent lacks go through the insert again, so every view
# gets them by its own definition: usage_rated's FINAL and usage_recent's FINAL collapse the
# copy, usage_day_counts counts it (a higher count only sends a day back to the rows), and a
# rollup that had them sees more rows than ids and falls back to FINAL (sql/004).
_REPAIR_RECENT = """
INSERT INTO usage_rated
SELECT *
FROM usage_rated
WHERE rated_at >= {since:DateTime64(3, 'UTC')}
  AND toDate(occurred_at, 'UTC') >= toDate(now(), 'UTC') - 10
  AND (customer_id, event_id) NOT IN
  (
      SELECT customer_id, event_id
      FROM usage_recent
      WHERE customer_id IN (SELECT customer_id FROM usage_rated WHERE rated_at >= {since:DateTime64(3, 'UTC')})
  )
SETTINGS max_partitions_per_insert_block = 0
"""

# One more received row for every customer-day the window touched: a count that a killed
# insert never pushed (its rows did reach usage_recent) can no longer equal what a settle
# saw, so those days are read from the rows until the next settle.
_REPAIR_COUNTS = """
INSERT INTO usage_day_counts
SELECT period, customer_id, toDate(occurred_at, 'UTC') AS day, toUInt64(1)
FROM usage_rated
WHERE rated_at >= {since:DateTime64(3, 'UTC')}
GROUP BY period, customer_id, day
"""


def repair_views(client: Client) -> int:
    """Make usage_recent and usage_day_counts whole for the window a killed worker may have left.

    Returns how many rated rows went through the insert again.
    """
    newest = client.query("SELECT max(rated_at) FROM usage_rated").result_rows[0][0]
    if newest is None or newest.year < 2000:  # an empty table gives the epoch
        return 0
    newest = newest.replace(tzinfo=timezone.utc) if newest.tzinfo is None else newest.astimezone(timezone.utc)
    count = "SELECT count() FROM usage_rated"  # before and after: chDB's insert summary says 0
    before = client.query(count).result_rows[0][0]
    client.command(_REPAIR_RECENT, parameters={"since": newest - REPAIR_WINDOW})
    copied = int(client.query(count).result_rows[0][0] - before)
    client.command(_REPAIR_COUNTS, parameters={"since": newest - REPAIR_WINDOW})
    if copied:
        log.warning("repaired the views: %d rated rows a killed insert had not pushed to usage_recent", copied)
    return copied
