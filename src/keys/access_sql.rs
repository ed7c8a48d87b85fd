//! The SQL side of the key access statistics: `_key_access()` under the
//! `key_access` view, `reset_key_access_stats()` and
//! `key_access_stats_status()`.
//!
//! Who sees what: members of `manna_crypt_admin` and superusers see every
//! row of the database; any other caller the rows of the roles whose
//! privileges it has (PostgreSQL's rule for other sessions' queries in
//! `pg_stat_activity`), so an application role sees its own calls.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;

use manna_crypt_core::access::hour_start;

use super::access_stats::{self, current_hour, my_db, AccessOp};
use super::access_table;
use super::store;
use crate::error::{McError, McResult, OrRaise};
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::xact::refuse_during_recovery;

fn not_preloaded() -> McError {
    McError::WrongState {
        message: "manna_crypt is not loaded through shared_preload_libraries".into(),
        detail: Some("the key access statistics live in shared memory".into()),
        hint: Some("add manna_crypt to shared_preload_libraries and restart the server".into()),
    }
}

fn require_table() -> McResult<()> {
    match access_table::available() {
        true => Ok(()),
        false => Err(not_preloaded()),
    }
}

/// Whether the current user may see the calls of `role`.
fn visibility() -> impl Fn(u32) -> bool {
    // SAFETY: plain catalog lookups for the current user; a missing role
    // gives InvalidOid (missing_ok), of which nobody has the privileges.
    let (me, admin) = unsafe {
        let me = pg_sys::GetUserId();
        let admin_role = pg_sys::get_role_oid(c"manna_crypt_admin".as_ptr(), true);
        let admin = pg_sys::superuser()
            || (admin_role != pg_sys::InvalidOid && pg_sys::has_privs_of_role(me, admin_role));
        (me, admin)
    };
    move |role| {
        // SAFETY: as above; a dropped role's id is nobody's.
        admin || unsafe { pg_sys::has_privs_of_role(me, pg_sys::Oid::from(role)) }
    }
}

type Row = (
    pg_sys::Oid,
    pg_sys::Oid,
    i32,
    &'static str,
    Option<TimestampWithTimeZone>,
    i64,
);

/// This database's calls by (role, keyring, operation, hour), with this
/// session's calls not yet handed over counted in the current hour.
// pgrx reads the column names from the `name!` macros in the signature
// itself, so the type cannot be factored out.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_restricted)]
fn _key_access() -> TableIterator<
    'static,
    (
        name!(database, pg_sys::Oid),
        name!(role_oid, pg_sys::Oid),
        name!(keyring_id, i32),
        name!(operation, &'static str),
        name!(bucket_start, Option<TimestampWithTimeZone>),
        name!(calls, i64),
    ),
> {
    require_table().or_raise();
    let (db, now) = (my_db(), current_hour());
    let mut all = std::collections::BTreeMap::new();
    for ((_, role, ring, op, hour), n) in access_table::snapshot(Some(db), now) {
        *all.entry((role, ring, op, hour)).or_insert(0u64) += n;
    }
    for ((role, ring, op), n) in access_stats::peek_local() {
        *all.entry((role, ring, op, now)).or_insert(0u64) += n;
    }
    let visible = visibility();
    let rows: Vec<Row> = all
        .into_iter()
        .filter(|((role, ..), _)| visible(*role))
        .filter_map(|((role, ring, op, hour), n)| {
            Some((
                pg_sys::Oid::from(db),
                pg_sys::Oid::from(role),
                i32::try_from(ring).ok()?,
                AccessOp::from_code(op)?.name(),
                TimestampWithTimeZone::try_from(hour_start(hour)).ok(),
                i64::try_from(n).unwrap_or(i64::MAX),
            ))
        })
        .collect();
    TableIterator::new(rows)
}

/// Forgets this database's statistics when the calling transaction
/// commits, recorded in the audit log.
#[pg_extern(volatile, parallel_unsafe)]
fn reset_key_access_stats() {
    refuse_during_recovery(c"manna_crypt.reset_key_access_stats()");
    require_table().or_raise();
    let role = caller_name();
    let (db, now) = (my_db(), current_hour());
    let rows = access_table::snapshot(Some(db), now);
    let calls: u64 = rows.iter().map(|(_, n)| n).sum();
    let detail = json!({ "entries": rows.len(), "calls": calls });
    run_as(Identity::ExtensionOwner, || {
        store::audit(&role, "reset_key_access_stats", None, None, detail)
    })
    .or_raise();
    access_stats::reset_at_commit();
}

/// The shared table as a whole: capacity, entries in use (all databases),
/// calls dropped for lack of room since the statistics began, retention.
#[pg_extern(volatile, parallel_safe)]
fn key_access_stats_status() -> TableIterator<
    'static,
    (
        name!(capacity, i32),
        name!(entries, i32),
        name!(dropped_calls, i64),
        name!(retention_days, i32),
    ),
> {
    require_table().or_raise();
    let (capacity, entries, dropped) = access_table::status();
    TableIterator::once((
        capacity as i32,
        entries as i32,
        i64::try_from(dropped).unwrap_or(i64::MAX),
        access_table::RETENTION_DAYS.get(),
    ))
}
