"""Customer success: usage reports, margin, cache savings, cost per outcome and the dispute audit.

``reports`` and ``audit`` compute (saved queries in ``sql/queries/`` plus the pricing
engine); ``render`` prints a report as a table, JSON or CSV; ``commands`` is the
``meterstream usage …`` / ``margin`` / ``audit`` CLI, registered in :mod:`meterstream.cli`.
"""
