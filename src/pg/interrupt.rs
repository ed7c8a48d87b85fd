//! Interrupts, for code that waits on something PostgreSQL does not know
//! about (a child process) and must still answer a cancel, a
//! statement_timeout or a termination.
//!
//! Such a wait first cleans up what it waits on, then calls [`check`]:
//! a termination is a FATAL that exits the process without unwinding Rust
//! frames, so nothing may be left to clean up by then.

use std::ptr::{addr_of, read_volatile};

use pgrx::pg_sys;

/// Whether an interrupt is pending that ends the statement or the session
/// once processed: a cancel or statement_timeout (57014), a termination
/// (57P01), a lost client. False while PostgreSQL would hold it off (in a
/// critical section, with interrupts or cancels held), as it would then not
/// act on it either.
pub fn ends_statement() -> bool {
    // SAFETY: plain loads of flags and counters that signal handlers and
    // this backend set; volatile, as PostgreSQL's own macros read them.
    unsafe {
        let flag = |p: *const pg_sys::sig_atomic_t| read_volatile(p) != 0;
        if !flag(addr_of!(pg_sys::InterruptPending))
            || read_volatile(addr_of!(pg_sys::InterruptHoldoffCount)) != 0
            || read_volatile(addr_of!(pg_sys::CritSectionCount)) != 0
        {
            return false;
        }
        flag(addr_of!(pg_sys::ProcDiePending))
            || flag(addr_of!(pg_sys::ClientConnectionLost))
            || (flag(addr_of!(pg_sys::QueryCancelPending))
                && read_volatile(addr_of!(pg_sys::QueryCancelHoldoffCount)) == 0)
    }
}

/// CHECK_FOR_INTERRUPTS(): raises a pending cancel or statement_timeout as
/// PostgreSQL's own ERROR, ends the session on a termination; otherwise
/// returns.
pub fn check() {
    pgrx::check_for_interrupts!();
}
