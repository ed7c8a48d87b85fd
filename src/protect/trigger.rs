//! The protect trigger, `manna_crypt._protect(col, keyring, aad_column, ...)`:
//! `BEFORE INSERT OR UPDATE FOR EACH ROW`, one per table, named
//! `zz_manna_crypt_protect` so it fires after the table's other BEFORE
//! triggers (PostgreSQL fires them in name order) and sees the values they
//! set. Its arguments are triplets, one per protected column: the column,
//! the keyring, the AAD column ('' for none). Being the trigger's arguments,
//! they travel with the table through pg_dump and need no lookup per row.
//!
//! Per column, [`super::rules::decide`] says what to do; this file reads
//! the row, runs the crypto and writes the result back. No SQL runs here
//! and no code of the table's owner or of the writer: the keys come from
//! the key cache, which reads the key tables as the extension owner.

use std::cell::RefCell;
use std::ffi::CStr;

use manna_crypt_core::classify::classify;
use manna_crypt_core::envelope;
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, FromDatum, IntoDatum, PgTupleDesc};

use super::rules::{decide, Action, From, Update, Write};
use crate::crypto::{self, Form, KeySource};
use crate::error::{McError, McResult, OrRaise};

pub const TRIGGER_NAME: &str = "zz_manna_crypt_protect";

const HINT: &str = "install it with manna_crypt.protect_column(tbl, col, keyring, aad_column)";

extension_sql!(
    r#"CREATE FUNCTION manna_crypt."_protect"() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', '_protect_wrapper';"#,
    name = "protect_fn",
);

/// The function-manager record: version-1 calling convention.
#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo__protect_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The trigger's entry point (written by hand, as `version_bump`'s is, so a
/// direct call is 39P01 and not pgrx's XX000).
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn _protect_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager passes a valid pointer.
    let Some(fcinfo) = (unsafe { fcinfo.as_ref() }) else {
        return pg_sys::Datum::from(0);
    };
    // SAFETY: from_fcinfo itself checks that this is a trigger's call.
    let trigger = match unsafe { PgTrigger::from_fcinfo(fcinfo) } {
        Ok(trigger) => trigger,
        Err(_) => misuse("manna_crypt._protect() can only be called as a trigger").raise(),
    };
    let datum = match protect(&trigger).or_raise() {
        Some(tuple) => tuple.into_trigger_datum().unwrap_or(pg_sys::Datum::from(0)),
        None => pg_sys::Datum::from(0),
    };
    datum
}

fn misuse(message: &str) -> McError {
    McError::TriggerMisuse {
        message: message.into(),
        hint: HINT.into(),
    }
}

/// One protected column, from the trigger's arguments.
struct Spec<'a> {
    col: &'a CStr,
    keyring: &'a str,
    aad: Option<&'a CStr>,
}

fn specs(td: &pg_sys::TriggerData) -> McResult<Vec<Spec<'_>>> {
    // SAFETY: tg_trigger is valid for the call; tgargs holds tgnargs
    // NUL-terminated strings owned by the relcache entry for that long.
    let args: Vec<&CStr> = unsafe {
        let trig = &*td.tg_trigger;
        let n = usize::try_from(trig.tgnargs).unwrap_or(0);
        (0..n)
            .map(|i| CStr::from_ptr(*trig.tgargs.add(i)))
            .collect()
    };
    if args.is_empty() || !args.len().is_multiple_of(3) {
        return Err(misuse(
            "manna_crypt._protect() takes (column, keyring, aad_column) triplets",
        ));
    }
    args.chunks(3)
        .map(|t| {
            let keyring = t[1]
                .to_str()
                .map_err(|_| misuse("manna_crypt._protect(): keyring name is not UTF-8"))?;
            Ok(Spec {
                col: t[0],
                keyring,
                aad: (!t[2].is_empty()).then_some(t[2]),
            })
        })
        .collect()
}

/// The ciphertext this backend's BEFORE INSERT trigger produced last, with
/// the AAD it is bound to. An `INSERT ... ON CONFLICT DO UPDATE SET col =
/// EXCLUDED.col` fires the INSERT trigger for the proposed row and then the
/// UPDATE trigger for the existing one, within the same statement and row:
/// the UPDATE recognises the value and binds it to the target row instead.
struct Sealed {
    relid: pg_sys::Oid,
    attnum: i32,
    statement: pg_sys::TimestampTz,
    ciphertext: String,
    aad: Option<String>,
}

thread_local! {
    static LAST_SEALED: RefCell<Option<Sealed>> = const { RefCell::new(None) };
}

fn statement_start() -> pg_sys::TimestampTz {
    // SAFETY: no preconditions.
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}

/// The relation, its descriptor and the tuples the trigger works on.
struct Row<'t, 'f> {
    trigger: &'t PgTrigger<'f>,
    tupdesc: pg_sys::TupleDesc,
    relid: pg_sys::Oid,
    new: pg_sys::HeapTuple,
    old: Option<pg_sys::HeapTuple>,
}

impl Row<'_, '_> {
    fn table(&self) -> String {
        self.trigger.table_name().unwrap_or_else(|_| "?".into())
    }

    /// The column's number and type, looked up in the descriptor itself
    /// (per row, without a call into PostgreSQL).
    fn attnum(&self, col: &CStr, what: &str) -> McResult<(i32, pg_sys::Oid)> {
        // SAFETY: the relation's descriptor, valid for the trigger call; not
        // released on drop (unchecked).
        let desc = unsafe { PgTupleDesc::from_pg_unchecked(self.tupdesc) };
        let found = desc.iter().enumerate().find(|(_, att)| {
            // SAFETY: attname is a NUL-terminated NameData.
            !att.attisdropped && unsafe { CStr::from_ptr(att.attname.data.as_ptr()) } == col
        });
        let Some((i, att)) = found else {
            return Err(McError::UndefinedColumn {
                message: format!(
                    "{what} \"{}\" of protected table \"{}\" does not exist",
                    col.to_string_lossy(),
                    self.table()
                ),
                hint: "after renaming a column, run manna_crypt.protect_column() again with \
                       its new name"
                    .into(),
            });
        };
        Ok((i as i32 + 1, att.atttypid))
    }

    fn datum(&self, tuple: pg_sys::HeapTuple, attnum: i32) -> Option<pg_sys::Datum> {
        let mut isnull = false;
        // SAFETY: the trigger's tuples match the relation's descriptor.
        let d = unsafe { pg_sys::heap_getattr(tuple, attnum, self.tupdesc, &mut isnull) };
        (!isnull).then_some(d)
    }

    /// A text column's value, borrowed from the tuple (detoasted in the
    /// trigger's memory context if need be), which outlives the call.
    fn text(&self, tuple: pg_sys::HeapTuple, attnum: i32) -> Option<&'static str> {
        let d = self.datum(tuple, attnum)?;
        // SAFETY: a non-NULL datum of a text column (checked by the caller);
        // the tuple and any detoasted copy live until the trigger returns.
        unsafe { <&str>::from_polymorphic_datum(d, false, pg_sys::TEXTOID) }
    }

    /// The AAD column's value as text, in a form that does not depend on
    /// session settings (integers, text, uuid only).
    fn aad(&self, tuple: pg_sys::HeapTuple, spec: &Spec<'_>) -> McResult<Option<String>> {
        let Some(aad_col) = spec.aad else {
            return Ok(None);
        };
        let (attnum, typoid) = self.attnum(aad_col, "AAD column")?;
        let Some(d) = self.datum(tuple, attnum) else {
            return Err(McError::NullValue {
                message: format!(
                    "AAD column \"{}\" of protected column \"{}\" is NULL",
                    aad_col.to_string_lossy(),
                    spec.col.to_string_lossy()
                ),
                hint: "a protected value is bound to its row's AAD column, which must not be NULL"
                    .into(),
            });
        };
        // SAFETY: `d` is a non-NULL datum of type `typoid`.
        let text = unsafe {
            match typoid {
                pg_sys::INT2OID => (d.value() as i16).to_string(),
                pg_sys::INT4OID => (d.value() as i32).to_string(),
                pg_sys::INT8OID => (d.value() as i64).to_string(),
                pg_sys::TEXTOID | pg_sys::VARCHAROID => {
                    String::from_polymorphic_datum(d, false, typoid).unwrap_or_default()
                }
                pg_sys::UUIDOID => pgrx::Uuid::from_polymorphic_datum(d, false, typoid)
                    .map(|u| u.to_string())
                    .unwrap_or_default(),
                _ => return Err(super::aad_type_error(&aad_col.to_string_lossy())),
            }
        };
        Ok(Some(text))
    }
}

fn protect<'t>(
    trigger: &'t PgTrigger<'_>,
) -> McResult<Option<PgHeapTuple<'t, AllocatedByPostgres>>> {
    if !matches!(trigger.when(), Ok(PgTriggerWhen::Before))
        || !matches!(trigger.level(), PgTriggerLevel::Row)
    {
        return Err(misuse(
            "manna_crypt._protect() must be fired BEFORE ... FOR EACH ROW",
        ));
    }
    let is_update = match trigger.op() {
        Ok(PgTriggerOperation::Update) => true,
        Ok(PgTriggerOperation::Insert) => false,
        _ => {
            return Err(misuse(
                "manna_crypt._protect() must be fired on INSERT or UPDATE",
            ))
        }
    };
    let td = trigger.trigger_data();
    // SAFETY: tg_relation and its descriptor are valid for the trigger call.
    let (tupdesc, relid) = unsafe { ((*td.tg_relation).rd_att, (*td.tg_relation).rd_id) };
    let row = Row {
        trigger,
        tupdesc,
        relid,
        new: if is_update {
            td.tg_newtuple
        } else {
            td.tg_trigtuple
        },
        old: is_update.then_some(td.tg_trigtuple),
    };
    let mut cols = Vec::new();
    let mut values = Vec::new();
    for spec in specs(td)? {
        if let Some((attnum, value)) = column(&row, &spec)? {
            cols.push(attnum);
            values.push(value);
        }
    }
    let out = if cols.is_empty() {
        row.new
    } else {
        let mut nulls = vec![false; cols.len()];
        // SAFETY: replaces columns of the new tuple with text datums; the
        // result is palloc'd in the trigger's per-tuple memory context, as
        // the trigger manager expects of a returned row.
        unsafe {
            pg_sys::heap_modify_tuple_by_cols(
                row.new,
                tupdesc,
                cols.len() as i32,
                cols.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            )
        }
    };
    // SAFETY: `out` is a valid tuple of this descriptor.
    Ok(Some(unsafe {
        PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(tupdesc), out)
    }))
}

/// One protected column of the row: the value to store instead, if any.
fn column(row: &Row<'_, '_>, spec: &Spec<'_>) -> McResult<Option<(i32, pg_sys::Datum)>> {
    let (attnum, typoid) = row.attnum(spec.col, "protected column")?;
    if typoid != pg_sys::TEXTOID {
        return Err(McError::WrongType {
            message: format!(
                "protected column \"{}\" of table \"{}\" is no longer of type text",
                spec.col.to_string_lossy(),
                row.table()
            ),
            hint: "a protected column must be text; run manna_crypt.unprotect_column() before \
                   changing its type"
                .into(),
        });
    }
    let Some(value) = row.text(row.new, attnum) else {
        return Ok(None);
    };
    let aad = row.aad(row.new, spec)?;
    let class = classify(value);
    let update = match row.old {
        None => None,
        Some(old) => Some(Update {
            unchanged: row.text(old, attnum) == Some(value),
            // Only worth computing when the value itself is kept.
            aad_changed: spec.aad.is_some() && row.aad(old, spec)? != aad,
        }),
    };
    // Only an UPDATE can meet what this statement's INSERT trigger sealed.
    let sealed_from = update.and_then(|_| {
        LAST_SEALED.with(|l| {
            l.borrow()
                .as_ref()
                .filter(|s| {
                    s.relid == row.relid
                        && s.attnum == attnum
                        && s.ciphertext == value
                        && s.statement == statement_start()
                })
                .map(|s| s.aad.clone())
        })
    });
    let action = decide(&Write {
        class,
        update,
        just_sealed_under: sealed_from.as_ref(),
        aad: &aad,
    });
    let sealed = match action {
        Action::Keep => return Ok(None),
        Action::Malformed => {
            return Err(McError::Malformed {
                what: "ciphertext",
                detail: format!(
                    "the value written to protected column \"{}\" starts with \"mc1:\" but is not \
                     a well-formed ciphertext (a ciphertext cannot be edited or appended to)",
                    spec.col.to_string_lossy()
                ),
            })
        }
        Action::Verify => {
            open(value, &aad, spec, row)?;
            return Ok(None);
        }
        Action::Seal => seal(value.as_bytes(), spec.keyring, &aad)?,
        Action::Rebind(from) => {
            let from = match from {
                From::OldRow => row.aad(row.old.expect("an UPDATE"), spec)?,
                From::Sealed(a) => a,
            };
            let plaintext = open(value, &from, spec, row)?;
            seal(&plaintext, spec.keyring, &aad)?
        }
    };
    let datum = sealed
        .as_str()
        .into_datum()
        .unwrap_or(pg_sys::Datum::from(0));
    if update.is_none() {
        LAST_SEALED.with(|l| {
            *l.borrow_mut() = Some(Sealed {
                relid: row.relid,
                attnum,
                statement: statement_start(),
                ciphertext: sealed,
                aad,
            })
        });
    }
    Ok(Some((attnum, datum)))
}

fn seal(plaintext: &[u8], keyring: &str, aad: &Option<String>) -> McResult<String> {
    let aad = aad.as_deref().unwrap_or("").as_bytes();
    let env = crypto::seal_value(KeySource::Keyring(keyring), Form::Text, plaintext, aad)?;
    Ok(envelope::to_text(&env))
}

fn open(
    value: &str,
    aad: &Option<String>,
    spec: &Spec<'_>,
    row: &Row<'_, '_>,
) -> McResult<zeroize::Zeroizing<Vec<u8>>> {
    let bytes = envelope::from_text(value).map_err(|_| McError::Malformed {
        what: "ciphertext",
        detail: "not a well-formed ciphertext".into(),
    })?;
    let aad_bytes = aad.as_deref().unwrap_or("").as_bytes();
    // The writer needs `decrypt` on the value's keyring (checked in
    // open_value), except for the value a re-encryption batch is writing:
    // its caller was checked before the batch switched to the owner.
    let opened = if crypto::sealed_by_engine(value) {
        crypto::open_value_prechecked(&bytes, aad_bytes)
    } else {
        crypto::open_value(None, &bytes, aad_bytes)
    };
    opened.map_err(|e| match e {
        McError::Unauthenticated { .. } => McError::Unauthenticated {
            detail: format!(
                "the ciphertext written to protected column \"{}\" of table \"{}\" does not \
                 decrypt under this row's AAD{}",
                spec.col.to_string_lossy(),
                row.table(),
                spec.aad
                    .map(|a| format!(" (column \"{}\")", a.to_string_lossy()))
                    .unwrap_or_default()
            ),
        },
        other => other,
    })
}
