//! What a person (and a migration tool) is told about a run: a NOTICE when
//! it starts, a progress NOTICE at most every [`NOTICE_EVERY`], a
//! summary whose counters add up, and — with `raise_on_failure` — an error
//! after the last COMMIT when rows were left unconverted.

use std::cell::RefCell;
use std::time::Duration;

use pgrx::prelude::*;

use super::run::{Counts, Run};
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::report::notice;

/// At most one progress NOTICE this often: a person reads them, and a run
/// of small batches would otherwise print hundreds of lines a second.
pub const NOTICE_EVERY: Duration = Duration::from_secs(5);

fn prefix(run: &Run) -> String {
    format!(
        "{}{} {}.{}",
        if run.dry_run { "dry run: " } else { "" },
        run.mode.name(),
        run.tbl_sql,
        run.col
    )
}

fn rows(n: i64) -> String {
    format!("{n} row{}", if n == 1 { "" } else { "s" })
}

/// "N seen: C converted, A already in target form, F left untouched, O
/// under other keyrings" — N is the sum of the four.
fn seen(c: &Counts) -> String {
    format!(
        "{} seen: {} converted, {} already in target form, {} left untouched, \
         {} under other keyrings",
        c.seen(),
        c.converted,
        c.already,
        c.failed,
        c.other_keyring
    )
}

/// The NOTICE when a run starts or resumes.
pub fn notice_start(run: &Run, resumed: bool) {
    let what = if run.dry_run {
        "started; nothing will be written".to_owned()
    } else if resumed {
        format!(
            "resuming run {} at block {} (pass {})",
            run.id, run.next_block, run.pass
        )
    } else {
        format!("run {} started", run.id)
    };
    notice(format!(
        "{}: {what}: ~{} in {} blocks, {} blocks per batch; progress every {} s",
        prefix(run),
        rows(run.total_estimate),
        run.pass_end_block,
        run.blocks_per_batch,
        NOTICE_EVERY.as_secs()
    ));
}

/// A progress NOTICE (the engine sends one at most every NOTICE_EVERY).
/// Pass 1 counts every value once; a re-check pass reports only what it
/// converts or newly fails on.
pub fn notice_batch(run: &Run) {
    let c = &run.pass_counts;
    let counts = if run.pass == 1 {
        seen(c)
    } else {
        format!(
            "{} converted, {} newly left untouched",
            c.converted, c.failed
        )
    };
    notice(format!(
        "{}: pass {}{}, {:.0}% of ~{}: {counts}; {:.0} rows/s, ETA {:.1} s",
        prefix(run),
        run.pass,
        if run.pass == 1 { "" } else { " (re-check)" },
        run.percent(),
        rows(run.total_estimate),
        run.rate(),
        run.eta()
    ));
}

/// The NOTICE when a re-check pass begins (if no NOTICE went out lately).
pub fn notice_new_pass(run: &Run) {
    notice(format!(
        "{}: pass {}: re-checking for rows that concurrent writers changed",
        prefix(run),
        run.pass
    ));
}

/// The closing NOTICE: the run's counters, which add up to the rows of the
/// table when nobody else wrote to it meanwhile.
pub fn notice_finish(run: &Run, seconds: f64) {
    let c = &run.total;
    let total = c.seen() + c.nulls;
    if run.dry_run {
        notice(format!(
            "{}: {}: would convert {} values; {} cannot be converted; {} already in target \
             form; {} null; {} under other keyrings; nothing was written",
            prefix(run),
            rows(total),
            c.converted,
            c.failed,
            c.already,
            c.nulls,
            c.other_keyring
        ));
        return;
    }
    let failures = if c.failed > 0 {
        format!(
            "; rows left untouched: SELECT * FROM manna_crypt.reencrypt_failures WHERE run_id = {}",
            run.id
        )
    } else {
        String::new()
    };
    notice(format!(
        "{}: run {} done in {seconds:.1} s ({} pass{}): {}: {} converted, {} already in target \
         form, {} left untouched, {} null, {} under other keyrings{failures}",
        prefix(run),
        run.id,
        run.pass,
        if run.pass == 1 { "" } else { "es" },
        rows(total),
        c.converted,
        c.already,
        c.failed,
        c.nulls,
        c.other_keyring
    ));
}

/// A finished run, kept until `_reencrypt_result` (right after the COMMIT
/// that follows the run's end) hands back its id or raises.
pub struct Finished {
    pub handle: i64,
    /// None for a dry run (it records nothing).
    pub run_id: Option<i64>,
    pub failed: i64,
    converted: i64,
    what: String,
    mode: &'static str,
}

impl Finished {
    pub fn of(run: &Run, handle: i64) -> Finished {
        Finished {
            handle,
            run_id: (!run.dry_run).then_some(run.id),
            failed: run.total.failed,
            converted: run.total.converted,
            what: format!("{}.{}", run.tbl_sql, run.col),
            mode: run.mode.name(),
        }
    }

    /// 22000: rows were left unconverted (`raise_on_failure`).
    pub fn error(&self) -> McError {
        let Some(id) = self.run_id else {
            return McError::RowsLeft {
                message: format!(
                    "dry run: {} would leave {} of {} unconverted",
                    self.mode,
                    rows(self.failed),
                    self.what
                ),
                detail: format!(
                    "it would convert {}; nothing was written",
                    rows(self.converted)
                ),
                hint: "run it without dry_run: the rows are then listed in \
                       manna_crypt.reencrypt_failures with the reason"
                    .into(),
            };
        };
        McError::RowsLeft {
            message: format!(
                "{} left {} of {} unconverted",
                self.mode,
                rows(self.failed),
                self.what
            ),
            detail: format!(
                "run {id} converted {} and committed them; the rows left are as they were",
                rows(self.converted)
            ),
            hint: format!(
                "SELECT * FROM manna_crypt.reencrypt_failures WHERE run_id = {id} lists them \
                 with the reason; fix or remove them and CALL it again"
            ),
        }
    }
}

thread_local! {
    /// The last run that finished in this session, for `_reencrypt_result`,
    /// called right after the COMMIT that follows.
    static FINISHED: RefCell<Option<Finished>> = const { RefCell::new(None) };
}

/// Keeps a finished run for `_reencrypt_result`.
pub fn remember(finished: Finished) {
    FINISHED.with(|f| *f.borrow_mut() = Some(finished));
}

/// After the run's last COMMIT: its id (NULL for a dry run), or with
/// `raise_on_failure` an error (22000) if it left rows unconverted.
fn result(handle: i64, raise_on_failure: bool) -> McResult<Option<i64>> {
    let finished = FINISHED
        .with(|f| f.borrow_mut().take())
        .filter(|f| f.handle == handle)
        .ok_or_else(|| McError::bad_arg(format!("no finished re-encryption run {handle}")))?;
    if raise_on_failure && finished.failed > 0 {
        return Err(finished.error());
    }
    Ok(finished.run_id)
}

#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_result(handle: Option<i64>, raise_on_failure: Option<bool>) -> Option<i64> {
    let handle = not_null(handle, "handle");
    let raise_on_failure = not_null(raise_on_failure, "raise_on_failure");
    result(handle, raise_on_failure).or_raise()
}
