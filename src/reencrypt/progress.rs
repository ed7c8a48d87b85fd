//! A run as other sessions and the DBA see it: the `reencrypt_runs` row
//! (created, resumed, updated in each batch's transaction, closed), the
//! `reencrypt_failures` rows, the audit events, and the NOTICEs.
//!
//! Every statement here runs as the extension owner: the progress tables
//! are the owner's, and callers only read them.

use pgrx::pg_sys;
use serde_json::json;

use super::batch::Failure;
use super::convert::Mode;
use super::run::{Counts, Run};
use crate::error::McResult;
use crate::keys::store;
use crate::pg::report::notice;
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::spi::{self, Mode as Access};

const UNFINISHED: &str = "\
    SELECT run_id, mode, source_keyring, target_keyring, aad_column::text, next_block, pass \
      FROM manna_crypt.reencrypt_runs \
     WHERE tbl = $1 AND col = $2 AND status = 'running' \
     ORDER BY run_id DESC LIMIT 1";

const CLAIM: &str = "\
    UPDATE manna_crypt.reencrypt_runs SET pid = pg_backend_pid(), updated_at = now() \
     WHERE run_id = $1";

const ABANDON: &str = "\
    UPDATE manna_crypt.reencrypt_runs SET status = 'abandoned', finished_at = now() \
     WHERE run_id = $1";

const INSERT_RUN: &str = "\
    INSERT INTO manna_crypt.reencrypt_runs \
           (tbl, col, mode, source_keyring, target_keyring, batch_size, aad_column, pid, \
            total_blocks, total_rows_estimate) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, pg_backend_pid(), $8, $9) RETURNING run_id";

const INSERT_FAILURE: &str = "\
    INSERT INTO manna_crypt.reencrypt_failures \
           (run_id, row_ctid, row_key, value_class, value_length, reason) \
    VALUES ($1, $2::tid, $3, $4, $5, $6) ON CONFLICT (run_id, row_ctid) DO NOTHING";

const SAVE_PROGRESS: &str = "\
    UPDATE manna_crypt.reencrypt_runs \
       SET updated_at = now(), pass = $2, next_block = $3, total_blocks = $4, scanned = $5, \
           converted = $6, failed = greatest(failed, $7), other_keyring = $8, \
           rows_per_second = $9, eta_seconds = $10 \
     WHERE run_id = $1";

const FAILURE_COUNT: &str = "SELECT count(*) FROM manna_crypt.reencrypt_failures WHERE run_id = $1";

const CLOSE_RUN: &str = "\
    UPDATE manna_crypt.reencrypt_runs \
       SET status = 'done', finished_at = now(), updated_at = now(), eta_seconds = 0, \
           already = $2, nulls = $3, failed = $4 \
     WHERE run_id = $1";

/// What a new run asks for, to be matched against an unfinished one.
pub struct Request<'a> {
    pub oid: pg_sys::Oid,
    pub col: &'a str,
    pub tbl_sql: &'a str,
    pub mode: &'a Mode,
    pub aad_column: Option<&'a str>,
    pub batch_size: i32,
    pub total_blocks: i64,
    pub total_estimate: i64,
}

/// Where a run starts: its id, block and pass.
pub struct Start {
    pub id: i64,
    pub next_block: i64,
    pub pass: i32,
}

type Unfinished = (
    i64,
    String,
    Option<String>,
    String,
    Option<String>,
    i64,
    i32,
);

/// Resumes the unfinished run of this (table, column) if it asked for the
/// same thing (its backend died: we now hold the run lock), else abandons
/// it and records a new run. Audited as `<mode>_start`.
pub fn open(req: &Request<'_>) -> McResult<Start> {
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || {
        let unfinished: Option<Unfinished> = spi::rows(
            Access::Write,
            UNFINISHED,
            &[req.oid.into(), req.col.into()],
            |r| {
                Ok((
                    r.req(1)?,
                    r.req(2)?,
                    r.get(3)?,
                    r.req(4)?,
                    r.get(5)?,
                    r.req(6)?,
                    r.req(7)?,
                ))
            },
        )?
        .into_iter()
        .next();
        let mut start = None;
        if let Some((run_id, mode, src, tgt, aad, next_block, pass)) = unfinished {
            let same = mode == req.mode.name()
                && src.as_deref() == req.mode.source()
                && tgt == req.mode.target()
                && aad.as_deref() == req.aad_column;
            if same {
                notice(format!(
                    "{}: resuming run {run_id} of {}.{} at block {next_block} (pass {pass})",
                    req.mode.name(),
                    req.tbl_sql,
                    req.col
                ));
                spi::run(CLAIM, &[run_id.into()])?;
                start = Some(Start {
                    id: run_id,
                    next_block,
                    pass,
                });
            } else {
                spi::run(ABANDON, &[run_id.into()])?;
            }
        }
        let start = match start {
            Some(s) => s,
            None => Start {
                id: insert_run(req)?,
                next_block: 0,
                pass: 1,
            },
        };
        store::audit(
            &role,
            &format!("{}_start", req.mode.name()),
            Some(req.mode.target()),
            None,
            json!({
                "run_id": start.id, "table": req.tbl_sql, "column": req.col,
                "source_keyring": req.mode.source(), "batch_size": req.batch_size,
                "aad_column": req.aad_column, "resumed_at_block": start.next_block,
            }),
        )?;
        Ok(start)
    })
}

fn insert_run(req: &Request<'_>) -> McResult<i64> {
    let args = [
        req.oid.into(),
        req.col.into(),
        req.mode.name().into(),
        req.mode.source().into(),
        req.mode.target().into(),
        req.batch_size.into(),
        req.aad_column.into(),
        req.total_blocks.into(),
        req.total_estimate.into(),
    ];
    Ok(spi::one::<i64>(Access::Write, INSERT_RUN, &args)?.unwrap_or(0))
}

/// Records a batch's failures and the run's progress, in the batch's
/// transaction.
pub fn save(run: &Run, failures: &[Failure]) -> McResult<()> {
    let c = run.pass_counts;
    run_as(Identity::ExtensionOwner, || {
        for f in failures {
            spi::run(
                INSERT_FAILURE,
                &[
                    run.id.into(),
                    f.ctid.as_str().into(),
                    f.row_key.clone().into(),
                    f.class.into(),
                    f.length.into(),
                    f.reason.as_str().into(),
                ],
            )?;
        }
        spi::run(
            SAVE_PROGRESS,
            &[
                run.id.into(),
                run.pass.into(),
                run.next_block.into(),
                run.pass_end_block.into(),
                c.scanned.into(),
                run.converted_total.into(),
                c.failed.into(),
                c.other_keyring.into(),
                run.rate().into(),
                run.eta().into(),
            ],
        )
    })
}

/// Every row the run left untouched, whichever pass (or an earlier, crashed
/// session of a resumed run) met it.
pub fn failure_count(run_id: i64) -> McResult<i64> {
    run_as(Identity::ExtensionOwner, || {
        Ok(spi::one::<i64>(Access::Read, FAILURE_COUNT, &[run_id.into()])?.unwrap_or(0))
    })
}

/// Marks the run done, with its final counts; audited as `<mode>_end`.
pub fn close(run: &Run, c: &Counts, seconds: f64) -> McResult<()> {
    let role = caller_name();
    let summary = json!({
        "run_id": run.id, "table": run.tbl_sql, "column": run.col, "passes": run.pass,
        "converted": run.converted_total, "failed": c.failed, "already": c.already,
        "nulls": c.nulls, "other_keyring": c.other_keyring, "seconds": seconds,
    });
    run_as(Identity::ExtensionOwner, || {
        spi::run(
            CLOSE_RUN,
            &[
                run.id.into(),
                c.already.into(),
                c.nulls.into(),
                c.failed.into(),
            ],
        )?;
        store::audit(
            &role,
            &format!("{}_end", run.mode.name()),
            Some(run.mode.target()),
            None,
            summary,
        )
    })
}

/// The NOTICE after each batch.
pub fn notice_batch(run: &Run) {
    notice(format!(
        "{}{} {}.{}: pass {}, {:.0}% of ~{} rows, {} to convert seen, {} converted, \
         {} failed, {:.0} rows/s, ETA {:.1} s",
        if run.dry_run { "dry run: " } else { "" },
        run.mode.name(),
        run.tbl_sql,
        run.col,
        run.pass,
        run.percent(),
        run.total_estimate,
        run.pass_counts.scanned,
        if run.dry_run {
            run.pass_counts.converted
        } else {
            run.converted_total
        },
        run.pass_counts.failed,
        run.rate(),
        run.eta()
    ));
}

/// The NOTICE when a re-check pass begins.
pub fn notice_new_pass(run: &Run) {
    notice(format!(
        "{} {}.{}: pass {}: re-checking for rows that concurrent writers changed",
        run.mode.name(),
        run.tbl_sql,
        run.col,
        run.pass
    ));
}

/// The closing NOTICE.
pub fn notice_finish(run: &Run, c: &Counts, seconds: f64) {
    if run.dry_run {
        notice(format!(
            "dry run: {} {}.{} would convert {} values; {} cannot be converted; \
             {} already in target form; {} null; {} under other keyrings; nothing was written",
            run.mode.name(),
            run.tbl_sql,
            run.col,
            c.converted,
            c.failed,
            c.already,
            c.nulls,
            c.other_keyring
        ));
    } else {
        notice(format!(
            "{} {}.{} done in {:.1} s ({} pass{}): {} converted, {} left untouched \
             (see manna_crypt.reencrypt_failures, run {}), {} already in target form, \
             {} null, {} under other keyrings",
            run.mode.name(),
            run.tbl_sql,
            run.col,
            seconds,
            run.pass,
            if run.pass == 1 { "" } else { "es" },
            run.converted_total,
            c.failed,
            run.id,
            c.already,
            c.nulls,
            c.other_keyring
        ));
    }
}
