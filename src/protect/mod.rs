//! Protected columns (README "Protected columns", docs/DESIGN.md 7.3): a
//! `text` column whose plaintext writes are encrypted by a trigger, backed
//! by a CHECK that refuses anything else.
//!
//! - [`rules`]: what happens to one column of one row (pure);
//! - [`trigger`]: the `BEFORE INSERT OR UPDATE` trigger that applies it;
//! - [`setup`]: `protect_column()` / `unprotect_column()` and the CHECK.

pub mod rules;
pub mod setup;
pub mod trigger;

pub use setup::aad_type_error;
