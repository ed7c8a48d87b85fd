//! Which columns are protected and how: read back from the protect
//! trigger's arguments (the one place the settings live, so they travel
//! with the table through pg_dump), for `protect_column()`, the
//! re-encryption procedures, the blind-index backfill and
//! `protected_columns()`.

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::row::FIELDS;
use super::trigger::TRIGGER_NAME;
use crate::error::{McResult, OrRaise};
use crate::pg::datum::Regclass;
use crate::pg::spi::{self, Mode};

const TRIGGER_ARGS: &str = "\
    SELECT t.tgargs FROM pg_catalog.pg_trigger t \
     WHERE t.tgrelid = $1 AND t.tgname = $2";

/// One protected column as the trigger's arguments spell it (see
/// [`super::row::FIELDS`]): col, keyring, aad column, blind-index column,
/// normalize, bits; '' for an absent column.
pub type Fields = [String; FIELDS];

/// The protected columns of the table, from the trigger's arguments.
pub fn current_specs(tbl: Regclass) -> McResult<Vec<Fields>> {
    let args = spi::one::<Vec<u8>>(
        Mode::Read,
        TRIGGER_ARGS,
        &[tbl.0.into(), TRIGGER_NAME.into()],
    )?;
    Ok(args.map(|a| parse_tgargs(&a)).unwrap_or_default())
}

/// tgargs holds each argument followed by a NUL byte.
fn parse_tgargs(args: &[u8]) -> Vec<Fields> {
    let parts: Vec<String> = args
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let parts = &parts[..parts.len().saturating_sub(1)];
    parts
        .chunks(FIELDS)
        .filter_map(|c| Fields::try_from(c.to_vec()).ok())
        .collect()
}

/// For the re-encryption procedures: `Some(aad)` when `tbl.col` is
/// protected (`aad` its AAD column, `None` for none), `None` when it is not.
pub fn protected_aad(tbl: pg_sys::Oid, col: &str) -> McResult<Option<Option<String>>> {
    Ok(current_specs(Regclass(tbl))?
        .into_iter()
        .find(|s| s[0] == col)
        .map(|[_, _, aad, ..]| (!aad.is_empty()).then_some(aad)))
}

/// For the blind-index backfill: `tbl.col`'s protection, if it is protected.
pub fn protection(tbl: pg_sys::Oid, col: &str) -> McResult<Option<Protection>> {
    Ok(current_specs(Regclass(tbl))?
        .into_iter()
        .find(|s| s[0] == col)
        .map(Protection::from))
}

/// A protected column's settings, as `protected_columns()` shows them.
pub struct Protection {
    pub keyring: String,
    pub aad: Option<String>,
    /// The blind-index column, its normalization and bits.
    pub index: Option<(String, String, i32)>,
}

impl From<Fields> for Protection {
    fn from(f: Fields) -> Protection {
        let [_, keyring, aad, index, normalize, bits] = f;
        Protection {
            keyring,
            aad: (!aad.is_empty()).then_some(aad),
            index: (!index.is_empty()).then(|| (index, normalize, bits.parse().unwrap_or(256))),
        }
    }
}

/// Every protected trigger's table with its arguments, this database.
const ALL_TRIGGERS: &str = "\
    SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, t.tgargs \
      FROM pg_catalog.pg_trigger t \
      JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid \
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE t.tgname = $1 \
       AND t.tgfoid = 'manna_crypt._protect()'::pg_catalog.regprocedure \
     ORDER BY 1, 2";

/// Every protected column of this database with its settings (what the
/// protect trigger's arguments say; readable by anyone who can read
/// pg_trigger, which is everyone).
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::type_complexity)]
fn protected_columns() -> TableIterator<
    'static,
    (
        name!(schema_name, String),
        name!(table_name, String),
        name!(col, String),
        name!(keyring, String),
        name!(aad_column, Option<String>),
        name!(blind_index_column, Option<String>),
        name!(normalization, Option<String>),
        name!(bits, Option<i32>),
    ),
> {
    let rows = spi::rows(Mode::Read, ALL_TRIGGERS, &[TRIGGER_NAME.into()], |r| {
        Ok((
            r.req::<String>(1)?,
            r.req::<String>(2)?,
            r.req::<Vec<u8>>(3)?,
        ))
    })
    .or_raise();
    let mut out = Vec::new();
    for (schema, table, args) in rows {
        for fields in parse_tgargs(&args) {
            let col = fields[0].clone();
            let p = Protection::from(fields);
            let (index, normalize, bits) = match p.index {
                Some((i, n, b)) => (Some(i), Some(n), Some(b)),
                None => (None, None, None),
            };
            let (schema, table) = (schema.clone(), table.clone());
            out.push((schema, table, col, p.keyring, p.aad, index, normalize, bits));
        }
    }
    TableIterator::new(out)
}
