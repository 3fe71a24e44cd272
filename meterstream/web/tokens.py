"""Customer API tokens: a YAML file of token hashes, each naming one customer.

The file (``METERSTREAM_WEB__TOKENS_FILE``) maps the SHA-256 of each token to
the customer it reads for; the tokens themselves are never stored::

    # token hash -> customer_id, or the customer with an expiry and a meter scope
    "sha256:3f0c...64 hex digits...": {customer: acme, expires: "2027-03-01T00:00:00Z"}
    "sha256:5a7e...64 hex digits...": {customer: acme, expires: "2027-03-01T00:00:00Z", meters: [tokens]}
    "sha256:9b1d...64 hex digits...": globex        # no expiry (kept for old files; avoid)

A token past ``expires`` is refused (401, ``invalid_token``) like an unknown one. A
token with ``meters`` reads only those meters' usage (``tokens``, ``requests``,
``actions``, ``documents``, ``seats``, ``outcome``) and no money: the invoice,
the budget and the issued invoices cover every meter, so they answer 403 to it.

A customer may have several tokens (rotation: add the new hash, hand out the
token, delete the old hash). Issue one with::

    python -m meterstream.web.tokens issue acme [--days 90] [--meters tokens,documents]

Tokens are 256 random bits, so a plain SHA-256 (not a slow password hash) is
enough: there is nothing to brute-force. The file is re-read when it changes,
so adding or revoking a token needs no restart. Nothing here logs a token, and
errors name entries by position, never by key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

import yaml

log = logging.getLogger(__name__)

TOKEN_PREFIX = "mst_"
_HASH_KEY = re.compile(r"^sha256:[0-9a-f]{64}$")
# The event schema's identifier rule: what a customer_id can be.
_CUSTOMER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/\-]*$")


class TokenFileError(ValueError):
    pass


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The key a token is stored under: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


METERS = frozenset({"tokens", "requests", "actions", "documents", "seats", "outcome"})
DEFAULT_DAYS = 90


@dataclass(frozen=True)
class TokenGrant:
    """What one token may read: one customer, until ``expires`` (None: no expiry), ``meters`` (None: all)."""

    customer: str
    expires: datetime | None = None
    meters: frozenset[str] | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


class TokenLookup(Protocol):
    def customer_for(self, token: str) -> str | None: ...


@dataclass(frozen=True)
class TokenBook:
    """Token hash -> what it grants."""

    grants_by_hash: dict[str, TokenGrant]

    @property
    def customers_by_hash(self) -> dict[str, str]:
        return {key: grant.customer for key, grant in self.grants_by_hash.items()}

    def grant_for(self, token: str) -> TokenGrant | None:
        presented = token_hash(token)
        # Comparing every entry in constant time keeps even the hash lookup free of timing hints.
        found = None
        for stored, grant in self.grants_by_hash.items():
            if hmac.compare_digest(stored, presented):
                found = grant
        return found

    def customer_for(self, token: str) -> str | None:
        grant = self.grant_for(token)
        return grant.customer if grant is not None else None


def _parse_grant(value: object, where: str) -> TokenGrant:
    if isinstance(value, str):
        customer, expires, meters = value, None, None
    elif isinstance(value, dict) and set(value) <= {"customer", "expires", "meters"} and "customer" in value:
        customer = value["customer"]
        expires = None
        if value.get("expires") is not None:
            try:
                expires = datetime.fromisoformat(str(value["expires"]).replace("Z", "+00:00"))
            except ValueError:
                raise TokenFileError(f"{where}: expires must be an ISO 8601 time, e.g. 2027-03-01T00:00:00Z") from None
            if expires.tzinfo is None:
                raise TokenFileError(f"{where}: expires needs a timezone (e.g. Z)")
        meters = None
        if value.get("meters") is not None:
            listed = value["meters"]
            if not isinstance(listed, list) or not listed or not set(listed) <= METERS:
                raise TokenFileError(f"{where}: meters must be a non-empty list of {', '.join(sorted(METERS))}")
            meters = frozenset(listed)
    else:
        raise TokenFileError(f"{where}: the value must be a customer_id or {{customer, expires, meters}}")
    if not isinstance(customer, str) or not _CUSTOMER_ID.match(customer) or len(customer) > 128:
        raise TokenFileError(f"{where}: the value must be a customer_id")
    return TokenGrant(customer, expires, meters)


def parse_token_book(text: str, source: str) -> TokenBook:
    try:
        data = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        # The YAML error would quote the offending line, which may hold a token: position only.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise TokenFileError(f"tokens file {source} is not valid YAML{where}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise TokenFileError(f"tokens file {source}: expected a mapping of 'sha256:<hex>' -> customer_id")
    book: dict[str, TokenGrant] = {}
    for position, (key, value) in enumerate(data.items(), 1):
        if not isinstance(key, str) or not _HASH_KEY.match(key):
            raise TokenFileError(
                f"tokens file {source}, entry {position}: the key must be 'sha256:' and 64 lowercase hex digits "
                "(the token's hash; plaintext tokens are refused: `python -m meterstream.web.tokens hash`)"
            )
        book[key] = _parse_grant(value, f"tokens file {source}, entry {position}")
    return TokenBook(book)


def load_token_book(path: Path) -> TokenBook:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TokenFileError(f"cannot read tokens file {path}: {exc.strerror}") from None
    return parse_token_book(text, str(path))


class ReloadingTokenBook:
    """The tokens file, re-read when its modification time or size changes.

    A file that turns invalid denies every token (logged once per change) rather
    than keep serving tokens an operator may have just revoked.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._book: TokenBook | None = load_token_book(self.path)
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def customer_for(self, token: str) -> str | None:
        grant = self.grant_for(token)
        return grant.customer if grant is not None else None

    def grant_for(self, token: str) -> TokenGrant | None:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._book = load_token_book(self.path)
                log.info("reloaded tokens file %s (%d tokens)", self.path, len(self._book.grants_by_hash))
            except TokenFileError as exc:
                self._book = None
                log.error("%s; every token is refused until it is fixed", exc)
        return self._book.grant_for(token) if self._book is not None else None


def main(argv: list[str] | None = None) -> int:
    """``issue CUSTOMER [--days N] [--meters a,b]``: a new token and its line for the file;
    ``hash``: the key of a token read from stdin."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "issue":
        customer, options = args[1], args[2:]
        days, meters = DEFAULT_DAYS, None
        while options:
            if options[0] == "--days" and len(options) > 1 and options[1].isdigit() and int(options[1]) > 0:
                days, options = int(options[1]), options[2:]
            elif options[0] == "--meters" and len(options) > 1 and set(options[1].split(",")) <= METERS:
                meters, options = options[1].split(","), options[2:]
            else:
                print(f"unknown or invalid option {options[0]!r}", file=sys.stderr)
                return 2
        if not _CUSTOMER_ID.match(customer):
            print(f"not a customer_id: {customer!r}", file=sys.stderr)
            return 2
        token = new_token()
        expires = (datetime.now(timezone.utc) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        scope = f", meters: [{', '.join(meters)}]" if meters else ""
        print(f"token (give it to {customer}; it is not stored anywhere; expires {expires}): {token}")
        print(f"line for the tokens file:\n\"{token_hash(token)}\": {{customer: {customer}, expires: \"{expires}\"{scope}}}")
        return 0
    if args == ["hash"]:
        print(token_hash(sys.stdin.readline().strip()))
        return 0
    print("usage: python -m meterstream.web.tokens issue CUSTOMER_ID [--days N] [--meters a,b] | hash  (token on stdin)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
