//! Transaction-state checks that PostgreSQL's own commands make.

use std::ffi::CStr;

use pgrx::pg_sys;

/// Key changes are writes: on a hot standby, refuse them the way PostgreSQL
/// refuses any write there (SQLSTATE 25006), before the first catalog write
/// would fail with an internal error trying to assign a transaction id.
pub fn refuse_during_recovery(what: &CStr) {
    // SAFETY: raises a normal ERROR during recovery, otherwise does nothing.
    unsafe { pg_sys::PreventCommandDuringRecovery(what.as_ptr()) }
}

/// Whether the current statement runs inside BEGIN ... COMMIT.
pub fn in_transaction_block() -> bool {
    // SAFETY: reads the current transaction state.
    unsafe { pg_sys::IsTransactionBlock() }
}

/// The backend's process id.
pub fn backend_pid() -> u32 {
    // SAFETY: MyProcPid is set once per process, right after fork, before
    // any SQL runs; reading it is a plain load.
    unsafe { pg_sys::MyProcPid as u32 }
}

/// Whether a transaction callback's event ends the top transaction (a
/// commit, an abort or a PREPARE, in a backend or a parallel worker).
pub fn is_end(event: pg_sys::XactEvent::Type) -> bool {
    use pg_sys::XactEvent::*;
    matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    )
}
