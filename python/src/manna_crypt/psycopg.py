"""psycopg 3 helpers: the server's NOTICEs (a re-encryption's progress) in
Python logging, and a health check an application role may call.

    import logging, psycopg
    from manna_crypt.psycopg import forward_notices

    logging.basicConfig(level=logging.INFO)
    with psycopg.connect(dsn, autocommit=True) as conn:
        forward_notices(conn)
        conn.execute("CALL manna_crypt.rewrap_column('plaid_items', 'access_token', "
                     "'plaid_tokens', aad_column => 'id')")
        # INFO manna_crypt: NOTICE: rewrap_column ... 12.5% of pass 1 ...

manna_crypt's NOTICEs never carry key material or plaintext, so forwarding
them is safe. Needs psycopg 3 (extra: manna-crypt[psycopg]); the SQLAlchemy
and Alembic modules use `log_notice` with psycopg 2 as well.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional

__all__ = ["LOGGER_NAME", "log_notice", "forward_notices", "notices_forwarded", "health", "health_check"]

LOGGER_NAME = "manna_crypt"

# PostgreSQL severities (non-localized) -> logging levels.
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "LOG": logging.DEBUG,
    "INFO": logging.INFO,
    "NOTICE": logging.INFO,
    "WARNING": logging.WARNING,
}


def log_notice(logger: logging.Logger, severity: str, message: str, detail: Optional[str] = None,
               hint: Optional[str] = None) -> None:
    """One server notice as one log record (DETAIL and HINT appended)."""
    sev = (severity or "NOTICE").upper()
    text = f"{sev}: {message}"
    if detail:
        text += f" (DETAIL: {detail})"
    if hint:
        text += f" (HINT: {hint})"
    logger.log(_LEVELS.get(sev, logging.INFO), "%s", text)


def _handler(logger: logging.Logger) -> Callable[[Any], None]:
    def handle(diag: Any) -> None:
        log_notice(
            logger,
            diag.severity_nonlocalized or diag.severity or "NOTICE",
            diag.message_primary or "",
            diag.message_detail,
            diag.message_hint,
        )

    return handle


def forward_notices(conn: Any, logger: Optional[logging.Logger] = None) -> Callable[[Any], None]:
    """Send every NOTICE/WARNING `conn` (a psycopg 3 connection) receives to
    `logger` (default: the "manna_crypt" logger) as it arrives — during a
    long CALL too, not only at its end. Returns the handler, for
    conn.remove_notice_handler()."""
    handler = _handler(logger or logging.getLogger(LOGGER_NAME))
    conn.add_notice_handler(handler)
    return handler


@contextlib.contextmanager
def notices_forwarded(conn: Any, logger: Optional[logging.Logger] = None) -> Iterator[None]:
    """forward_notices() for the duration of a with-block."""
    handler = forward_notices(conn, logger)
    try:
        yield
    finally:
        conn.remove_notice_handler(handler)


def health(conn: Any) -> dict:
    """manna_crypt.health(): {"version", "ok", "root_key_state"[, "error"]}.
    `ok` is true when the root key is loaded and matches the stored keys.
    Cheap (no key is unwrapped, nothing is written); for liveness probes."""
    row = conn.execute("SELECT manna_crypt.health()").fetchone()
    return row[0]


HEALTH_CHECK_SQL = (
    "SELECT manna_crypt.decrypt_gcm(manna_crypt.encrypt_gcm('manna_crypt health check', %s, 'health'),"
    " 'health') = 'manna_crypt health check'"
)


def health_check(conn: Any, keyring: str) -> bool:
    """A deeper check than health(), for readiness probes: true when this session can encrypt under `keyring` and decrypt the
    result: the root key is loaded, the keyring exists and has an active,
    usable key, and the role holds manna_crypt_user and the encrypt and
    decrypt grants on the keyring (grant_keyring_access). Anything else raises
    the database's error (its SQLSTATE says which: 58P01/58030/F0000 root
    key, 42704 no such keyring, 55000 no active key, 42501 privilege).
    Writes nothing; callable by an application role."""
    row = conn.execute(HEALTH_CHECK_SQL, (keyring,)).fetchone()
    return bool(row and row[0])
