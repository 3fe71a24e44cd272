"""Customer-visible usage: a read-only JSON API and a small page, served by ``meterstream serve``.

- :mod:`~meterstream.web.tokens` — API tokens (SHA-256 hashes in a YAML file) -> customer;
- :mod:`~meterstream.web.store` — saved queries, always bound to the token's customer;
- :mod:`~meterstream.web.views` — usage over time, budget burn-down, enforcement state (pure);
- :mod:`~meterstream.web.server` — the aiohttp routes; ``static/`` holds the page (no build step).
"""
