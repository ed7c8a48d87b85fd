//! The protect trigger, `manna_crypt._protect(col, keyring, aad_column, ...)`:
//! `BEFORE INSERT OR UPDATE FOR EACH ROW`, one per table, named
//! `zz_manna_crypt_protect` so it fires after the table's other BEFORE
//! triggers (PostgreSQL fires them in name order) and sees the values they
//! set. Its arguments are six per protected column (see [`super::row`]):
//! the column, the keyring, the AAD column, the blind-index column and its
//! normalization and bits. Being the trigger's arguments, they travel with
//! the table through pg_dump and need no lookup per row.
//!
//! Per column, [`super::rules::decide`] says what to do; this file reads
//! the row, runs the crypto and writes the result back. A blind-index
//! column is always set from the plaintext — computed by the trigger, never
//! taken from the writer — whenever the row is inserted or its value, its
//! AAD or the index column itself is written; a written ciphertext is
//! decrypted (under the row's AAD) to compute it. No SQL runs here
//! and no code of the table's owner or of the writer: the keys come from
//! the key cache, which reads the key tables as the extension owner.

use std::cell::RefCell;

use manna_crypt_core::classify::classify;
use manna_crypt_core::envelope;
use pgrx::heap_tuple::PgHeapTuple;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, IntoDatum, PgTupleDesc};
use zeroize::Zeroizing;

use super::row::{misuse, specs, Row, Spec};
use super::rules::{decide, Action, From, Update, Write};
use crate::crypto::{self, Form, KeySource};
use crate::error::{McError, McResult, OrRaise};

pub const TRIGGER_NAME: &str = "zz_manna_crypt_protect";

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
    let mut out = Changes::default();
    for spec in specs(td)? {
        column(&row, &spec, &mut out)?;
    }
    let Changes {
        mut cols,
        mut values,
        mut nulls,
    } = out;
    let out = if cols.is_empty() {
        row.new
    } else {
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

/// The columns the trigger replaces in the new row.
#[derive(Default)]
struct Changes {
    cols: Vec<i32>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

impl Changes {
    fn set(&mut self, attnum: i32, value: Option<pg_sys::Datum>) {
        self.cols.push(attnum);
        self.values.push(value.unwrap_or(pg_sys::Datum::from(0)));
        self.nulls.push(value.is_none());
    }
}

/// One protected column of the row, and its blind-index column if it has
/// one: what to store instead goes into `out`.
fn column(row: &Row<'_, '_>, spec: &Spec<'_>, out: &mut Changes) -> McResult<()> {
    let Some((attnum, plaintext)) = value(row, spec, out)? else {
        return Ok(());
    };
    let Some((index_col, _)) = spec.index else {
        return Ok(());
    };
    let (index_attnum, typoid) = row.attnum(index_col, "blind-index column")?;
    if typoid != pg_sys::BYTEAOID {
        return Err(McError::WrongType {
            message: format!(
                "blind-index column \"{}\" of table \"{}\" is no longer of type bytea",
                index_col.to_string_lossy(),
                row.table()
            ),
            hint: "run manna_crypt.protect_column() again with a bytea blind-index column".into(),
        });
    }
    let new_term = row.bytes(row.new, index_attnum);
    let needed = match (&plaintext, row.old) {
        // A backfill batch's own term for this row is kept as it is.
        (Plain::Unchanged, Some(old)) => {
            new_term != row.bytes(old, index_attnum)
                && !new_term.is_some_and(crypto::term_by_engine)
        }
        _ => true,
    };
    if !needed {
        return Ok(());
    }
    // A value a re-encryption batch sealed is indexed for the batch's
    // caller, who was checked before the switch to the table's owner.
    let stored = row.text(row.new, attnum).unwrap_or_default();
    let by_engine = crypto::sealed_by_engine(stored);
    let term = match plaintext {
        Plain::Null => None,
        Plain::Known(p) => Some(term_of(&p, spec, by_engine)?),
        Plain::Unchanged | Plain::Stored => {
            let aad = row.aad(row.new, spec)?;
            Some(term_of(&open(stored, &aad, spec, row)?, spec, by_engine)?)
        }
    };
    if term.as_deref() != new_term {
        out.set(index_attnum, term.map(|t| t.into_datum()).unwrap_or(None));
    }
    Ok(())
}

/// The plaintext behind a protected column's new value, as far as the
/// trigger has it, for the blind index.
enum Plain {
    /// NULL: the index is NULL too.
    Null,
    /// Neither the value nor its AAD changed (an UPDATE).
    Unchanged,
    /// A ciphertext kept as written (INSERT, upsert): decrypt to index it.
    Stored,
    Known(Zeroizing<Vec<u8>>),
}

/// The term of a plaintext; the writer needs `blind_index` on the keyring
/// unless a re-encryption batch wrote the value (`by_engine`).
fn term_of(plaintext: &[u8], spec: &Spec<'_>, by_engine: bool) -> McResult<Vec<u8>> {
    let (_, shape) = spec.index.expect("only called for an indexed column");
    let text = std::str::from_utf8(plaintext).map_err(|_| McError::NotUtf8)?;
    if by_engine {
        crypto::index_term_prechecked(spec.keyring, shape, text)
    } else {
        crypto::index_term(spec.keyring, shape, text)
    }
}

/// The protected column itself: the value to store instead goes into `out`;
/// returns the column's number and what is known of its plaintext.
fn value(row: &Row<'_, '_>, spec: &Spec<'_>, out: &mut Changes) -> McResult<Option<(i32, Plain)>> {
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
        return Ok(Some((attnum, Plain::Null)));
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
    let (sealed, plaintext) = match action {
        Action::Keep => {
            let plain = match update {
                Some(u) if u.unchanged => Plain::Unchanged,
                _ => Plain::Stored,
            };
            return Ok(Some((attnum, plain)));
        }
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
            let plaintext = open(value, &aad, spec, row)?;
            return Ok(Some((attnum, Plain::Known(plaintext))));
        }
        Action::Seal => (
            seal(value.as_bytes(), spec.keyring, &aad)?,
            spec.index
                .map(|_| Zeroizing::new(value.as_bytes().to_vec())),
        ),
        Action::Rebind(from) => {
            let from = match from {
                From::OldRow => row.aad(row.old.expect("an UPDATE"), spec)?,
                From::Sealed(a) => a,
            };
            let plaintext = open(value, &from, spec, row)?;
            (seal(&plaintext, spec.keyring, &aad)?, Some(plaintext))
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
    out.set(attnum, Some(datum));
    // Without an index the plaintext is not needed (and not copied).
    Ok(Some((
        attnum,
        plaintext.map_or(Plain::Unchanged, Plain::Known),
    )))
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
