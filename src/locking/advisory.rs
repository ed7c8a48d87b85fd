//! Named advisory locks: the role Redis locks play in application code,
//! with the database as the single source of truth.
//!
//! A name maps to PostgreSQL's 64-bit advisory lock key by a stable,
//! documented function, so programs in any language agree on it:
//!
//! ```text
//! key = first 8 bytes of SHA-256("manna_crypt:" || name), as a signed big-endian int64
//! ```
//!
//! In Python:
//!
//! ```text
//! digest = hashlib.sha256(b"manna_crypt:" + name.encode()).digest()
//! key = int.from_bytes(digest[:8], "big", signed=True)
//! ```
//! Any client can therefore also use `pg_advisory_lock(manna_crypt.lock_key(name))`
//! directly. Timeouts use `lock_timeout` around a normal, fair, queued lock
//! wait, so waiters are served in order and a cancel interrupts the wait.

use std::ffi::CString;

use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use sha2::{Digest, Sha256};

use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::guc::GucNest;
use crate::pg::spi::{self, Mode};

/// The advisory lock key for a name.
pub fn key_for(name: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(b"manna_crypt:")
        .chain_update(name.as_bytes())
        .finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

fn check(name: &str) {
    if name.is_empty() || name.len() > 200 {
        McError::BadArgument {
            message: "invalid lock name".into(),
            detail: Some(format!(
                "the name is {} bytes long; a lock name has 1 to 200 bytes",
                name.len()
            )),
            hint: None,
        }
        .raise();
    }
}

/// The 64-bit advisory lock key for a lock name.
#[pg_extern(immutable, strict, parallel_safe)]
fn lock_key(name: &str) -> i64 {
    check(name);
    key_for(name)
}

#[derive(Clone, Copy)]
enum Scope {
    Transaction,
    Session,
}

fn timeout_ms(timeout: Option<Interval>) -> Option<i64> {
    timeout.map(|t| {
        // Saturating: an absurd timeout means "wait very long", not an overflow.
        let micros = i64::from(t.months())
            .saturating_mul(30 * 86_400_000_000)
            .saturating_add(i64::from(t.days()).saturating_mul(86_400_000_000))
            .saturating_add(t.micros());
        if micros < 0 {
            McError::bad_arg("lock timeout must not be negative").raise();
        }
        // lock_timeout = 0 would mean "wait forever"; 1 ms is the floor.
        (micros / 1000).clamp(1, i64::from(i32::MAX))
    })
}

const LOCK_XACT: &str = "SELECT pg_catalog.pg_advisory_xact_lock($1)";
const LOCK_SESSION: &str = "SELECT pg_catalog.pg_advisory_lock($1)";
const TRY_LOCK_XACT: &str = "SELECT pg_catalog.pg_try_advisory_xact_lock($1)";
const TRY_LOCK_SESSION: &str = "SELECT pg_catalog.pg_try_advisory_lock($1)";
const UNLOCK: &str = "SELECT pg_catalog.pg_advisory_unlock($1)";

/// pg_locks rows of the int8 advisory lock `$1` in this database: the key's
/// high and low 32 bits are stored as classid and objid, objsubid = 1.
macro_rules! lock_rows {
    () => {
        "FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_catalog.pg_database \
                          WHERE datname = pg_catalog.current_database()) \
         AND classid::int8 = (($1 >> 32) & 4294967295) \
         AND objid::int8 = ($1 & 4294967295) AND objsubid = 1"
    };
}
const HELD_BY_ME: &str = concat!(
    "SELECT EXISTS (SELECT ",
    lock_rows!(),
    " AND pid = pg_catalog.pg_backend_pid())"
);
const HOLDER: &str = concat!("SELECT pid ", lock_rows!(), " LIMIT 1");

/// Taking, trying and releasing an advisory lock are function calls inside
/// a SELECT: they change no table, so the read-only path serves them and no
/// transaction id is assigned.
fn call_bool(sql: &str, key: i64) -> McResult<bool> {
    Ok(spi::one::<bool>(Mode::Read, sql, &[key.into()])?.unwrap_or(false))
}

/// Waits for the lock, at most `timeout` (NULL = wait indefinitely).
fn acquire(name: &str, scope: Scope, timeout: Option<Interval>) {
    check(name);
    let key = key_for(name);
    let sql = match scope {
        Scope::Transaction => LOCK_XACT,
        Scope::Session => LOCK_SESSION,
    };
    let Some(ms) = timeout_ms(timeout) else {
        spi::rows(Mode::Read, sql, &[key.into()], |_| Ok(())).or_raise();
        return;
    };
    let name_owned = name.to_owned();
    let settings = GucNest::new();
    let value = CString::new(ms.to_string()).unwrap_or_default();
    settings.set(c"lock_timeout", &value);
    PgTryBuilder::new(|| {
        spi::rows(Mode::Read, sql, &[key.into()], |_| Ok(())).or_raise();
    })
    .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, move |_| {
        McError::LockNotAvailable {
            message: format!("could not obtain lock \"{name_owned}\" within {ms} ms"),
            hint: "another session holds it; see pg_locks where locktype = 'advisory'".into(),
        }
        .raise()
    })
    .execute();
    drop(settings);
}

fn try_acquire(name: &str, scope: Scope) -> bool {
    check(name);
    let sql = match scope {
        Scope::Transaction => TRY_LOCK_XACT,
        Scope::Session => TRY_LOCK_SESSION,
    };
    call_bool(sql, key_for(name)).or_raise()
}

/// Takes the named lock until the end of the transaction, waiting at most
/// `timeout` (NULL: indefinitely). 55P03 on timeout.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_xact(name: Option<&str>, timeout: default!(Option<Interval>, "NULL")) {
    acquire(not_null(name, "lock name"), Scope::Transaction, timeout)
}

/// Takes the named lock until `unlock()` or the end of the session.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_session(name: Option<&str>, timeout: default!(Option<Interval>, "NULL")) {
    acquire(not_null(name, "lock name"), Scope::Session, timeout)
}

/// Takes the named lock until the end of the transaction if it is free.
#[pg_extern(volatile, parallel_unsafe)]
fn try_lock_xact(name: Option<&str>) -> bool {
    try_acquire(not_null(name, "lock name"), Scope::Transaction)
}

/// Takes the named session lock if it is free.
#[pg_extern(volatile, parallel_unsafe)]
fn try_lock_session(name: Option<&str>) -> bool {
    try_acquire(not_null(name, "lock name"), Scope::Session)
}

/// Releases one hold of a named session lock; false (with a WARNING from
/// PostgreSQL) if this session did not hold it.
#[pg_extern(volatile, parallel_unsafe)]
fn unlock(name: Option<&str>) -> bool {
    let name = not_null(name, "lock name");
    check(name);
    call_bool(UNLOCK, key_for(name)).or_raise()
}

/// Whether this session holds the named lock (either scope).
pub fn held_by_me(name: &str) -> McResult<bool> {
    call_bool(HELD_BY_ME, key_for(name))
}

/// The process id of a session holding the named lock, or NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_holder(name: Option<&str>) -> Option<i32> {
    let name = not_null(name, "lock name");
    check(name);
    holder(name).or_raise()
}

/// Takes a named session lock if free (for the re-encryption engine).
pub fn try_lock(name: &str) -> bool {
    try_acquire(name, Scope::Session)
}

/// The pid holding a named lock, if any.
pub fn holder(name: &str) -> McResult<Option<i32>> {
    spi::one::<i32>(Mode::Read, HOLDER, &[key_for(name).into()])
}

/// Releases every hold this session has on a named session lock.
pub fn unlock_all(name: &str) -> McResult<()> {
    while held_by_me(name)? {
        if !call_bool(UNLOCK, key_for(name))? {
            break;
        }
    }
    Ok(())
}
