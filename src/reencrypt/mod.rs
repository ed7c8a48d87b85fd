//! In-place re-encryption of columns (docs/DESIGN.md section 4).
//!
//! Layered bottom-up; a module calls only the ones listed before it:
//!
//! - [`classify`]: `value_class()`, the SQL face of the core's classifier;
//! - [`convert`]: a run's mode and keys, and the decision for one value;
//! - [`index_mode`]: the blind-index backfill's mode, from the column's
//!   protection;
//! - [`target`]: which table and column may be re-encrypted, and their size;
//! - [`run`]: the state of a run between the procedure's calls;
//! - [`batch`]: one batch, a single UPDATE over a range of heap blocks;
//! - [`progress`]: the runs and failures tables, audit events;
//! - [`report`]: the NOTICEs, and the end-of-run result (run id, or the
//!   error of `raise_on_failure`);
//! - [`engine`]: start, step and finish, the functions the procedures call.

pub mod batch;
pub mod classify;
pub mod convert;
pub mod engine;
pub mod index_mode;
pub mod progress;
pub mod report;
pub mod run;
pub mod target;
