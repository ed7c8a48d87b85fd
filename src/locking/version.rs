//! The optimistic-locking trigger (DESIGN.md section 5).
//!
//! `BEFORE INSERT OR UPDATE FOR EACH ROW`, version column named by the
//! trigger argument (default `version`):
//!
//! | NEW.version vs OLD.version | meaning | action |
//! |---|---|---|
//! | equal | plain update, or a server-side counter | NEW.version = OLD.version + 1 |
//! | OLD + 1 | client-side counter whose `WHERE version = old` proved freshness | accept |
//! | anything else | the writer read a version that is no longer current | 40001 |
//!
//! On INSERT a NULL version becomes 1. Re-encryption does not change any
//! plaintext, so it must not bump: the re-encryption engine sets
//! [`SuppressBump`] around its own UPDATE. That switch lives in backend
//! memory only — no SQL can set it — so an ordinary writer cannot use it to
//! skip the check.
//!
//! The trigger works on the raw tuple (no SPI, no per-row allocation beyond
//! the modified tuple), so its cost is a column lookup and a compare.

use std::cell::Cell;
use std::ffi::CString;

use pgrx::heap_tuple::PgHeapTuple;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, PgSqlErrorCode, PgTupleDesc};

use crate::error::{McError, OrRaise};

thread_local! {
    /// The table whose version the running re-encryption leaves alone.
    static SUPPRESS: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// While alive, UPDATEs of `table` that leave the version column unchanged
/// do not bump it. Used by the re-encryption engine around its own batch
/// UPDATE only; other tables (a user trigger's writes, say) are unaffected.
pub struct SuppressBump(pg_sys::Oid);

impl SuppressBump {
    pub fn new(table: pg_sys::Oid) -> Self {
        SuppressBump(SUPPRESS.with(|s| s.replace(table)))
    }
}

impl Drop for SuppressBump {
    fn drop(&mut self) {
        SUPPRESS.with(|s| s.set(self.0));
    }
}

fn usage(message: String, hint: &str) -> McError {
    McError::Usage {
        code: PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        message,
        hint: Some(hint.into()),
    }
}

enum IntKind {
    I16,
    I32,
    I64,
}

/// Reads an integer column as i64.
fn read(kind: &IntKind, d: pg_sys::Datum) -> i64 {
    match kind {
        IntKind::I16 => i64::from(d.value() as i16),
        IntKind::I32 => i64::from(d.value() as i32),
        IntKind::I64 => d.value() as i64,
    }
}

fn to_datum(kind: &IntKind, v: i64, table: &str, col: &str) -> pg_sys::Datum {
    let overflow = || -> ! {
        McError::BadArgument {
            message: format!("version column \"{col}\" of table \"{table}\" overflowed"),
            detail: Some(format!("the next version would be {v}")),
            hint: Some("use a bigint version column".into()),
        }
        .raise()
    };
    match kind {
        IntKind::I16 => pg_sys::Datum::from(i16::try_from(v).unwrap_or_else(|_| overflow())),
        IntKind::I32 => pg_sys::Datum::from(i32::try_from(v).unwrap_or_else(|_| overflow())),
        IntKind::I64 => pg_sys::Datum::from(v),
    }
}

fn bumped(version: i64, table: &str, col: &str) -> Result<i64, McError> {
    version.checked_add(1).ok_or_else(|| McError::BadArgument {
        message: format!("version column \"{col}\" of table \"{table}\" overflowed"),
        detail: None,
        hint: None,
    })
}

#[pg_trigger]
fn version_bump<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, McError> {
    // Errors are raised here with their own SQLSTATE: an `Err` returned to
    // pgrx's trigger wrapper would surface as XX000.
    Ok(bump(trigger).or_raise())
}

fn bump<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, McError> {
    let td = trigger.trigger_data();
    let table = trigger.table_name().unwrap_or_else(|_| "?".into());
    let hint = "use: CREATE TRIGGER ... BEFORE INSERT OR UPDATE ON tbl FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump('version'), or manna_crypt.enable_optimistic_locking(tbl)";
    if !matches!(trigger.when(), Ok(PgTriggerWhen::Before))
        || !matches!(trigger.level(), PgTriggerLevel::Row)
    {
        return Err(usage(
            format!("version_bump() on table \"{table}\" must be fired BEFORE ... FOR EACH ROW"),
            hint,
        ));
    }
    let op = trigger
        .op()
        .map_err(|_| usage("version_bump() fired by an unknown event".into(), hint))?;
    let is_update = match op {
        PgTriggerOperation::Update => true,
        PgTriggerOperation::Insert => false,
        _ => {
            return Err(usage(
                format!("version_bump() on table \"{table}\" must be fired on INSERT or UPDATE"),
                hint,
            ))
        }
    };
    let args = trigger.extra_args().unwrap_or_default();
    if args.len() > 1 {
        return Err(usage(
            "version_bump() takes at most one argument, the version column name".into(),
            hint,
        ));
    }
    let col = args.first().map(String::as_str).unwrap_or("version");

    // SAFETY: tg_relation, tg_trigtuple and tg_newtuple are valid for the
    // duration of a row-level trigger call; the tuple descriptor belongs to
    // the relation; heap_modify_tuple_by_cols returns a new palloc'd tuple
    // in the current (per-tuple) memory context, which the trigger manager
    // expects as the returned row.
    unsafe {
        let rel = td.tg_relation;
        let tupdesc = (*rel).rd_att;
        let cname = CString::new(col)
            .map_err(|_| McError::bad_arg("version column name contains a NUL byte"))?;
        let attnum = pg_sys::SPI_fnumber(tupdesc, cname.as_ptr());
        if attnum <= 0 {
            return Err(McError::Usage {
                code: PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                message: format!("column \"{col}\" of table \"{table}\" does not exist"),
                hint: Some(
                    "version_bump() takes the name of the version column as its argument".into(),
                ),
            });
        }
        let kind = match pg_sys::SPI_gettypeid(tupdesc, attnum) {
            pg_sys::INT2OID => IntKind::I16,
            pg_sys::INT4OID => IntKind::I32,
            pg_sys::INT8OID => IntKind::I64,
            _ => {
                return Err(McError::Usage {
                    code: PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                    message: format!(
                        "version column \"{col}\" of table \"{table}\" is not an integer column"
                    ),
                    hint: Some("use a smallint, integer or bigint column".into()),
                })
            }
        };
        let new_tuple = if is_update {
            td.tg_newtuple
        } else {
            td.tg_trigtuple
        };
        let mut new_null = false;
        let new_d = pg_sys::SPI_getbinval(new_tuple, tupdesc, attnum, &mut new_null);

        let replacement = if is_update {
            let mut old_null = false;
            let old_d = pg_sys::SPI_getbinval(td.tg_trigtuple, tupdesc, attnum, &mut old_null);
            let old = (!old_null).then(|| read(&kind, old_d));
            let new = (!new_null).then(|| read(&kind, new_d));
            match (old, new) {
                (Some(o), Some(n)) if n == o => {
                    if SUPPRESS.with(Cell::get) == (*rel).rd_id {
                        None
                    } else {
                        Some(bumped(o, &table, col)?)
                    }
                }
                (Some(o), Some(n)) if Some(n) == o.checked_add(1) => None,
                // A NULL old version (a row written before the trigger was
                // installed) adopts 1 unless the writer asserts a version.
                (None, None) => Some(1),
                (None, Some(_)) => None,
                // Setting the version to NULL asserts nothing: a plain update.
                (Some(o), None) => Some(bumped(o, &table, col)?),
                (Some(o), Some(n)) => {
                    return Err(McError::StaleVersion {
                        table,
                        expected: n,
                        current: o,
                    });
                }
            }
        } else if new_null {
            Some(1)
        } else {
            None
        };

        let out = match replacement {
            None => new_tuple,
            Some(v) => {
                let mut value = to_datum(&kind, v, &table, col);
                let mut isnull = false;
                let mut colnum = attnum;
                pg_sys::heap_modify_tuple_by_cols(
                    new_tuple,
                    tupdesc,
                    1,
                    &mut colnum,
                    &mut value,
                    &mut isnull,
                )
            }
        };
        Ok(Some(PgHeapTuple::from_heap_tuple(
            PgTupleDesc::from_pg_unchecked(tupdesc),
            out,
        )))
    }
}
