//! The one engine behind `migrate_fernet`, `rewrap_column` and
//! `encrypt_column` (DESIGN.md section 4).
//!
//! A procedure in SQL drives it: `_reencrypt_start`, then `_reencrypt_step`
//! once per batch with a COMMIT after each, then `_reencrypt_finish`. The run
//! state lives in this backend between those calls and is mirrored, in the
//! same transaction as each batch, into `manna_crypt.reencrypt_runs`, so a
//! crash loses at most one batch and a rerun resumes at the recorded block.
//!
//! Batches are ranges of heap blocks (`ctid >= '(b,0)' AND ctid < '(e,0)'`,
//! a TID range scan), so no primary key is needed and each batch costs only
//! its own pages. Safety, per row:
//! - the new value is sealed, then opened again and compared with the
//!   plaintext before it may be written;
//! - each batch is one UPDATE whose WHERE clause converts the row it is
//!   looking at (`_reencrypt_row`) and whose SET writes that conversion
//!   (`_reencrypt_value`): under READ COMMITTED, a row a concurrent
//!   transaction changes is re-read after that writer commits and converted
//!   from the writer's value, so no write is ever lost or undone;
//! - rows that cannot be converted are left untouched, counted and recorded
//!   in `manna_crypt.reencrypt_failures` (never with their value);
//! - the optimistic-locking version is not bumped (see
//!   [`crate::locking::version::SuppressBump`]).
//!
//! After a pass that converted anything, another pass re-checks the table
//! (a writer may put a row back into an old form in a block the pass has
//! already left), up to
//! [`MAX_PASSES`]. One run per (table, column) at a time: a named advisory
//! session lock.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Instant;

use manna_crypt_core::aead::{self, Cipher};
use manna_crypt_core::envelope::{self, Envelope};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgRelation, PgSqlErrorCode};
use serde_json::json;
use zeroize::Zeroizing;

use super::classify::{classify, Class};
use super::registry;
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::fernet::open_parsed;
use crate::gcm::next_nonce;
use crate::keys::cache;
use crate::keys::lifecycle::audit;
use crate::keys::owner::{as_owner, caller};
use crate::locking::{advisory, version::SuppressBump};
use manna_crypt_core::fernet::Token;

pub const MAX_PASSES: i32 = 3;
const MAX_BATCH: i32 = 100_000;

#[derive(Clone)]
enum Mode {
    MigrateFernet { source: String, target: String },
    Rewrap { keyring: String },
    Encrypt { keyring: String },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::MigrateFernet { .. } => "migrate_fernet",
            Mode::Rewrap { .. } => "rewrap_column",
            Mode::Encrypt { .. } => "encrypt_column",
        }
    }

    fn target(&self) -> &str {
        match self {
            Mode::MigrateFernet { target, .. } => target,
            Mode::Rewrap { keyring } | Mode::Encrypt { keyring } => keyring,
        }
    }

    fn source(&self) -> Option<&str> {
        match self {
            Mode::MigrateFernet { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Counts {
    scanned: i64,
    converted: i64,
    already: i64,
    nulls: i64,
    failed: i64,
    other_keyring: i64,
}

struct Run {
    id: i64,
    oid: pg_sys::Oid,
    mode: Mode,
    tbl_sql: String,
    col: String,
    col_sql: String,
    aad_sql: Option<String>,
    dry_run: bool,
    blocks_per_batch: i64,
    next_block: i64,
    /// The table's size when the pass started: rows appended later (our own
    /// new versions among them) belong to the next pass.
    pass_end_block: i64,
    pass_started: Instant,
    pass: i32,
    /// This pass only; a new pass starts from zero.
    pass_counts: Counts,
    converted_total: i64,
    total_estimate: i64,
    started: Instant,
    scanned_this_call: i64,
    lock_name: String,
}

thread_local! {
    static RUNS: RefCell<HashMap<i64, Run>> = RefCell::new(HashMap::new());
    static NEXT_DRY_HANDLE: Cell<i64> = const { Cell::new(-1) };
}

enum Outcome {
    Already,
    OtherKeyring,
    Convert(String),
    Fail(Class, String),
}

/// What one batch needs from the key cache, fetched once per batch.
struct Keys {
    target_id: u32,
    target: Rc<Cipher>,
    /// Rewrap: the key ids of the keyring.
    ring_ids: HashSet<u32>,
}

fn seal_verified(keys: &Keys, plaintext: &[u8], aad: &[u8]) -> McResult<String> {
    let env = aead::seal(&keys.target, keys.target_id, next_nonce(), aad, plaintext);
    let back = aead::open(&keys.target, &Envelope::parse(&env)?, aad)?;
    if back[..] != plaintext[..] {
        return Err(McError::Internal(
            "re-encrypted value did not decrypt back to its plaintext".into(),
        ));
    }
    Ok(envelope::to_text(&env))
}

const MALFORMED: &str = "starts like a ciphertext or Fernet token but does not parse";

/// Decides what to do with one value, parsing it once.
fn convert(mode: &Mode, keys: &Keys, value: &str, aad: &[u8]) -> Outcome {
    let sealed = |class: Class, pt: McResult<Zeroizing<Vec<u8>>>| -> Outcome {
        match pt {
            Ok(pt) if !crate::datum::is_text(&pt) => Outcome::Fail(
                class,
                "plaintext is not UTF-8 text or contains a NUL byte; decrypt_gcm could not return it as text".into(),
            ),
            Ok(pt) => match seal_verified(keys, &pt, aad) {
                Ok(text) => Outcome::Convert(text),
                Err(e) => Outcome::Fail(class, e.message()),
            },
            Err(e) => Outcome::Fail(class, e.message()),
        }
    };
    match mode {
        Mode::MigrateFernet { source, .. } => {
            if value.starts_with("gAAAAA") {
                return match Token::parse(value) {
                    Ok(token) => sealed(Class::Fernet, open_parsed(&token, source)),
                    Err(_) => Outcome::Fail(Class::Malformed, MALFORMED.into()),
                };
            }
            match classify(value) {
                Class::Mc1(_) => Outcome::Already,
                Class::Malformed => Outcome::Fail(Class::Malformed, MALFORMED.into()),
                class => Outcome::Fail(
                    class,
                    "not a Fernet token: plaintext or an unknown format".into(),
                ),
            }
        }
        Mode::Encrypt { .. } => match classify(value) {
            Class::Mc1(_) => Outcome::Already,
            Class::Plaintext => sealed(
                Class::Plaintext,
                Ok(Zeroizing::new(value.as_bytes().to_vec())),
            ),
            Class::Fernet => Outcome::Fail(
                Class::Fernet,
                "looks like a Fernet token; use migrate_fernet to convert it".into(),
            ),
            Class::Malformed => Outcome::Fail(Class::Malformed, MALFORMED.into()),
        },
        Mode::Rewrap { .. } => {
            if !value.starts_with(envelope::TEXT_PREFIX) {
                return Outcome::Fail(classify(value), "not a manna_crypt ciphertext".into());
            }
            let Ok(bytes) = envelope::from_text(value) else {
                return Outcome::Fail(Class::Malformed, MALFORMED.into());
            };
            let Ok(key_id) = Envelope::parse(&bytes).map(|e| e.key_id) else {
                return Outcome::Fail(Class::Malformed, MALFORMED.into());
            };
            if key_id == keys.target_id {
                Outcome::Already
            } else if keys.ring_ids.contains(&key_id) {
                sealed(
                    Class::Mc1(key_id),
                    crate::gcm::open_value(None, &bytes, aad),
                )
            } else {
                Outcome::OtherKeyring
            }
        }
    }
}

/// SQL predicate for the final "already in target form" count. For
/// migrate_fernet and encrypt_column a prefix test is enough (the run has
/// just judged every value; a malformed `mc1:` value was recorded as a
/// failure) and spares a function call per row of the table.
fn target_form_sql(mode: &Mode, col: &str, active_key_id: u32) -> String {
    match mode {
        // Any manna_crypt ciphertext is done for these two.
        Mode::MigrateFernet { .. } | Mode::Encrypt { .. } => format!("{col}::text LIKE 'mc1:%'"),
        Mode::Rewrap { .. } => format!(
            "manna_crypt.is_encrypted({col}::text) AND manna_crypt.key_id({col}::text) = {active_key_id}"
        ),
    }
}

/// The column to re-encrypt, quoted: a text column of an ordinary table
/// without inheritance children (each batch is a range of this table's own
/// heap blocks, so a partitioned parent or inheritance children would be
/// silently skipped: run it on each partition instead), and without a
/// length limit (ciphertexts are longer than their plaintexts, so one long
/// value would fail every batch that holds it).
fn text_column(tbl: pg_sys::Oid, col: &str) -> McResult<String> {
    registry::check_text_column(tbl, col)?;
    let (relkind, children) = Spi::get_two_with_args::<String, bool>(
        "SELECT relkind::text, relhassubclass FROM pg_class WHERE oid = $1",
        &[tbl.into()],
    )?;
    if relkind.as_deref() != Some("r") || children.unwrap_or(false) {
        return Err(McError::BadArgument {
            message: "re-encryption works on one ordinary table at a time".into(),
            detail: Some("the table is partitioned or has inheritance children".into()),
            hint: Some("CALL the procedure on each partition (each child table)".into()),
        });
    }
    let limited = Spi::get_one_with_args::<bool>(
        "SELECT atttypmod <> -1 FROM pg_attribute WHERE attrelid = $1 AND attname = $2",
        &[tbl.into(), col.into()],
    )?
    .unwrap_or(false);
    if limited {
        return Err(McError::BadArgument {
            message: format!("column \"{col}\" has a length limit"),
            detail: Some(
                "a ciphertext is longer than its plaintext (51 characters become 116)".into(),
            ),
            hint: Some(format!(
                "ALTER TABLE ... ALTER COLUMN {col} TYPE text first"
            )),
        });
    }
    Ok(pgrx::spi::quote_identifier(col))
}

fn any_column(tbl: pg_sys::Oid, col: &str) -> McResult<String> {
    let ok = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
        &[tbl.into(), col.into()],
    )?
    .unwrap_or(false);
    if !ok {
        return Err(McError::BadArgument {
            message: format!("aad_column \"{col}\" does not exist in the table"),
            detail: None,
            hint: None,
        });
    }
    Ok(pgrx::spi::quote_identifier(col))
}

fn batch_keys(mode: &Mode) -> McResult<Keys> {
    let (target_id, target) = cache::active_key(mode.target())?;
    let ring_ids = match mode {
        Mode::Rewrap { keyring } => as_owner(|| {
            Spi::connect(|client| {
                let rows = client.select(
                    "SELECT k.key_id FROM manna_crypt.data_keys k JOIN manna_crypt.keyrings r USING (keyring_id) WHERE r.name = $1",
                    None,
                    &[keyring.as_str().into()],
                )?;
                let mut ids = HashSet::new();
                for r in rows {
                    ids.insert(r.get::<i32>(1)?.unwrap_or(0) as u32);
                }
                Ok::<_, McError>(ids)
            })
        })?,
        _ => HashSet::new(),
    };
    Ok(Keys {
        target_id,
        target,
        ring_ids,
    })
}

fn block_count(tbl: pg_sys::Oid) -> McResult<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.pg_relation_size($1) / current_setting('block_size')::int8",
        &[tbl.into()],
    )?
    .unwrap_or(0))
}

fn start(
    mode: Mode,
    tbl: PgRelation,
    col: &str,
    batch_size: i32,
    aad_column: Option<&str>,
    dry_run: bool,
) -> McResult<i64> {
    // SAFETY: IsTransactionBlock reads the current transaction state.
    if unsafe { pg_sys::IsTransactionBlock() } {
        return Err(McError::Usage {
            code: PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            message: format!("{} cannot run inside a transaction block", mode.name()),
            hint: Some("it commits after every batch: CALL it outside BEGIN ... COMMIT (in Alembic, inside op.get_context().autocommit_block())".into()),
        });
    }
    if !(1..=MAX_BATCH).contains(&batch_size) {
        return Err(McError::BadArgument {
            message: format!("batch_size must be between 1 and {MAX_BATCH}"),
            detail: Some(format!("batch_size is {batch_size}")),
            hint: None,
        });
    }
    let oid = tbl.oid();
    let col_sql = text_column(oid, col)?;
    let aad_sql = aad_column.map(|a| any_column(oid, a)).transpose()?;
    let tbl_sql = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[oid.into()])?
        .unwrap_or_default();
    // Fail fast on keyring problems, before taking locks or writing anything.
    if let Some(source) = mode.source() {
        cache::fernet_keys(source)?;
    }
    batch_keys(&mode)?;

    let lock_name = format!("manna_crypt:reencrypt:{}:{col}", oid.to_u32());
    if !advisory::held_by_me(&lock_name) && !advisory::try_lock(&lock_name) {
        let holder = advisory::holder(&lock_name);
        return Err(McError::Usage {
            code: PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            message: format!("another re-encryption of {tbl_sql}.{col} is running"),
            hint: Some(format!(
                "wait for it to finish (backend pid {}); see manna_crypt.reencrypt_progress",
                holder.unwrap_or(0)
            )),
        });
    }

    let (reltuples, relpages) = Spi::get_two_with_args::<f32, i32>(
        "SELECT reltuples, relpages FROM pg_class WHERE oid = $1",
        &[oid.into()],
    )?;
    let nblocks = block_count(oid)?.max(1);
    let total_estimate = match reltuples {
        Some(t) if t >= 0.0 && relpages.unwrap_or(0) > 0 => t as i64,
        _ => Spi::get_one::<i64>(&format!("SELECT count(*) FROM {tbl_sql}"))?.unwrap_or(0),
    };
    let per_block = (total_estimate / nblocks).max(1);
    let blocks_per_batch = (i64::from(batch_size) / per_block).max(1);

    let role = caller();
    let mut id = 0;
    let mut next_block = 0;
    let mut pass = 1;
    if dry_run {
        id = NEXT_DRY_HANDLE.with(|h| {
            let v = h.get();
            h.set(v - 1);
            v
        });
    } else {
        as_owner(|| {
            registry::register(oid, col)?;
            // A run that did not finish (its backend died: we hold the lock)
            // is resumed where it stopped, if it asked for the same thing.
            let unfinished = Spi::connect(|client| {
                let mut rows = client.select(
                    "SELECT run_id, mode, source_keyring, target_keyring, aad_column::text, next_block, pass \
                       FROM manna_crypt.reencrypt_runs WHERE tbl = $1 AND col = $2 AND status = 'running' \
                      ORDER BY run_id DESC LIMIT 1",
                    None,
                    &[oid.into(), col.into()],
                )?;
                Ok::<_, McError>(match rows.next() {
                    Some(r) => Some((
                        r.get::<i64>(1)?.unwrap_or(0),
                        r.get::<String>(2)?.unwrap_or_default(),
                        r.get::<String>(3)?,
                        r.get::<String>(4)?.unwrap_or_default(),
                        r.get::<String>(5)?,
                        r.get::<i64>(6)?.unwrap_or(0),
                        r.get::<i32>(7)?.unwrap_or(1),
                    )),
                    None => None,
                })
            })?;
            if let Some((run_id, m, src, tgt, aad, nb, p)) = unfinished {
                let same = m == mode.name()
                    && src.as_deref() == mode.source()
                    && tgt == mode.target()
                    && aad.as_deref() == aad_column;
                if same {
                    notice!(
                        "{}: resuming run {run_id} of {tbl_sql}.{col} at block {nb} (pass {p})",
                        mode.name()
                    );
                    id = run_id;
                    next_block = nb;
                    pass = p;
                    Spi::run_with_args(
                        "UPDATE manna_crypt.reencrypt_runs SET pid = pg_backend_pid(), updated_at = now() WHERE run_id = $1",
                        &[run_id.into()],
                    )?;
                } else {
                    Spi::run_with_args(
                        "UPDATE manna_crypt.reencrypt_runs SET status = 'abandoned', finished_at = now() WHERE run_id = $1",
                        &[run_id.into()],
                    )?;
                }
            }
            if id == 0 {
                id = Spi::get_one_with_args::<i64>(
                    "INSERT INTO manna_crypt.reencrypt_runs (tbl, col, mode, source_keyring, target_keyring, batch_size, aad_column, pid, total_blocks, total_rows_estimate) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, pg_backend_pid(), $8, $9) RETURNING run_id",
                    &[
                        oid.into(),
                        col.into(),
                        mode.name().into(),
                        mode.source().into(),
                        mode.target().into(),
                        batch_size.into(),
                        aad_column.into(),
                        nblocks.into(),
                        total_estimate.into(),
                    ],
                )?
                .unwrap_or(0);
            }
            audit(
                &role,
                &format!("{}_start", mode.name()),
                Some(mode.target()),
                None,
                json!({ "run_id": id, "table": tbl_sql, "column": col, "source_keyring": mode.source(), "batch_size": batch_size, "aad_column": aad_column, "resumed_at_block": next_block }),
            )
        })?;
    }
    let run = Run {
        id,
        oid,
        mode,
        tbl_sql,
        col: col.to_owned(),
        col_sql,
        aad_sql,
        dry_run,
        blocks_per_batch,
        next_block,
        pass_end_block: nblocks,
        pass_started: Instant::now(),
        pass,
        pass_counts: Counts::default(),
        converted_total: 0,
        total_estimate,
        started: Instant::now(),
        scanned_this_call: 0,
        lock_name,
    };
    RUNS.with(|r| r.borrow_mut().insert(id, run));
    Ok(id)
}

/// One batch. Returns whether more remains.
fn step(handle: i64) -> McResult<bool> {
    let mut run = RUNS
        .with(|r| r.borrow_mut().remove(&handle))
        .ok_or_else(|| {
            McError::bad_arg(format!("no re-encryption run {handle} in this session"))
        })?;
    let result = step_run(&mut run);
    RUNS.with(|r| r.borrow_mut().insert(handle, run));
    result
}

fn step_run(run: &mut Run) -> McResult<bool> {
    if run.next_block >= run.pass_end_block {
        let another = !run.dry_run && run.pass_counts.converted > 0 && run.pass < MAX_PASSES;
        if another {
            run.pass += 1;
            run.next_block = 0;
            run.pass_end_block = block_count(run.oid)?;
            run.pass_started = Instant::now();
            run.pass_counts = Counts::default();
            notice!(
                "{} {}.{}: pass {}: re-checking for rows that concurrent writers changed",
                run.mode.name(),
                run.tbl_sql,
                run.col,
                run.pass
            );
        }
        return Ok(another);
    }
    let nblocks = run.pass_end_block;
    let (b, e) = (
        run.next_block,
        (run.next_block + run.blocks_per_batch).min(nblocks),
    );
    let keys = batch_keys(&run.mode)?;
    let aad_expr = run
        .aad_sql
        .as_deref()
        .map(|a| format!("{a}::text"))
        .unwrap_or_else(|| "NULL::text".into());
    BATCH.with(|c| {
        *c.borrow_mut() = Some(Batch {
            mode: run.mode.clone(),
            keys,
            counts: Counts::default(),
            failures: Vec::new(),
            pending: None,
        })
    });
    // One statement per batch: the scan evaluates `_reencrypt_row` on each
    // candidate, which converts it (or records a failure and returns false),
    // and the SET takes the value it just produced. Under READ COMMITTED a
    // row that a concurrent transaction changes is re-read once that writer
    // commits and converted from the writer's value: it is never
    // overwritten with a conversion of the value it replaced.
    // A re-check pass looks for values writers put back in an old form:
    // for these two modes never an mc1 value, so a cheap LIKE spares the
    // function call on every row already converted.
    let recheck = match (&run.mode, run.pass) {
        (Mode::MigrateFernet { .. } | Mode::Encrypt { .. }, p) if p > 1 => {
            format!("AND {}::text NOT LIKE 'mc1:%' ", run.col_sql)
        }
        _ => String::new(),
    };
    let qual = format!(
        "ctid >= '({b},0)'::tid AND ctid < '({e},0)'::tid AND {col} IS NOT NULL {recheck}\
         AND manna_crypt._reencrypt_row(ctid, {col}::text, {aad_expr})",
        col = run.col_sql
    );
    let result = if run.dry_run {
        Spi::connect(|client| {
            let rows = client.select(
                &format!("SELECT count(*) FROM ONLY {} WHERE {qual}", run.tbl_sql),
                None,
                &[],
            )?;
            Ok::<_, McError>(rows.first().get_one::<i64>()?.unwrap_or(0))
        })
    } else {
        let _no_bump = SuppressBump::new(run.oid);
        Spi::connect_mut(|client| {
            let sql = format!(
                "UPDATE ONLY {tbl} SET {col} = manna_crypt._reencrypt_value() WHERE {qual}",
                tbl = run.tbl_sql,
                col = run.col_sql
            );
            Ok::<_, McError>(client.update(&sql, None, &[])?.len() as i64)
        })
    };
    let batch = BATCH.with(|c| c.borrow_mut().take());
    let written = result?;
    let batch = batch.ok_or_else(|| McError::Internal("re-encryption batch state lost".into()))?;
    run.pass_counts.scanned += batch.counts.scanned;
    run.pass_counts.failed += batch.counts.failed;
    run.pass_counts.other_keyring += batch.counts.other_keyring;
    run.pass_counts.converted += written;
    run.converted_total += written;
    run.scanned_this_call += batch.counts.scanned;
    run.next_block = e;

    let elapsed = run.started.elapsed().as_secs_f64().max(1e-6);
    let rate = run.scanned_this_call as f64 / elapsed;
    let blocks_left = (nblocks - run.next_block).max(0);
    let pass_elapsed = run.pass_started.elapsed().as_secs_f64();
    let eta = if run.next_block > 0 {
        pass_elapsed / run.next_block as f64 * blocks_left as f64
    } else {
        0.0
    };
    if !run.dry_run {
        let (id, c, pass, next, conv_total) = (
            run.id,
            run.pass_counts,
            run.pass,
            run.next_block,
            run.converted_total,
        );
        as_owner(|| {
            for f in &batch.failures {
                Spi::run_with_args(
                    "INSERT INTO manna_crypt.reencrypt_failures (run_id, row_ctid, row_key, value_class, value_length, reason) \
                     VALUES ($1, $2::tid, $3, $4, $5, $6) ON CONFLICT (run_id, row_ctid) DO NOTHING",
                    &[
                        id.into(),
                        f.ctid.as_str().into(),
                        f.row_key.clone().into(),
                        f.class.into(),
                        f.length.into(),
                        f.reason.as_str().into(),
                    ],
                )?;
            }
            Spi::run_with_args(
                "UPDATE manna_crypt.reencrypt_runs SET updated_at = now(), pass = $2, next_block = $3, total_blocks = $4, \
                   scanned = $5, converted = $6, failed = greatest(failed, $7), other_keyring = $8, rows_per_second = $9, eta_seconds = $10 \
                 WHERE run_id = $1",
                &[
                    id.into(),
                    pass.into(),
                    next.into(),
                    nblocks.into(),
                    c.scanned.into(),
                    conv_total.into(),
                    c.failed.into(),
                    c.other_keyring.into(),
                    rate.into(),
                    eta.into(),
                ],
            )?;
            Ok(())
        })?;
    }
    let pct = (run.next_block.min(nblocks) as f64 / nblocks.max(1) as f64) * 100.0;
    notice!(
        "{}{} {}.{}: pass {}, {:.0}% of ~{} rows, {} to convert seen, {} converted, {} failed, {:.0} rows/s, ETA {:.1} s",
        if run.dry_run { "dry run: " } else { "" },
        run.mode.name(),
        run.tbl_sql,
        run.col,
        run.pass,
        pct,
        run.total_estimate,
        run.pass_counts.scanned,
        if run.dry_run { run.pass_counts.converted } else { run.converted_total },
        run.pass_counts.failed,
        rate,
        eta
    );
    Ok(true)
}

/// A row a batch left untouched, for `reencrypt_failures` (never the value).
struct Failure {
    ctid: String,
    row_key: Option<String>,
    class: &'static str,
    length: i64,
    reason: String,
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
        match convert(
            &batch.mode,
            &batch.keys,
            value,
            aad.unwrap_or("").as_bytes(),
        ) {
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

fn finish(handle: i64) -> McResult<()> {
    let run = RUNS
        .with(|r| r.borrow_mut().remove(&handle))
        .ok_or_else(|| {
            McError::bad_arg(format!("no re-encryption run {handle} in this session"))
        })?;
    let mut c = run.pass_counts;
    let active = cache::active_key(run.mode.target())
        .map(|(id, _)| id)
        .unwrap_or(0);
    let (nulls, already) = Spi::get_two::<i64, i64>(&format!(
        "SELECT count(*) FILTER (WHERE {col} IS NULL), count(*) FILTER (WHERE {col} IS NOT NULL AND ({done})) FROM {tbl}",
        col = run.col_sql,
        tbl = run.tbl_sql,
        done = target_form_sql(&run.mode, &run.col_sql, active),
    ))?;
    c.nulls = nulls.unwrap_or(0);
    c.already = already.unwrap_or(0);
    if !run.dry_run {
        // Every row left untouched, whichever pass (or an earlier, crashed
        // session of a resumed run) met it: a re-check pass skips values
        // that are already mc1-shaped, so its own count can be lower.
        let id = run.id;
        c.failed = as_owner(|| {
            Ok(Spi::get_one_with_args::<i64>(
                "SELECT count(*) FROM manna_crypt.reencrypt_failures WHERE run_id = $1",
                &[id.into()],
            )?
            .unwrap_or(0))
        })?;
    }
    let secs = run.started.elapsed().as_secs_f64();
    let summary = json!({
        "run_id": run.id, "table": run.tbl_sql, "column": run.col, "passes": run.pass,
        "converted": run.converted_total, "failed": c.failed, "already": c.already, "nulls": c.nulls,
        "other_keyring": c.other_keyring, "seconds": secs,
    });
    if !run.dry_run {
        let role = caller();
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE manna_crypt.reencrypt_runs SET status = 'done', finished_at = now(), updated_at = now(), eta_seconds = 0, \
                   already = $2, nulls = $3, failed = $4 WHERE run_id = $1",
                &[run.id.into(), c.already.into(), c.nulls.into(), c.failed.into()],
            )?;
            audit(
                &role,
                &format!("{}_end", run.mode.name()),
                Some(run.mode.target()),
                None,
                summary.clone(),
            )
        })?;
    }
    advisory::unlock_all(&run.lock_name);
    if run.dry_run {
        notice!(
            "dry run: {} {}.{} would convert {} values; {} cannot be converted; {} already in target form; {} null; {} under other keyrings; nothing was written",
            run.mode.name(),
            run.tbl_sql,
            run.col,
            c.converted,
            c.failed,
            c.already,
            c.nulls,
            c.other_keyring
        );
    } else {
        notice!(
            "{} {}.{} done in {:.1} s ({} pass{}): {} converted, {} left untouched (see manna_crypt.reencrypt_failures, run {}), {} already in target form, {} null, {} under other keyrings",
            run.mode.name(),
            run.tbl_sql,
            run.col,
            secs,
            run.pass,
            if run.pass == 1 { "" } else { "es" },
            run.converted_total,
            c.failed,
            run.id,
            c.already,
            c.nulls,
            c.other_keyring
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_start(
    mode: Option<&str>,
    tbl: Option<PgRelation>,
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
    let target_keyring = not_null(target_keyring, "keyring");
    let batch_size = not_null(batch_size, "batch_size");
    let dry_run = not_null(dry_run, "dry_run");
    let mode = match (not_null(mode, "mode"), source_keyring) {
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
    start(mode, tbl, col, batch_size, aad_column, dry_run).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_step(handle: i64) -> bool {
    step(handle).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
fn _reencrypt_finish(handle: i64) {
    finish(handle).or_raise()
}
