"""POSTing one alert to a webhook: body, signature, retry rule, and the HTTP call.

Everything above :class:`WebhookSender` is pure and unit-tested without a network.

**The retry rule.** An answer is sorted into one of three verdicts:

- 2xx: delivered;
- 429 and 5xx, or no answer at all (connection refused, timeout, connection
  dropped): retry, after ``min(backoff_max, backoff_initial * 2**(n-1))``
  seconds following the n-th failed attempt, or after the ``Retry-After`` the
  receiver asked for when that is longer (itself capped at ``backoff_max``),
  up to ``max_attempts`` attempts in all;
- any other status (4xx other than 429, and 1xx/3xx: redirects are not
  followed, a moved endpoint is a configuration error): permanent.

Permanent failures, and alerts still failing after ``max_attempts``, go to the
dead-letter file (:mod:`meterstream.alerting.forwarder`).

**The signature.** With a secret, ``X-Meterstream-Signature: sha256=<hex>`` is
the HMAC-SHA256 of the exact body bytes under the secret (GitHub's scheme). A
receiver recomputes it over the raw body it read and compares in constant
time (:func:`verify_signature`). The body of every attempt is byte-identical.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from enum import StrEnum
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from meterstream.clock import utc_now
from meterstream.schemas.records import BudgetAlert

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Meterstream-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
ATTEMPT_HEADER = "X-Meterstream-Delivery-Attempt"
USER_AGENT = "meterstream-alert-forwarder/1"


# -- pure -------------------------------------------------------------------------------------


def alert_body(alert: BudgetAlert) -> bytes:
    """The JSON body POSTed for an alert: the wire format of ``budget-alerts`` (decimals as strings)."""
    return alert.model_dump_json().encode()


def sign(secret: SecretStr, body: bytes) -> str:
    """The ``X-Meterstream-Signature`` value of ``body``."""
    digest = hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: SecretStr | str, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute the signature over the raw body and compare in constant time."""
    if not header:
        return False
    key = secret if isinstance(secret, SecretStr) else SecretStr(secret)
    return hmac.compare_digest(sign(key, body).encode(), header.strip().encode())


def backoff_delay(failed_attempts: int, initial: float, cap: float) -> float:
    """Seconds to wait after the ``failed_attempts``-th failed attempt (1-based): doubling, capped."""
    if failed_attempts < 1:
        raise ValueError("failed_attempts starts at 1")
    # min() before the power would overflow: 2**1100 is fine for ints, not for floats.
    exponent = min(failed_attempts - 1, 64)
    return float(min(cap, initial * (2**exponent)))


def retry_schedule(max_attempts: int, initial: float, cap: float) -> list[float]:
    """The waits between ``max_attempts`` attempts when every one fails and no Retry-After is sent."""
    return [backoff_delay(n, initial, cap) for n in range(1, max_attempts)]


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or utc_now())).total_seconds())


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"


def classify(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 429 or 500 <= status < 600:
        return Verdict.RETRY
    return Verdict.PERMANENT


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` only: webhook paths and queries often carry a token, so logs show this."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_initial: float
    backoff_max: float

    def delay(self, failed_attempts: int, retry_after: float | None = None) -> float:
        delay = backoff_delay(failed_attempts, self.backoff_initial, self.backoff_max)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay


# -- the HTTP call ----------------------------------------------------------------------------


class _HideWebhookUrls(logging.Filter):
    """httpx logs each request's full URL at INFO; webhook URLs often hold a token, so show their origin."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.urls and isinstance(record.args, tuple):
            record.args = tuple(
                f"{url_origin(str(arg))}/..." if str(arg) in self.urls else arg for arg in record.args
            )
        return True


_hide_urls = _HideWebhookUrls()
logging.getLogger("httpx").addFilter(_hide_urls)


class Outcome(StrEnum):
    DELIVERED = "delivered"
    #: A permanent status, or still failing after max_attempts.
    FAILED = "failed"
    #: The forwarder was asked to stop between attempts.
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    attempts: int
    status: int | None
    reason: str
    #: Some attempt failed in a way that does not prove the receiver did not get it (a timeout after sending).
    maybe_received: bool


class WebhookSender:
    """POSTs alerts to one URL with the retry rule above; ``stop`` interrupts the waits between attempts."""

    def __init__(
        self,
        url: str,
        policy: RetryPolicy,
        *,
        secret: SecretStr | None = None,
        request_timeout: float = 10.0,
        stop: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.origin = url_origin(url)
        self.policy = policy
        self._secret = secret
        self._stop = stop or threading.Event()
        self._client = httpx.Client(timeout=request_timeout, follow_redirects=False, transport=transport)
        _hide_urls.urls.add(str(self._client.build_request("POST", url).url))

    def close(self) -> None:
        self._client.close()

    def headers(self, alert: BudgetAlert, body: bytes, attempt: int) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            IDEMPOTENCY_HEADER: alert.alert_id,
            ATTEMPT_HEADER: str(attempt),
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        return headers

    def deliver(self, alert: BudgetAlert) -> Delivery:
        body = alert_body(alert)
        maybe_received = False
        status: int | None = None
        reason = ""
        for attempt in range(1, self.policy.max_attempts + 1):
            retry_after = None
            try:
                response = self._client.post(self.url, content=body, headers=self.headers(alert, body, attempt))
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                status, reason = None, f"cannot connect to {self.origin}: {type(exc).__name__}"
            except httpx.TransportError as exc:
                # The request may have been read and acted on before the connection failed.
                maybe_received = True
                status, reason = None, f"no answer from {self.origin}: {type(exc).__name__}"
            else:
                status = response.status_code
                verdict = classify(status)
                if verdict is Verdict.DELIVERED:
                    return Delivery(Outcome.DELIVERED, attempt, status, "", maybe_received)
                reason = f"HTTP {status} from {self.origin}"
                if verdict is Verdict.PERMANENT:
                    return Delivery(Outcome.FAILED, attempt, status, f"{reason} (permanent)", maybe_received)
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == self.policy.max_attempts:
                break
            delay = self.policy.delay(attempt, retry_after)
            log.warning(
                "alert %s: %s; retrying in %.2f s (attempt %d of %d)",
                alert.alert_id, reason, delay, attempt + 1, self.policy.max_attempts,
            )  # fmt: skip
            if self._stop.wait(delay):
                return Delivery(Outcome.ABANDONED, attempt, status, f"stopped while retrying: {reason}", maybe_received)
        return Delivery(
            Outcome.FAILED, self.policy.max_attempts, status,
            f"gave up after {self.policy.max_attempts} attempts: {reason}", maybe_received,
        )  # fmt: skip
