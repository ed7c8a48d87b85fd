//! PostgreSQL plumbing shared by every layer above. No SQL-visible function
//! lives here, and nothing here knows about keys or ciphertexts.
//!
//! - [`spi`]: the one SQL helper, with a read-only path for reads;
//! - [`security`]: whose rights work runs with (extension owner, table
//!   owner in a security-restricted operation, or the caller);
//! - [`guc`]: function-local settings;
//! - [`interrupt`]: cancel, statement_timeout and termination for waits
//!   PostgreSQL does not know about;
//! - [`locks`]: releasing an advisory lock where SQL is not allowed;
//! - [`subxact`]: work in a subtransaction, rolled back on a row's error;
//! - [`xact`]: transaction-state checks (standby, transaction block);
//! - [`datum`]: return types pgrx does not provide (the domain, wiped
//!   plaintext buffers);
//! - [`shmem`]: parts of the main shared memory segment and their LWLocks
//!   (needs `shared_preload_libraries`);
//! - [`secure_page`]: a locked, never-dumped page shared by every process
//!   and kept across crash restarts, for key material;
//! - [`report`]: how errors and notices reach PostgreSQL: no Rust backtrace
//!   or source location, PostgreSQL's own errors with all their fields.

pub mod datum;
pub mod guc;
pub mod interrupt;
pub mod locks;
pub mod report;
pub mod secure_page;
pub mod security;
pub mod shmem;
pub mod spi;
pub mod subxact;
pub mod xact;
