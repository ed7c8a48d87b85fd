//! Concurrency control the database enforces for every client.
//!
//! - [`optimistic`]: the optimistic-locking `version_bump()` trigger
//!   (docs/DESIGN.md section 5) and the switch re-encryption uses to leave
//!   the version alone;
//! - [`advisory`]: named advisory locks, with a stable name-to-key mapping.

pub mod advisory;
pub mod optimistic;
