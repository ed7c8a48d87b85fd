//! One batch: a single UPDATE over a range of heap blocks.
//!
//! The statement's WHERE clause calls `_reencrypt_row` on each candidate
//! row, which converts the value (or records why not and returns false),
//! and its SET calls `_reencrypt_value`, which takes the value just
//! produced. Under READ COMMITTED a row that a concurrent transaction
//! changes is re-read once that writer commits and converted from the
//! writer's value: it is never overwritten with a conversion of the value
//! it replaced.
//!
//! The hand-off through [`BATCH`]'s `pending` slot relies on the executor
//! evaluating the qual and then the projection of the same row, which is
//! what a plain `UPDATE ... WHERE` does.

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::convert::{convert, Keys, Mode, Outcome};
use super::run::{Counts, Run};
use crate::error::{McError, McResult, OrRaise};
use crate::locking::optimistic::SuppressBump;
use crate::pg::spi::{self, Mode as Access};

/// A row a batch left untouched, for `reencrypt_failures` (never the value).
pub struct Failure {
    pub ctid: String,
    pub row_key: Option<String>,
    pub class: &'static str,
    pub length: i64,
    pub reason: String,
}

/// What a batch did.
pub struct BatchResult {
    /// Rows the UPDATE wrote (or, in a dry run, would write).
    pub written: i64,
    pub counts: Counts,
    pub failures: Vec<Failure>,
}

/// The state of the batch being executed, read by the two functions the
/// batch statement calls per row.
struct Batch {
    mode: Mode,
    keys: Keys,
    counts: Counts,
    failures: Vec<Failure>,
    /// The value `_reencrypt_row` produced for the row being updated; taken
    /// by `_reencrypt_value` in the same row's SET.
    pending: Option<String>,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// The batch statement's WHERE clause for blocks `[first, end)`.
fn qual(run: &Run, first: i64, end: i64) -> String {
    let aad = run
        .aad_sql
        .as_deref()
        .map_or_else(|| "NULL::text".to_owned(), |a| format!("{a}::text"));
    // A re-check pass looks for values writers put back in an old form: for
    // modes where every mc1 value is done, a cheap LIKE spares the function
    // call on every row already converted.
    let recheck = if run.pass > 1 && run.mode.any_mc1_is_done() {
        format!("AND {}::text NOT LIKE 'mc1:%' ", run.col_sql)
    } else {
        String::new()
    };
    format!(
        "ctid >= '({first},0)'::tid AND ctid < '({end},0)'::tid AND {col} IS NOT NULL {recheck}\
         AND manna_crypt._reencrypt_row(ctid, {col}::text, {aad})",
        col = run.col_sql
    )
}

/// Runs the batch over blocks `[first, end)` of the run's table.
pub fn run_batch(run: &Run, first: i64, end: i64, keys: Keys) -> McResult<BatchResult> {
    BATCH.with(|c| {
        *c.borrow_mut() = Some(Batch {
            mode: run.mode.clone(),
            keys,
            counts: Counts::default(),
            failures: Vec::new(),
            pending: None,
        })
    });
    let qual = qual(run, first, end);
    let written = if run.dry_run {
        let sql = format!("SELECT count(*) FROM ONLY {} WHERE {qual}", run.tbl_sql);
        spi::one::<i64>(Access::Read, &sql, &[]).map(|n| n.unwrap_or(0))
    } else {
        let _no_bump = SuppressBump::new(run.oid);
        let sql = format!(
            "UPDATE ONLY {tbl} SET {col} = manna_crypt._reencrypt_value() WHERE {qual}",
            tbl = run.tbl_sql,
            col = run.col_sql
        );
        spi::count(&sql, &[]).map(|n| n as i64)
    };
    // Taken before looking at the result, so no state outlives the batch.
    let batch = BATCH.with(|c| c.borrow_mut().take());
    let written = written?;
    let batch = batch.ok_or_else(|| McError::Internal("re-encryption batch state lost".into()))?;
    Ok(BatchResult {
        written,
        counts: batch.counts,
        failures: batch.failures,
    })
}

fn tid_text(tid: &pg_sys::ItemPointerData) -> String {
    let block = (u32::from(tid.ip_blkid.bi_hi) << 16) | u32::from(tid.ip_blkid.bi_lo);
    format!("({block},{})", tid.ip_posid)
}

/// Per row of a batch: converts the value and returns true (the SET then
/// writes it), or records why not and returns false (the row is untouched).
#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_row(
    ctid: Option<pg_sys::ItemPointerData>,
    value: Option<&str>,
    aad: Option<&str>,
) -> bool {
    let (Some(ctid), Some(value)) = (ctid, value) else {
        return false;
    };
    BATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let batch = guard
            .as_mut()
            .ok_or_else(|| {
                McError::bad_arg("_reencrypt_row() is only called by the re-encryption procedures")
            })
            .or_raise();
        batch.counts.scanned += 1;
        let aad_bytes = aad.unwrap_or("").as_bytes();
        match convert(&batch.mode, &batch.keys, value, aad_bytes) {
            Outcome::Convert(new) => {
                batch.pending = Some(new);
                true
            }
            Outcome::Already => false,
            Outcome::OtherKeyring => {
                batch.counts.other_keyring += 1;
                false
            }
            Outcome::Fail(class, reason) => {
                batch.counts.failed += 1;
                batch.failures.push(Failure {
                    ctid: tid_text(&ctid),
                    row_key: aad.map(str::to_owned),
                    class: class.name(),
                    length: value.len() as i64,
                    reason,
                });
                false
            }
        }
    })
}

/// The value `_reencrypt_row` just produced for this row.
#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_value() -> String {
    BATCH
        .with(|cell| cell.borrow_mut().as_mut().and_then(|b| b.pending.take()))
        .ok_or_else(|| McError::Internal("_reencrypt_value() without a converted row".into()))
        .or_raise()
}
