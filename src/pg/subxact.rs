//! Running a piece of work in a subtransaction, as a PL/pgSQL `EXCEPTION`
//! block does: on a PostgreSQL error the subtransaction is rolled back and
//! the error handed back, and the transaction goes on.
//!
//! Used by the re-encryption engine to retry a failed batch row by row, so
//! one row that cannot be written (a CHECK, a unique index) is recorded and
//! skipped instead of failing the batch on every retry. Each subtransaction
//! that commits keeps its transaction id in the backend's cache of 64
//! subtransaction ids until the top transaction ends; callers keep far
//! below that per transaction, or snapshots slow down server-wide.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
use pgrx::PgSqlErrorCode;
use pgrx::PgTryBuilder;

/// Why the work in a subtransaction failed: a PostgreSQL error's SQLSTATE
/// and primary message (never its DETAIL, which may quote row values).
pub struct Failed {
    pub code: PgSqlErrorCode,
    pub message: String,
}

/// Errors that must end the whole statement, never be absorbed: a cancel,
/// a timeout, a shutdown, internal or resource failures, and a missing
/// privilege (row-level security that FORCE applies to the owner, say),
/// which no other row would escape either.
fn must_propagate(code: PgSqlErrorCode) -> bool {
    use PgSqlErrorCode::*;
    matches!(
        code,
        ERRCODE_QUERY_CANCELED
            | ERRCODE_ADMIN_SHUTDOWN
            | ERRCODE_CRASH_SHUTDOWN
            | ERRCODE_CANNOT_CONNECT_NOW
            | ERRCODE_DATABASE_DROPPED
            | ERRCODE_OUT_OF_MEMORY
            | ERRCODE_DISK_FULL
            | ERRCODE_INTERNAL_ERROR
            | ERRCODE_T_R_DEADLOCK_DETECTED
            | ERRCODE_T_R_SERIALIZATION_FAILURE
            | ERRCODE_LOCK_NOT_AVAILABLE
            | ERRCODE_INSUFFICIENT_PRIVILEGE
    )
}

/// Runs `f` in a subtransaction. A PostgreSQL error of the row's own making
/// (a constraint, a data exception, a trigger's RAISE) rolls the
/// subtransaction back and comes back as `Err`; anything else propagates.
pub fn attempt<T>(f: impl FnOnce() -> T) -> Result<T, Failed> {
    // SAFETY: plain reads of the current memory context and resource owner,
    // restored below on both paths, as PL/pgSQL's exec_stmt_block does.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: starts a subtransaction; ended on both paths below.
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let restore = move || {
        // SAFETY: back to the caller's context and owner (see above).
        unsafe {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
    };
    // The closure is not unwind-safe in general; a PostgreSQL error inside
    // it aborts the subtransaction below, so nothing it touched is reused.
    let f = std::panic::AssertUnwindSafe(f);
    PgTryBuilder::new(move || {
        let out = f();
        // SAFETY: commits the subtransaction begun above.
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        restore();
        Ok(out)
    })
    .catch_others(move |caught| {
        restore();
        // SAFETY: rolls back the subtransaction begun above; pgrx has already
        // copied and flushed the error state.
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        restore();
        let report: Option<&ErrorReportWithLevel> = match &caught {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => Some(r),
            CaughtError::RustPanic { .. } => None,
        };
        match report {
            Some(r) if !must_propagate(r.sql_error_code()) => {
                super::report::handled();
                Err(Failed {
                    code: r.sql_error_code(),
                    message: r.message().to_owned(),
                })
            }
            _ => caught.rethrow(),
        }
    })
    .execute()
}
