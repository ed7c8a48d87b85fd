//! One batch: a single UPDATE over a range of heap blocks, run as the
//! table's owner in a security-restricted operation.
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
//! evaluating the qual and then the projection of the same row; the slot
//! carries the row's ctid and `_reencrypt_value` refuses (XX000, an internal
//! invariant) a value meant for another row. Both functions also take the
//! batch's random token, which only the batch statement's text carries: the
//! table owner's triggers run inside the batch, and must not be able to use
//! it as an encryption oracle.
//!
//! If the batch statement fails (a CHECK or unique index that one converted
//! row violates, a trigger's RAISE), it is rolled back and the engine retries
//! the same blocks row by row, each row in its own subtransaction
//! ([`run_rows`]): a row that cannot be written is recorded and skipped.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

use manna_crypt_core::nonce::NonceSource;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::convert::{convert, Keys, Mode, Outcome};
use super::run::{Candidate, Counts, Run};
use crate::error::{McError, McResult};
use crate::locking::optimistic::SuppressBump;
use crate::pg::security::{run_as, Identity};
use crate::pg::spi::{self, Mode as Access};
use crate::pg::subxact::{self, Failed};

/// A row a batch left untouched, for `reencrypt_failures` (never the value).
pub struct Failure {
    pub ctid: String,
    pub row_key: Option<String>,
    pub class: &'static str,
    pub length: i64,
    pub reason: String,
}

/// What a batch did. `counts.converted` is the rows the UPDATE wrote (or,
/// in a dry run, would write).
#[derive(Default)]
pub struct BatchResult {
    pub counts: Counts,
    pub failures: Vec<Failure>,
    /// The ctids of new row versions written at or past the block
    /// `execute` was told the pass has yet to reach (see `Run::own_ahead`).
    pub landed_ahead: Vec<String>,
}

impl BatchResult {
    fn add(&mut self, other: BatchResult) {
        self.counts.add(&other.counts);
        self.failures.extend(other.failures);
        self.landed_ahead.extend(other.landed_ahead);
    }
}

/// The state of the batch being executed, read by the two functions the
/// batch statement calls per row.
struct Batch {
    mode: Mode,
    keys: Keys,
    token: i64,
    counts: Counts,
    failures: Vec<Failure>,
    /// This pass's own new row versions ahead of it (`Run::own_ahead`).
    own: Rc<HashSet<String>>,
    /// The value `_reencrypt_row` produced for the row being updated, with
    /// that row's ctid; taken by `_reencrypt_value` in the same row's SET.
    pending: Option<(pg_sys::ItemPointerData, String)>,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
    static TOKENS: RefCell<NonceSource> = const { RefCell::new(NonceSource::new()) };
}

/// Forgets any batch state (after an abort: the statement that used it is
/// gone).
pub fn forget() {
    BATCH.with(|c| c.borrow_mut().take());
}

fn new_token() -> i64 {
    TOKENS.with(|t| {
        let n = t.borrow_mut().draw();
        i64::from_be_bytes(n[..8].try_into().unwrap_or([0; 8]))
    })
}

/// The AAD of a row as SQL: the AAD column's text form, or NULL.
fn aad_text(run: &Run) -> String {
    run.aad_sql
        .as_deref()
        .map_or_else(|| "NULL::text".to_owned(), |a| format!("{a}::text"))
}

/// The rows a batch statement looks at: `range` is a ctid condition.
fn qual(run: &Run, range: &str, token: i64) -> String {
    let aad = aad_text(run);
    // A re-check pass looks for values writers put back in an old form: for
    // modes where every mc1 value is done, a cheap LIKE spares the function
    // call on every row already converted.
    let recheck = if run.pass > 1 && run.mode.any_mc1_is_done() {
        format!("AND {}::text NOT LIKE 'mc1:%' ", run.col_sql)
    } else {
        String::new()
    };
    // A backfill also hands over the row's current term.
    let current = match &run.mode {
        Mode::BlindIndex { index_sql, .. } => format!(", {index_sql}"),
        _ => String::new(),
    };
    format!(
        "{range} AND {col} IS NOT NULL {recheck}\
         AND manna_crypt._reencrypt_row(ctid, {col}::text, {aad}, {token}{current})",
        col = run.col_sql
    )
}

/// The batch's SET: the converted value into the column, or a backfill's
/// term (handed over as hex) into the blind-index column.
fn assignment(run: &Run, token: i64) -> String {
    match &run.mode {
        Mode::BlindIndex { index_sql, .. } => format!(
            "{index_sql} = pg_catalog.decode(manna_crypt._reencrypt_value(ctid, {token}), 'hex')"
        ),
        _ => format!(
            "{} = manna_crypt._reencrypt_value(ctid, {token})",
            run.col_sql
        ),
    }
}

fn block_range(first: i64, end: i64) -> String {
    format!("ctid >= '({first},0)'::tid AND ctid < '({end},0)'::tid")
}

/// Runs one batch statement over the rows `range` selects, with fresh batch
/// state, as the table's owner. New row versions written into blocks
/// `[ahead_from, pass_end_block)` are reported in `landed_ahead`. The
/// statement's error propagates; the batch state is cleared either way.
fn execute(run: &Run, range: &str, keys: Keys, ahead_from: i64) -> McResult<BatchResult> {
    let token = new_token();
    BATCH.with(|c| {
        *c.borrow_mut() = Some(Batch {
            mode: run.mode.clone(),
            keys,
            token,
            counts: Counts::default(),
            failures: Vec::new(),
            own: run.own_ahead.clone(),
            pending: None,
        })
    });
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            forget();
        }
    }
    let _clear = Clear;
    let qual = qual(run, range, token);
    let (written, landed_ahead) = run_as(Identity::TableOwner(run.oid), || {
        if run.dry_run {
            let sql = format!("SELECT count(*) FROM ONLY {} WHERE {qual}", run.tbl_sql);
            Ok((
                spi::one::<i64>(Access::Read, &sql, &[])?.unwrap_or(0),
                Vec::new(),
            ))
        } else {
            let _no_bump = SuppressBump::new(run.oid);
            // One row per row written: the new version's ctid when it lies
            // in the part of the pass still to come, else NULL.
            let sql = format!(
                "UPDATE ONLY {tbl} SET {set} \
                 WHERE {qual} RETURNING CASE WHEN {ahead} THEN ctid::text END",
                tbl = run.tbl_sql,
                set = assignment(run, token),
                ahead = block_range(ahead_from, run.pass_end_block)
            );
            let new = spi::rows(Access::Write, &sql, &[], |r| r.get::<String>(1))?;
            let written = new.len() as i64;
            Ok((written, new.into_iter().flatten().collect()))
        }
    })?;
    let batch = BATCH
        .with(|c| c.borrow_mut().take())
        .ok_or_else(|| McError::Internal("re-encryption batch state lost".into()))?;
    let mut counts = batch.counts;
    counts.converted = written;
    Ok(BatchResult {
        counts,
        failures: batch.failures,
        landed_ahead,
    })
}

/// Runs the batch over blocks `[first, end)`. A dry run reads only; a real
/// one runs in a subtransaction, and `Ok(Err(_))` means it was rolled back
/// and the blocks should be retried row by row.
pub fn run_batch(
    run: &Run,
    first: i64,
    end: i64,
    keys: Keys,
) -> McResult<Result<BatchResult, Failed>> {
    let range = block_range(first, end);
    if run.dry_run {
        return execute(run, &range, keys, end).map(Ok);
    }
    match subxact::attempt(|| execute(run, &range, keys, end)) {
        Ok(result) => result.map(Ok),
        Err(failed) => Ok(Err(failed)),
    }
}

const CANDIDATES: &str = "\
    SELECT ctid::text, {aad}, manna_crypt.value_class({col}::text), \
           octet_length({col}::text)::int8 \
      FROM ONLY {tbl} WHERE {range} AND {col} IS NOT NULL ORDER BY ctid";

/// The rows of blocks `[first, end)` with a value, as the table's owner.
pub fn candidates(run: &Run, first: i64, end: i64) -> McResult<Vec<Candidate>> {
    let sql = CANDIDATES
        .replace("{aad}", &aad_text(run))
        .replace("{col}", &run.col_sql)
        .replace("{tbl}", &run.tbl_sql)
        .replace("{range}", &block_range(first, end));
    run_as(Identity::TableOwner(run.oid), || {
        spi::rows(Access::Read, &sql, &[], |r| {
            Ok(Candidate {
                ctid: r.req(1)?,
                row_key: r.get(2)?,
                class: r.req(3)?,
                length: r.req(4)?,
            })
        })
    })
}

/// Converts the given rows one at a time, each in its own subtransaction:
/// a row whose write fails is recorded (SQLSTATE and primary message only:
/// a DETAIL may quote row values) and skipped. Keep `rows` short: every
/// committed subtransaction holds a transaction id until the batch commits.
pub fn run_rows(
    run: &Run,
    rows: &[Candidate],
    ahead_from: i64,
    keys: impl Fn() -> McResult<Keys>,
) -> McResult<BatchResult> {
    let mut total = BatchResult::default();
    for row in rows {
        let range = format!("ctid = '{}'::tid", row.ctid);
        let keys = keys()?;
        match subxact::attempt(|| execute(run, &range, keys, ahead_from)) {
            Ok(result) => total.add(result?),
            Err(failed) => {
                total.counts.failed += 1;
                total.failures.push(Failure {
                    ctid: row.ctid.clone(),
                    row_key: row.row_key.clone(),
                    class: class_name(&row.class),
                    length: row.length,
                    reason: reason_of(&failed),
                });
            }
        }
    }
    Ok(total)
}

fn class_name(class: &str) -> &'static str {
    match class {
        "mc1" => "mc1",
        "fernet" => "fernet",
        "malformed" => "malformed",
        _ => "plaintext",
    }
}

/// "the row could not be written: SQLSTATE: message", at most ~200 bytes.
fn reason_of(failed: &Failed) -> String {
    let mut message = failed.message.clone();
    if message.len() > 160 {
        let mut cut = 160;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    format!(
        "the row could not be written ({}): {message}",
        sqlstate(failed.code)
    )
}

/// The five-character SQLSTATE of an error code.
fn sqlstate(code: pgrx::PgSqlErrorCode) -> String {
    let mut n = code as i32;
    let mut out = String::with_capacity(5);
    for _ in 0..5 {
        out.push(char::from(b'0' + (n & 0x3f) as u8));
        n >>= 6;
    }
    out
}

fn tid_text(tid: &pg_sys::ItemPointerData) -> String {
    let block = (u32::from(tid.ip_blkid.bi_hi) << 16) | u32::from(tid.ip_blkid.bi_lo);
    format!("({block},{})", tid.ip_posid)
}

fn same_tid(a: &pg_sys::ItemPointerData, b: &pg_sys::ItemPointerData) -> bool {
    a.ip_blkid.bi_hi == b.ip_blkid.bi_hi
        && a.ip_blkid.bi_lo == b.ip_blkid.bi_lo
        && a.ip_posid == b.ip_posid
}

/// The batch in progress, if `token` is its token.
fn with_batch<T>(token: i64, f: impl FnOnce(&mut Batch) -> T) -> T {
    BATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        match guard.as_mut() {
            Some(batch) if batch.token == token => f(batch),
            _ => McError::PermissionDenied {
                message: "manna_crypt's internal re-encryption functions are only called by \
                          the re-encryption procedures"
                    .into(),
                hint: "use CALL manna_crypt.migrate_fernet / rewrap_column / encrypt_column".into(),
            }
            .raise(),
        }
    })
}

/// Per row of a batch: converts the value and returns true (the SET then
/// writes it), or records why not and returns false (the row is untouched).
#[pg_extern(name = "_reencrypt_row", volatile, parallel_unsafe)]
fn _reencrypt_convert(
    ctid: Option<pg_sys::ItemPointerData>,
    value: Option<&str>,
    aad: Option<&str>,
    token: Option<i64>,
) -> bool {
    convert_row(ctid, value, aad, token, None)
}

/// The same for a blind-index backfill, with the row's current term.
#[pg_extern(name = "_reencrypt_row", volatile, parallel_unsafe)]
fn _reencrypt_index_row(
    ctid: Option<pg_sys::ItemPointerData>,
    value: Option<&str>,
    aad: Option<&str>,
    token: Option<i64>,
    current: Option<&[u8]>,
) -> bool {
    convert_row(ctid, value, aad, token, current)
}

fn convert_row(
    ctid: Option<pg_sys::ItemPointerData>,
    value: Option<&str>,
    aad: Option<&str>,
    token: Option<i64>,
    current: Option<&[u8]>,
) -> bool {
    let token = token.unwrap_or(0);
    with_batch(token, |batch| {
        let (Some(ctid), Some(value)) = (ctid, value) else {
            return false;
        };
        let outcome = convert(
            &batch.mode,
            &batch.keys,
            value,
            aad.unwrap_or("").as_bytes(),
            current,
        );
        match outcome {
            Outcome::Convert(new) => {
                batch.pending = Some((ctid, new));
                true
            }
            Outcome::Already => {
                // Not this run's own new version met again further on.
                if batch.own.is_empty() || !batch.own.contains(&tid_text(&ctid)) {
                    batch.counts.already += 1;
                }
                false
            }
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

/// The value `_reencrypt_row` just produced for the row at `ctid`.
#[pg_extern(name = "_reencrypt_value", volatile, parallel_unsafe)]
fn _reencrypt_take(ctid: Option<pg_sys::ItemPointerData>, token: Option<i64>) -> String {
    with_batch(token.unwrap_or(0), |batch| {
        match (batch.pending.take(), ctid) {
            (Some((for_row, value)), Some(ctid)) if same_tid(&for_row, &ctid) => value,
            _ => McError::Internal(
                "re-encryption invariant broken: the converted value is not for this row".into(),
            )
            .raise(),
        }
    })
}

/// 0.1.0's per-row functions, kept as symbols only: a 0.1.0 catalog served
/// by this library (before `ALTER EXTENSION manna_crypt UPDATE`) reaches
/// them, and gets a clear error instead of undefined behaviour.
fn needs_update() -> ! {
    McError::WrongState {
        message: "re-encryption needs the extension updated to this library's version".into(),
        detail: Some("the database's manna_crypt catalog is older than its library".into()),
        hint: Some("ALTER EXTENSION manna_crypt UPDATE".into()),
    }
    .raise()
}

#[pg_extern(sql = false)]
fn _reencrypt_row(
    _ctid: Option<pg_sys::ItemPointerData>,
    _value: Option<&str>,
    _aad: Option<&str>,
) -> bool {
    needs_update()
}

#[pg_extern(sql = false)]
fn _reencrypt_value() -> String {
    needs_update()
}
