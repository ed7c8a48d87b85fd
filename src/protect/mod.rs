//! Protected columns (README "Protected columns", docs/DESIGN.md 7.3): a
//! `text` column whose plaintext writes are encrypted by a trigger, backed
//! by a CHECK that refuses anything else.
//!
//! - [`rules`]: what happens to one column of one row (pure);
//! - [`row`]: the trigger's arguments and typed reads of the row;
//! - [`trigger`]: the `BEFORE INSERT OR UPDATE` trigger that applies it;
//! - [`config`]: which columns are protected and how (the trigger's
//!   arguments), `protected_columns()`;
//! - [`setup`]: `protect_column()` / `unprotect_column()` and the CHECK.

pub mod config;
pub mod row;
pub mod rules;
pub mod setup;
pub mod trigger;

pub use setup::aad_type_error;
