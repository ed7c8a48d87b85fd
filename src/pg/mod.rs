//! PostgreSQL plumbing shared by every layer above. No SQL-visible function
//! lives here, and nothing here knows about keys or ciphertexts.
//!
//! - [`spi`]: the one SQL helper, with a read-only path for reads;
//! - [`security`]: whose rights work runs with (extension owner, table
//!   owner in a security-restricted operation, or the caller);
//! - [`guc`]: function-local settings;
//! - [`xact`]: transaction-state checks (standby, transaction block);
//! - [`datum`]: return types pgrx does not provide (the domain, wiped
//!   plaintext buffers);
//! - [`report`]: how errors and notices reach PostgreSQL: no Rust backtrace
//!   or source location, PostgreSQL's own errors with all their fields.

pub mod datum;
pub mod guc;
pub mod report;
pub mod security;
pub mod spi;
pub mod xact;
