//! The state of one re-encryption run, kept in this backend between the
//! procedure's calls (start, one step per committed batch, finish) and
//! mirrored into `manna_crypt.reencrypt_runs` by [`super::progress`].

use std::collections::HashSet;
use std::rc::Rc;
use std::time::Instant;

use pgrx::pg_sys;

use super::convert::Mode;

/// What a pass, or a whole run, has seen. Every value looked at is in
/// exactly one of converted, already, failed and other_keyring, so
/// [`Counts::seen`] is their sum, never a counter of its own that could
/// drift from them.
#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub converted: i64,
    pub already: i64,
    pub nulls: i64,
    pub failed: i64,
    pub other_keyring: i64,
}

impl Counts {
    /// Non-NULL values looked at.
    pub fn seen(&self) -> i64 {
        self.converted + self.already + self.failed + self.other_keyring
    }

    pub fn add(&mut self, other: &Counts) {
        self.converted += other.converted;
        self.already += other.already;
        self.nulls += other.nulls;
        self.failed += other.failed;
        self.other_keyring += other.other_keyring;
    }
}

pub struct Run {
    /// The `reencrypt_runs` row; negative for a dry run (nothing is stored).
    pub id: i64,
    pub oid: pg_sys::Oid,
    pub mode: Mode,
    /// The table, qualified as SQL.
    pub tbl_sql: String,
    /// The column as the caller named it (for messages) and quoted.
    pub col: String,
    pub col_sql: String,
    pub aad_sql: Option<String>,
    pub dry_run: bool,
    pub blocks_per_batch: i64,
    pub next_block: i64,
    /// The table's size when the pass started: rows appended later (our own
    /// new versions among them) belong to the next pass.
    pub pass_end_block: i64,
    pub pass_started: Instant,
    pub pass: i32,
    /// This pass only; a new pass starts from zero.
    pub pass_counts: Counts,
    /// The whole run, every session of it: each row once (pass 1 counts
    /// every outcome; a re-check pass adds only what it converts or newly
    /// fails on). `nulls` is filled in at the end.
    pub total: Counts,
    /// The ctids (`(block,offset)`) of new row versions this pass wrote into
    /// blocks it had not reached yet: a later batch of the same pass meets
    /// them again and must not count them as already in target form. Small:
    /// only free space ahead (the table's last block) receives them.
    pub own_ahead: Rc<HashSet<String>>,
    /// When the last progress NOTICE went out.
    pub last_notice: Instant,
    pub total_estimate: i64,
    pub started: Instant,
    /// Rows scanned by this session (a resumed run starts from zero).
    pub scanned_this_call: i64,
    pub lock_name: String,
    /// After a batch statement failed: its blocks, retried row by row.
    pub row_mode: Option<RowMode>,
}

/// A batch being retried one row per subtransaction, a few rows per
/// transaction (each committed subtransaction holds a transaction id until
/// the top transaction ends; PostgreSQL caches 64 per backend).
pub struct RowMode {
    /// The end of the failed batch's block range.
    pub end_block: i64,
    pub rows: Vec<Candidate>,
    /// How many of `rows` are done.
    pub done: usize,
}

impl Run {
    /// Rows scanned per second by this session.
    pub fn rate(&self) -> f64 {
        self.scanned_this_call as f64 / self.started.elapsed().as_secs_f64().max(1e-6)
    }

    /// Seconds left in this pass, at this pass's pace so far.
    pub fn eta(&self) -> f64 {
        if self.next_block == 0 {
            return 0.0;
        }
        let left = (self.pass_end_block - self.next_block).max(0) as f64;
        self.pass_started.elapsed().as_secs_f64() / self.next_block as f64 * left
    }

    /// How far this pass is, in percent of its blocks.
    pub fn percent(&self) -> f64 {
        let end = self.pass_end_block.max(1);
        self.next_block.min(end) as f64 / end as f64 * 100.0
    }
}

/// A row of a failed batch, to be retried on its own; what a failure
/// record needs if it fails again (never the value).
pub struct Candidate {
    pub ctid: String,
    pub row_key: Option<String>,
    pub class: String,
    pub length: i64,
}
