//! The optimistic-locking trigger (docs/DESIGN.md section 5).
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
//! Per row the trigger does a column lookup, two reads and a compare on the
//! raw tuple: no SPI, and no allocation beyond the modified tuple (names for
//! messages are looked up only when there is an error to report). The
//! decision itself is [`decide`], plain safe code.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::heap_tuple::PgHeapTuple;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, PgTupleDesc};

use crate::error::{McError, McResult, OrRaise};

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

/// What the trigger does with a row.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Keep,
    Set(i64),
    Stale { expected: i64, current: i64 },
    Overflow,
}

/// The rule of the table above, for an UPDATE (`old` given) or an INSERT.
fn decide(old: Option<Option<i64>>, new: Option<i64>, suppressed: bool) -> Decision {
    let bump = |o: i64| o.checked_add(1).map_or(Decision::Overflow, Decision::Set);
    match (old, new) {
        // INSERT: a NULL version becomes 1.
        (None, None) => Decision::Set(1),
        (None, Some(_)) => Decision::Keep,
        (Some(Some(o)), Some(n)) if n == o && suppressed => Decision::Keep,
        (Some(Some(o)), Some(n)) if n == o => bump(o),
        (Some(Some(o)), Some(n)) if Some(n) == o.checked_add(1) => Decision::Keep,
        // A NULL old version (a row written before the trigger was
        // installed) adopts 1 unless the writer asserts a version.
        (Some(None), None) => Decision::Set(1),
        (Some(None), Some(_)) => Decision::Keep,
        // Setting the version to NULL asserts nothing: a plain update.
        (Some(Some(o)), None) => bump(o),
        (Some(Some(o)), Some(n)) => Decision::Stale {
            expected: n,
            current: o,
        },
    }
}

#[derive(Clone, Copy)]
enum IntKind {
    I16,
    I32,
    I64,
}

impl IntKind {
    fn of(typoid: pg_sys::Oid) -> Option<IntKind> {
        match typoid {
            pg_sys::INT2OID => Some(IntKind::I16),
            pg_sys::INT4OID => Some(IntKind::I32),
            pg_sys::INT8OID => Some(IntKind::I64),
            _ => None,
        }
    }

    fn read(self, d: pg_sys::Datum) -> i64 {
        match self {
            IntKind::I16 => i64::from(d.value() as i16),
            IntKind::I32 => i64::from(d.value() as i32),
            IntKind::I64 => d.value() as i64,
        }
    }

    /// `None` when `v` does not fit the column's type.
    fn datum(self, v: i64) -> Option<pg_sys::Datum> {
        match self {
            IntKind::I16 => i16::try_from(v).ok().map(pg_sys::Datum::from),
            IntKind::I32 => i32::try_from(v).ok().map(pg_sys::Datum::from),
            IntKind::I64 => Some(pg_sys::Datum::from(v)),
        }
    }
}

const HINT: &str = "use: CREATE TRIGGER ... BEFORE INSERT OR UPDATE ON tbl FOR EACH ROW \
    EXECUTE FUNCTION manna_crypt.version_bump('version'), \
    or manna_crypt.enable_optimistic_locking(tbl)";

// `version_bump()` is written by hand rather than with `#[pg_trigger]`: that
// wrapper fails a call that is not a trigger's with pgrx's XX000
// ("PgTrigger::from_fcinfo failed"). The C symbol and the SQL are exactly
// those `#[pg_trigger]` produced in 0.1.0, so existing catalogs and
// triggers call it unchanged.
extension_sql!(
    r#"CREATE FUNCTION manna_crypt."version_bump"() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'version_bump_wrapper';"#,
    name = "version_bump_fn",
);

/// The function-manager record PostgreSQL asks for: version-1 calling
/// convention.
#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_version_bump_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The trigger's entry point. Errors are raised with their own SQLSTATE.
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn version_bump_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid pointer.
    let Some(fcinfo) = (unsafe { fcinfo.as_ref() }) else {
        return pg_sys::Datum::from(0);
    };
    // SAFETY: from_fcinfo itself checks that this is a trigger's call.
    let trigger = match unsafe { PgTrigger::from_fcinfo(fcinfo) } {
        Ok(trigger) => trigger,
        Err(_) => McError::TriggerMisuse {
            message: "version_bump() can only be called as a trigger".into(),
            hint: HINT.into(),
        }
        .raise(),
    };
    // The trigger protocol: a NULL pointer for "no row", not the isnull flag.
    let datum = match bump(&trigger).or_raise() {
        Some(tuple) => tuple.into_trigger_datum().unwrap_or(pg_sys::Datum::from(0)),
        None => pg_sys::Datum::from(0),
    };
    datum
}

fn misuse(trigger: &PgTrigger<'_>, what: &str) -> McError {
    let table = table_name(trigger);
    McError::TriggerMisuse {
        message: format!("version_bump() on table \"{table}\" must be fired {what}"),
        hint: HINT.into(),
    }
}

fn table_name(trigger: &PgTrigger<'_>) -> String {
    trigger.table_name().unwrap_or_else(|_| "?".into())
}

/// The version column's name: the trigger's one argument, or `version`.
fn version_column(td: &pg_sys::TriggerData) -> McResult<&CStr> {
    // SAFETY: tg_trigger is valid for the trigger call; tgargs holds tgnargs
    // NUL-terminated strings owned by the relcache entry for that long.
    unsafe {
        let trig = &*td.tg_trigger;
        match trig.tgnargs {
            0 => Ok(c"version"),
            1 => Ok(CStr::from_ptr(*trig.tgargs)),
            _ => Err(McError::TriggerMisuse {
                message: "version_bump() takes at most one argument, the version column name"
                    .into(),
                hint: HINT.into(),
            }),
        }
    }
}

/// The version column of the trigger's table: its number and integer type.
fn version_attr(
    trigger: &PgTrigger<'_>,
    tupdesc: pg_sys::TupleDesc,
    col: &CStr,
) -> McResult<(i32, IntKind)> {
    // SAFETY: a valid descriptor and NUL-terminated name.
    let attnum = unsafe { pg_sys::SPI_fnumber(tupdesc, col.as_ptr()) };
    if attnum <= 0 {
        return Err(McError::UndefinedColumn {
            message: format!(
                "column \"{}\" of table \"{}\" does not exist",
                col.to_string_lossy(),
                table_name(trigger)
            ),
            hint: "version_bump() takes the name of the version column as its argument".into(),
        });
    }
    // SAFETY: attnum is a valid user column of the descriptor.
    let typoid = unsafe { pg_sys::SPI_gettypeid(tupdesc, attnum) };
    let kind = IntKind::of(typoid).ok_or_else(|| McError::WrongType {
        message: format!(
            "version column \"{}\" of table \"{}\" is not an integer column",
            col.to_string_lossy(),
            table_name(trigger)
        ),
        hint: "use a smallint, integer or bigint column".into(),
    })?;
    Ok((attnum, kind))
}

/// Whether the trigger fired for an UPDATE (else an INSERT); refuses any
/// other way of firing it.
fn is_update(trigger: &PgTrigger<'_>) -> McResult<bool> {
    if !matches!(trigger.when(), Ok(PgTriggerWhen::Before))
        || !matches!(trigger.level(), PgTriggerLevel::Row)
    {
        return Err(misuse(trigger, "BEFORE ... FOR EACH ROW"));
    }
    match trigger.op() {
        Ok(PgTriggerOperation::Update) => Ok(true),
        Ok(PgTriggerOperation::Insert) => Ok(false),
        _ => Err(misuse(trigger, "on INSERT or UPDATE")),
    }
}

fn bump<'t>(trigger: &'t PgTrigger<'_>) -> McResult<Option<PgHeapTuple<'t, AllocatedByPostgres>>> {
    let is_update = is_update(trigger)?;
    let td = trigger.trigger_data();
    let col = version_column(td)?;
    // SAFETY: tg_relation and its descriptor are valid for the trigger call.
    let (tupdesc, relid) = unsafe { ((*td.tg_relation).rd_att, (*td.tg_relation).rd_id) };
    let (attnum, kind) = version_attr(trigger, tupdesc, col)?;
    let new_tuple = if is_update {
        td.tg_newtuple
    } else {
        td.tg_trigtuple
    };
    let read = |tuple: pg_sys::HeapTuple| {
        let mut isnull = false;
        // SAFETY: the trigger's tuples match the relation's descriptor.
        let d = unsafe { pg_sys::SPI_getbinval(tuple, tupdesc, attnum, &mut isnull) };
        (!isnull).then(|| kind.read(d))
    };
    let old = is_update.then(|| read(td.tg_trigtuple));
    let suppressed = SUPPRESS.with(Cell::get) == relid;
    let overflow = || McError::version_overflow(&table_name(trigger), &col.to_string_lossy());
    let out = match decide(old, read(new_tuple), suppressed) {
        Decision::Keep => new_tuple,
        Decision::Set(v) => {
            let mut value = kind.datum(v).ok_or_else(overflow)?;
            let (mut isnull, mut colnum) = (false, attnum);
            // SAFETY: replaces one column of the new tuple; the result is a
            // new palloc'd tuple in the trigger's (per-tuple) memory context,
            // which the trigger manager expects as the returned row.
            unsafe {
                pg_sys::heap_modify_tuple_by_cols(
                    new_tuple,
                    tupdesc,
                    1,
                    &mut colnum,
                    &mut value,
                    &mut isnull,
                )
            }
        }
        Decision::Stale { expected, current } => {
            return Err(McError::StaleVersion {
                table: table_name(trigger),
                expected,
                current,
            })
        }
        Decision::Overflow => return Err(overflow()),
    };
    // SAFETY: `out` is a valid tuple of this descriptor (see above).
    Ok(Some(unsafe {
        PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(tupdesc), out)
    }))
}

#[cfg(test)]
mod tests {
    use super::{decide, Decision};

    #[test]
    fn the_rule() {
        assert_eq!(decide(None, None, false), Decision::Set(1));
        assert_eq!(decide(None, Some(7), false), Decision::Keep);
        assert_eq!(decide(Some(Some(3)), Some(3), false), Decision::Set(4));
        assert_eq!(decide(Some(Some(3)), Some(3), true), Decision::Keep);
        assert_eq!(decide(Some(Some(3)), Some(4), false), Decision::Keep);
        assert_eq!(decide(Some(Some(3)), None, false), Decision::Set(4));
        assert_eq!(decide(Some(None), None, false), Decision::Set(1));
        assert_eq!(decide(Some(None), Some(9), false), Decision::Keep);
        assert_eq!(
            decide(Some(Some(3)), Some(2), false),
            Decision::Stale {
                expected: 2,
                current: 3
            }
        );
        assert_eq!(
            decide(Some(Some(i64::MAX)), Some(i64::MAX), false),
            Decision::Overflow
        );
    }
}
