//! A run as other sessions and the DBA see it: the `reencrypt_runs` row
//! (created, resumed, updated in each batch's transaction, closed), the
//! `reencrypt_failures` rows and the audit events. The NOTICEs are
//! [`super::report`]'s.
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
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::spi::{self, Mode as Access};

const UNFINISHED: &str = "\
    SELECT run_id, mode, source_keyring, target_keyring, aad_column::text, next_block, pass, \
           converted, already, failed, other_keyring \
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

// The counters are the run's (every pass and session): they add up,
// scanned = converted + already + failed + other_keyring.
const SAVE_PROGRESS: &str = "\
    UPDATE manna_crypt.reencrypt_runs \
       SET updated_at = now(), pass = $2, next_block = $3, total_blocks = $4, scanned = $5, \
           converted = $6, already = $7, failed = $8, other_keyring = $9, \
           rows_per_second = $10, eta_seconds = $11 \
     WHERE run_id = $1";

const FAILURE_COUNT: &str = "SELECT count(*) FROM manna_crypt.reencrypt_failures WHERE run_id = $1";

const CLOSE_RUN: &str = "\
    UPDATE manna_crypt.reencrypt_runs \
       SET status = 'done', finished_at = now(), updated_at = now(), eta_seconds = 0, \
           scanned = $2, converted = $3, already = $4, failed = $5, other_keyring = $6, \
           nulls = $7 \
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

/// Where a run starts: its id, block and pass, and (resumed) its counts.
pub struct Start {
    pub id: i64,
    pub next_block: i64,
    pub pass: i32,
    pub total: Counts,
    pub resumed: bool,
}

/// The unfinished run of a (table, column), as recorded.
struct Unfinished {
    run_id: i64,
    mode: String,
    source: Option<String>,
    target: String,
    aad: Option<String>,
    next_block: i64,
    pass: i32,
    total: Counts,
}

fn unfinished(req: &Request<'_>) -> McResult<Option<Unfinished>> {
    let found = spi::rows(
        Access::Write,
        UNFINISHED,
        &[req.oid.into(), req.col.into()],
        |r| {
            Ok(Unfinished {
                run_id: r.req(1)?,
                mode: r.req(2)?,
                source: r.get(3)?,
                target: r.req(4)?,
                aad: r.get(5)?,
                next_block: r.req(6)?,
                pass: r.req(7)?,
                total: Counts {
                    converted: r.req(8)?,
                    already: r.req(9)?,
                    failed: r.req(10)?,
                    other_keyring: r.req(11)?,
                    nulls: 0,
                },
            })
        },
    )?;
    Ok(found.into_iter().next())
}

/// Resumes the unfinished run of this (table, column) if it asked for the
/// same thing (its backend died: we now hold the run lock), else abandons
/// it and records a new run. Audited as `<mode>_start`.
pub fn open(req: &Request<'_>) -> McResult<Start> {
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || {
        let mut start = None;
        if let Some(u) = unfinished(req)? {
            let same = u.mode == req.mode.name()
                && u.source.as_deref() == req.mode.source()
                && u.target == req.mode.target()
                && u.aad.as_deref() == req.aad_column;
            if same {
                spi::run(CLAIM, &[u.run_id.into()])?;
                start = Some(Start {
                    id: u.run_id,
                    next_block: u.next_block,
                    pass: u.pass,
                    total: u.total,
                    resumed: true,
                });
            } else {
                spi::run(ABANDON, &[u.run_id.into()])?;
            }
        }
        let start = match start {
            Some(s) => s,
            None => Start {
                id: insert_run(req)?,
                next_block: 0,
                pass: 1,
                total: Counts::default(),
                resumed: false,
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

/// Records a batch's failures, in the batch's transaction. Returns how
/// many were new to the run (a row that fails again in a later pass is
/// recorded once).
pub fn save_failures(run: &Run, failures: &[Failure]) -> McResult<i64> {
    run_as(Identity::ExtensionOwner, || {
        let mut new = 0;
        for f in failures {
            let args = [
                run.id.into(),
                f.ctid.as_str().into(),
                f.row_key.clone().into(),
                f.class.into(),
                f.length.into(),
                f.reason.as_str().into(),
            ];
            new += spi::count(INSERT_FAILURE, &args)? as i64;
        }
        Ok(new)
    })
}

/// Records the run's progress, in the batch's transaction.
pub fn save(run: &Run) -> McResult<()> {
    let c = run.total;
    run_as(Identity::ExtensionOwner, || {
        spi::run(
            SAVE_PROGRESS,
            &[
                run.id.into(),
                run.pass.into(),
                run.next_block.into(),
                run.pass_end_block.into(),
                c.seen().into(),
                c.converted.into(),
                c.already.into(),
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
pub fn close(run: &Run, seconds: f64) -> McResult<()> {
    let role = caller_name();
    let c = run.total;
    let summary = json!({
        "run_id": run.id, "table": run.tbl_sql, "column": run.col, "passes": run.pass,
        "converted": c.converted, "failed": c.failed, "already": c.already,
        "nulls": c.nulls, "other_keyring": c.other_keyring, "seconds": seconds,
    });
    run_as(Identity::ExtensionOwner, || {
        spi::run(
            CLOSE_RUN,
            &[
                run.id.into(),
                c.seen().into(),
                c.converted.into(),
                c.already.into(),
                c.failed.into(),
                c.other_keyring.into(),
                c.nulls.into(),
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
