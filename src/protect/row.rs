//! The protect trigger's view of its arguments and of the row it fires
//! for: which columns are protected and how, and typed reads of the row's
//! values straight from the tuple (no call into PostgreSQL per row).

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{FromDatum, PgTupleDesc};

use crate::crypto::TermShape;
use crate::error::{McError, McResult};

/// The trigger's arguments per protected column, in this order (see
/// [`super::setup`], which writes them).
pub const FIELDS: usize = 6;

/// One protected column, from the trigger's arguments: the column, its
/// keyring, its AAD column ('' for none), its blind-index column ('' for
/// none), the index's normalization and bits.
pub struct Spec<'a> {
    pub col: &'a CStr,
    pub keyring: &'a str,
    pub aad: Option<&'a CStr>,
    pub index: Option<(&'a CStr, TermShape)>,
}

fn field_str<'a>(arg: &'a CStr, what: &str) -> McResult<&'a str> {
    arg.to_str()
        .map_err(|_| misuse(&format!("manna_crypt._protect(): {what} is not UTF-8")))
}

pub fn specs(td: &pg_sys::TriggerData) -> McResult<Vec<Spec<'_>>> {
    // SAFETY: tg_trigger is valid for the call; tgargs holds tgnargs
    // NUL-terminated strings owned by the relcache entry for that long.
    let args: Vec<&CStr> = unsafe {
        let trig = &*td.tg_trigger;
        let n = usize::try_from(trig.tgnargs).unwrap_or(0);
        (0..n)
            .map(|i| CStr::from_ptr(*trig.tgargs.add(i)))
            .collect()
    };
    if args.is_empty() || !args.len().is_multiple_of(FIELDS) {
        return Err(misuse(
            "manna_crypt._protect() takes (column, keyring, aad_column, blind_index_column, \
             normalize, bits) per protected column",
        ));
    }
    args.chunks(FIELDS)
        .map(|t| {
            let index = if t[3].is_empty() {
                None
            } else {
                let normalize = field_str(t[4], "normalize")?;
                let bits = field_str(t[5], "bits")?
                    .parse::<i32>()
                    .map_err(|_| misuse("manna_crypt._protect(): bits is not a number"))?;
                Some((t[3], TermShape::parse(normalize, bits)?))
            };
            Ok(Spec {
                col: t[0],
                keyring: field_str(t[1], "keyring name")?,
                aad: (!t[2].is_empty()).then_some(t[2]),
                index,
            })
        })
        .collect()
}

pub fn misuse(message: &str) -> McError {
    McError::TriggerMisuse {
        message: message.into(),
        hint: HINT.into(),
    }
}

pub const HINT: &str = "install it with manna_crypt.protect_column(tbl, col, keyring, aad_column)";

/// The relation, its descriptor and the tuples the trigger works on.
pub struct Row<'t, 'f> {
    pub trigger: &'t PgTrigger<'f>,
    pub tupdesc: pg_sys::TupleDesc,
    pub relid: pg_sys::Oid,
    pub new: pg_sys::HeapTuple,
    pub old: Option<pg_sys::HeapTuple>,
}

impl Row<'_, '_> {
    pub fn table(&self) -> String {
        self.trigger.table_name().unwrap_or_else(|_| "?".into())
    }

    /// The column's number and type, looked up in the descriptor itself
    /// (per row, without a call into PostgreSQL).
    pub fn attnum(&self, col: &CStr, what: &str) -> McResult<(i32, pg_sys::Oid)> {
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

    pub fn datum(&self, tuple: pg_sys::HeapTuple, attnum: i32) -> Option<pg_sys::Datum> {
        let mut isnull = false;
        // SAFETY: the trigger's tuples match the relation's descriptor.
        let d = unsafe { pg_sys::heap_getattr(tuple, attnum, self.tupdesc, &mut isnull) };
        (!isnull).then_some(d)
    }

    /// A text column's value, borrowed from the tuple (detoasted in the
    /// trigger's memory context if need be), which outlives the call.
    pub fn text(&self, tuple: pg_sys::HeapTuple, attnum: i32) -> Option<&'static str> {
        let d = self.datum(tuple, attnum)?;
        // SAFETY: a non-NULL datum of a text column (checked by the caller);
        // the tuple and any detoasted copy live until the trigger returns.
        unsafe { <&str>::from_polymorphic_datum(d, false, pg_sys::TEXTOID) }
    }

    /// The AAD column's value as text, in a form that does not depend on
    /// session settings (integers, text, uuid only).
    pub fn aad(&self, tuple: pg_sys::HeapTuple, spec: &Spec<'_>) -> McResult<Option<String>> {
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

impl Row<'_, '_> {
    /// A bytea column's value, borrowed from the tuple (detoasted in the
    /// trigger's memory context if need be).
    pub fn bytes(&self, tuple: pg_sys::HeapTuple, attnum: i32) -> Option<&'static [u8]> {
        let d = self.datum(tuple, attnum)?;
        // SAFETY: a non-NULL datum of a bytea column (checked by the caller);
        // the tuple and any detoasted copy live until the trigger returns.
        unsafe { <&[u8]>::from_polymorphic_datum(d, false, pg_sys::BYTEAOID) }
    }
}
