//! Envelope key management (DESIGN.md section 2).
//!
//! - [`rootkey`]: the root key from a file or a command, never from a table;
//!   the key check value; which root key unwraps the stored data keys.
//! - [`owner`]: running catalog work as the extension owner, so callers need
//!   no privilege on the key tables.
//! - [`cache`]: unwrapped data keys per backend, invalidated by relcache
//!   messages so a revocation is seen by every session at its next transaction.
//! - [`lifecycle`]: create, rotate, revoke, destroy, import, rewrap, info.

pub mod cache;
pub mod lifecycle;
pub mod owner;
pub mod rootkey;
