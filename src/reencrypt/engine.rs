//! The one engine behind `migrate_fernet`, `rewrap_column` and
//! `encrypt_column` (docs/DESIGN.md section 4), in its three lifecycle
//! steps.
//!
//! A procedure in SQL drives it: [`_reencrypt_start`], then
//! [`_reencrypt_step`] once per batch with a COMMIT after each, then
//! [`_reencrypt_finish`]. The run state ([`Run`]) lives in this backend
//! between those calls and is mirrored, in the same transaction as each
//! batch, into `manna_crypt.reencrypt_runs` ([`super::progress`]), so a
//! crash loses at most one batch and a rerun resumes at the recorded block.
//!
//! Batches are ranges of heap blocks (`ctid >= '(b,0)' AND ctid < '(e,0)'`,
//! a TID range scan), so no primary key is needed and each batch costs only
//! its own pages ([`super::batch`]). Safety, per row:
//! - the new value is sealed, then opened again and compared with the
//!   plaintext before it may be written;
//! - a row a concurrent transaction changes is converted from that writer's
//!   value, never overwritten (see [`super::batch`]);
//! - rows that cannot be converted are left untouched, counted and recorded
//!   in `manna_crypt.reencrypt_failures` (never with their value);
//! - the optimistic-locking version is not bumped (see
//!   [`crate::locking::optimistic::SuppressBump`]).
//!
//! After a pass that converted anything, another pass re-checks the table
//! (a writer may put a row back into an old form in a block the pass has
//! already left), up to [`MAX_PASSES`]. One run per (table, column) at a
//! time: a named advisory session lock.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Instant;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::batch::{self, run_batch, BatchResult};
use super::convert::{Keys, Mode};
use super::index_mode;
use super::progress::{self, Request};
use super::report::{self, Finished, NOTICE_EVERY};
use super::run::{Counts, RowMode, Run};
use super::target;
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::keys::{cache, grants, usage};
use crate::locking::advisory;
use crate::pg::datum::Regclass;
use crate::pg::report::notice;
use crate::pg::security::{run_as, Identity};
use crate::pg::spi::{self, Mode as Access};
use crate::pg::xact::in_transaction_block;

pub const MAX_PASSES: i32 = 3;
const MAX_BATCH: i32 = 100_000;
/// Rows retried per transaction after a batch statement failed: each
/// committed subtransaction keeps its transaction id until the top
/// transaction ends, and past 64 per backend every snapshot in the server
/// gets slower.
const ROWS_PER_STEP: usize = 50;

thread_local! {
    static RUNS: RefCell<HashMap<i64, Run>> = RefCell::new(HashMap::new());
    static NEXT_DRY_HANDLE: Cell<i64> = const { Cell::new(-1) };
    /// Run locks this session holds, with the transaction nesting level they
    /// were taken at: released by the abort callbacks.
    static LOCKS: RefCell<Vec<(String, i32)>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// A run that errors, is cancelled or is killed must not keep the run lock:
/// behind a pooled connection the session lives on, and every other session
/// would get 55P03 until it disconnects. At transaction abort (or the abort
/// of the subtransaction that took the lock) the lock is released without
/// SQL, and this backend's run state is dropped; the next run, from any
/// session, resumes from `reencrypt_runs`.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) {
        release_locks(0);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _mysubid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // SAFETY: reads the current nesting level.
        release_locks(unsafe { pg_sys::GetCurrentTransactionNestLevel() });
    }
}

/// Releases the run locks taken at nesting level `level` or deeper (all of
/// them for 0) and forgets the runs; no SQL, so it may run during abort.
fn release_locks(level: i32) {
    let released: Vec<String> = LOCKS.with(|l| {
        let mut l = l.borrow_mut();
        let (gone, kept) = l.drain(..).partition(|(_, at)| *at >= level);
        *l = kept;
        gone.into_iter().map(|(name, _)| name).collect::<Vec<_>>()
    });
    if released.is_empty() && level > 0 {
        return;
    }
    for name in &released {
        crate::pg::locks::release_session_advisory(advisory::key_for(name));
    }
    RUNS.with(|r| {
        r.borrow_mut()
            .retain(|_, run| !released.contains(&run.lock_name))
    });
    if level == 0 {
        RUNS.with(|r| r.borrow_mut().clear());
    }
    batch::forget();
}

fn register_callbacks() {
    if CALLBACKS.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: function pointers that live as long as the library (never
    // unloaded).
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

const EXTVERSION: &str =
    "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'manna_crypt'";

/// The batch statements call this library's functions by their current
/// signatures: a catalog that is not updated yet gets a clear error.
fn check_catalog_version() -> McResult<()> {
    let version = spi::one::<String>(Access::Read, EXTVERSION, &[])?.unwrap_or_default();
    if version == env!("CARGO_PKG_VERSION") {
        return Ok(());
    }
    Err(McError::WrongState {
        message: "re-encryption needs the extension updated to this library's version".into(),
        detail: Some(format!(
            "the library is {}, the database's extension is {version}",
            env!("CARGO_PKG_VERSION")
        )),
        hint: Some("ALTER EXTENSION manna_crypt UPDATE".into()),
    })
}

/// Checks what can be checked before any lock or write.
fn check_request(mode: &Mode, batch_size: i32) -> McResult<()> {
    if in_transaction_block() {
        return Err(McError::InTransactionBlock {
            message: format!("{} cannot run inside a transaction block", mode.name()),
            hint: "it commits after every batch: CALL it outside BEGIN ... COMMIT \
                   (in Alembic, inside op.get_context().autocommit_block())"
                .into(),
        });
    }
    if !(1..=MAX_BATCH).contains(&batch_size) {
        return Err(McError::BadArgument {
            message: format!("batch_size must be between 1 and {MAX_BATCH}"),
            detail: Some(format!("batch_size is {batch_size}")),
            hint: None,
        });
    }
    Ok(())
}

/// Takes the run lock of (table, column), unless this session has it.
fn lock_run(lock_name: &str, tbl_sql: &str, col: &str) -> McResult<()> {
    if advisory::held_by_me(lock_name)? {
        return Ok(());
    }
    if advisory::try_lock(lock_name) {
        // SAFETY: reads the current nesting level.
        let level = unsafe { pg_sys::GetCurrentTransactionNestLevel() };
        LOCKS.with(|l| l.borrow_mut().push((lock_name.to_owned(), level)));
        return Ok(());
    }
    let holder = advisory::holder(lock_name)?;
    Err(McError::LockNotAvailable {
        message: format!("another re-encryption of {tbl_sql}.{col} is running"),
        hint: format!(
            "wait for it to finish (backend pid {}); see manna_crypt.reencrypt_progress",
            holder.unwrap_or(0)
        ),
    })
}

/// A protected column's values are bound to its AAD column: the run uses
/// it (when `aad_column` is not given) and refuses another.
fn protected_aad(oid: pg_sys::Oid, col: &str, given: Option<&str>) -> McResult<Option<String>> {
    match (crate::protect::config::protected_aad(oid, col)?, given) {
        (None, given) => Ok(given.map(str::to_owned)),
        (Some(aad), None) => Ok(aad),
        (Some(aad), Some(g)) if aad.as_deref() == Some(g) => Ok(aad),
        (Some(aad), Some(g)) => Err(McError::bad_arg(format!(
            "column \"{col}\" is protected with AAD column {}, not \"{g}\"",
            aad.map_or("(none)".to_owned(), |a| format!("\"{a}\""))
        ))),
    }
}

fn start(
    mode: Mode,
    oid: pg_sys::Oid,
    col: &str,
    batch_size: i32,
    aad_column: Option<&str>,
    dry_run: bool,
) -> McResult<i64> {
    check_request(&mode, batch_size)?;
    check_catalog_version()?;
    register_callbacks();
    target::check_table(oid)?;
    let col_sql = target::text_column(oid, col)?;
    let aad_column = protected_aad(oid, col, aad_column)?;
    let aad_column = aad_column.as_deref();
    let aad_sql = aad_column
        .map(|a| target::aad_column(oid, a, col))
        .transpose()?;
    let tbl_sql = target::table_sql(oid)?;
    // As the caller, before anything runs as the table's owner or is
    // written (the registry among it).
    target::check_privileges(oid, col, aad_column)?;
    // Fail fast on keyring problems, before taking locks or writing anything.
    if let Some(source) = mode.source() {
        cache::fernet_keys(source)?;
    }
    Keys::fetch(&mode)?;
    mode.check_access(grants::current_user())?;
    // Its batches' writes are indexed by the protect trigger for the caller.
    if let Some((keyring, _)) = index_mode::indexed_by(oid, col)? {
        grants::require(&keyring, grants::Privilege::BlindIndex)?;
    }

    let lock_name = format!("manna_crypt:reencrypt:{}:{col}", oid.to_u32());
    lock_run(&lock_name, &tbl_sql, col)?;

    let nblocks = target::block_count(oid)?.max(1);
    let total_estimate = target::row_estimate(oid, &tbl_sql)?;
    let per_block = (total_estimate / nblocks).max(1);
    let blocks_per_batch = (i64::from(batch_size) / per_block).max(1);

    let begin = if dry_run {
        let id = NEXT_DRY_HANDLE.with(|h| h.replace(h.get() - 1));
        progress::Start {
            id,
            next_block: 0,
            pass: 1,
            total: Counts::default(),
            resumed: false,
        }
    } else {
        run_as(Identity::ExtensionOwner, || usage::register(oid, col))?;
        progress::open(&Request {
            oid,
            col,
            tbl_sql: &tbl_sql,
            mode: &mode,
            aad_column,
            batch_size,
            total_blocks: nblocks,
            total_estimate,
        })?
    };
    let run = Run {
        id: begin.id,
        oid,
        mode,
        tbl_sql,
        col: col.to_owned(),
        col_sql,
        aad_sql,
        dry_run,
        blocks_per_batch,
        next_block: begin.next_block,
        pass_end_block: nblocks,
        pass_started: Instant::now(),
        pass: begin.pass,
        pass_counts: Counts::default(),
        total: begin.total,
        own_ahead: Rc::new(HashSet::new()),
        last_notice: Instant::now(),
        total_estimate,
        started: Instant::now(),
        scanned_this_call: 0,
        lock_name,
        row_mode: None,
    };
    report::notice_start(&run, begin.resumed);
    RUNS.with(|r| r.borrow_mut().insert(begin.id, run));
    Ok(begin.id)
}

fn take_run(handle: i64) -> McResult<Run> {
    RUNS.with(|r| r.borrow_mut().remove(&handle))
        .ok_or_else(|| McError::bad_arg(format!("no re-encryption run {handle} in this session")))
}

/// One batch. Returns whether more remains.
fn step(handle: i64) -> McResult<bool> {
    let mut run = take_run(handle)?;
    // Every batch is a transaction of its own: a revoke between two is seen.
    let result = run
        .mode
        .check_access(grants::current_user())
        .and_then(|()| step_run(&mut run));
    RUNS.with(|r| r.borrow_mut().insert(handle, run));
    result
}

fn step_run(run: &mut Run) -> McResult<bool> {
    if run.row_mode.is_some() {
        return step_rows(run);
    }
    if run.next_block >= run.pass_end_block {
        return next_pass(run);
    }
    let first = run.next_block;
    let end = (first + run.blocks_per_batch).min(run.pass_end_block);
    match run_batch(run, first, end, Keys::fetch(&run.mode)?)? {
        Ok(batch) => {
            run.next_block = end;
            account(run, batch)?;
        }
        Err(failed) => {
            // One row (or more) cannot be written: retry these blocks row
            // by row, a few rows per transaction, from the next step on.
            notice(format!(
                "{} {}.{}: a batch failed ({}); retrying its rows one by one",
                run.mode.name(),
                run.tbl_sql,
                run.col,
                failed.message.chars().take(120).collect::<String>()
            ));
            let rows = batch::candidates(run, first, end)?;
            run.row_mode = Some(RowMode {
                end_block: end,
                rows,
                done: 0,
            });
        }
    }
    Ok(true)
}

/// The next few rows of a batch that failed as a whole.
fn step_rows(run: &mut Run) -> McResult<bool> {
    let Some(mut rows) = run.row_mode.take() else {
        return Ok(true);
    };
    let upto = (rows.done + ROWS_PER_STEP).min(rows.rows.len());
    let mode = run.mode.clone();
    let result = batch::run_rows(run, &rows.rows[rows.done..upto], rows.end_block, || {
        Keys::fetch(&mode)
    })?;
    rows.done = upto;
    if rows.done >= rows.rows.len() {
        run.next_block = rows.end_block;
    } else {
        run.row_mode = Some(rows);
    }
    account(run, result)?;
    Ok(true)
}

/// Adds what a batch did to the run, records it, and says so (at most
/// every [`NOTICE_EVERY`]).
fn account(run: &mut Run, batch: BatchResult) -> McResult<()> {
    let mut c = batch.counts;
    run.scanned_this_call += c.seen();
    if run.pass > 1 {
        // A re-check pass meets again what pass 1 counted: only what it
        // converts, or newly fails on, is news.
        c.already = 0;
        c.other_keyring = 0;
    }
    run.pass_counts.add(&c);
    if !batch.landed_ahead.is_empty() {
        Rc::make_mut(&mut run.own_ahead).extend(batch.landed_ahead);
    }
    if run.dry_run {
        run.total.add(&c);
    } else {
        // A row that fails again in a later pass is recorded once: count
        // the failures the table did not have yet.
        c.failed = progress::save_failures(run, &batch.failures)?;
        run.total.add(&c);
        progress::save(run)?;
    }
    if run.last_notice.elapsed() >= NOTICE_EVERY {
        report::notice_batch(run);
        run.last_notice = Instant::now();
    }
    Ok(())
}

/// At the end of a pass: start a re-check pass if this one converted
/// anything (and passes remain). Returns whether one was started.
fn next_pass(run: &mut Run) -> McResult<bool> {
    let another = !run.dry_run && run.pass_counts.converted > 0 && run.pass < MAX_PASSES;
    if another {
        run.pass += 1;
        run.next_block = 0;
        run.pass_end_block = target::block_count(run.oid)?;
        run.pass_started = Instant::now();
        run.pass_counts = Counts::default();
        run.own_ahead = Rc::new(HashSet::new());
        if run.last_notice.elapsed() >= NOTICE_EVERY {
            report::notice_new_pass(run);
            run.last_notice = Instant::now();
        }
    }
    Ok(another)
}

fn finish(handle: i64) -> McResult<()> {
    let mut run = take_run(handle)?;
    // NULLs are never looked at by a batch: counted once, at the end.
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {} IS NULL",
        run.tbl_sql, run.col_sql
    );
    run.total.nulls = run_as(Identity::TableOwner(run.oid), || {
        spi::one::<i64>(Access::Read, &sql, &[])
    })?
    .unwrap_or(0);
    if !run.dry_run {
        // Every row left untouched, by whichever pass or session met it.
        run.total.failed = progress::failure_count(run.id)?;
    }
    let seconds = run.started.elapsed().as_secs_f64();
    if !run.dry_run {
        progress::close(&run, seconds)?;
    }
    advisory::unlock_all(&run.lock_name)?;
    LOCKS.with(|l| l.borrow_mut().retain(|(name, _)| *name != run.lock_name));
    report::notice_finish(&run, seconds);
    report::remember(Finished::of(&run, handle));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_start(
    mode: Option<&str>,
    tbl: Option<Regclass>,
    col: Option<&str>,
    source_keyring: Option<&str>,
    target_keyring: Option<&str>,
    batch_size: Option<i32>,
    aad_column: Option<&str>,
    dry_run: Option<bool>,
) -> i64 {
    // The procedures pass their arguments through: a NULL is the user's.
    let tbl = not_null(tbl, "tbl");
    let col = not_null(col, "col");
    let batch_size = not_null(batch_size, "batch_size");
    let dry_run = not_null(dry_run, "dry_run");
    let mode = not_null(mode, "mode");
    if mode == "backfill_blind_index" {
        let mode = index_mode::blind_index_mode(tbl.0, col).or_raise();
        return start(mode, tbl.0, col, batch_size, None, dry_run).or_raise();
    }
    let target_keyring = not_null(target_keyring, "keyring");
    let mode = match (mode, source_keyring) {
        ("migrate_fernet", Some(source)) => Mode::MigrateFernet {
            source: source.into(),
            target: target_keyring.into(),
        },
        ("rewrap_column", _) => Mode::Rewrap {
            keyring: target_keyring.into(),
        },
        ("encrypt_column", _) => Mode::Encrypt {
            keyring: target_keyring.into(),
        },
        _ => McError::bad_arg("fernet_keyring must not be null").raise(),
    };
    start(mode, tbl.0, col, batch_size, aad_column, dry_run).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_step(handle: i64) -> bool {
    step(handle).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_finish(handle: i64) {
    finish(handle).or_raise()
}
