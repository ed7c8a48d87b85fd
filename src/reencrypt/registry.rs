//! Registered columns: the text columns that hold manna_crypt ciphertexts.
//!
//! A column is registered explicitly with `register_column()`, and
//! automatically by every re-encryption procedure run on it. Before a key is
//! revoked or destroyed, every registered column is scanned for values under
//! that key; while any remain, the operation is refused unless forced.

use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::error::{McError, McResult, OrRaise};
use crate::keys::owner::as_owner;

/// (column as `table.column`, number of values) for each registered column
/// that still holds values under `key_id`. Must run as owner.
pub fn key_usage(key_id: i32) -> McResult<Vec<(String, i64)>> {
    let columns: Vec<(String, String)> = Spi::connect(|client| {
        let rows = client.select(
            "SELECT c.tbl::text, quote_ident(c.col) FROM manna_crypt.registered_columns c \
             JOIN pg_attribute a ON a.attrelid = c.tbl AND a.attname = c.col AND NOT a.attisdropped ORDER BY 1, 2",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for r in rows {
            out.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok::<_, McError>(out)
    })?;
    let mut users = Vec::new();
    for (tbl, col) in columns {
        let n = Spi::get_one_with_args::<i64>(
            &format!(
                "SELECT count(*) FROM {tbl} WHERE manna_crypt.is_encrypted({col}::text) \
                 AND manna_crypt.key_id({col}::text) = $1"
            ),
            &[i64::from(key_id).into()],
        )?
        .unwrap_or(0);
        if n > 0 {
            users.push((format!("{tbl}.{col}"), n));
        }
    }
    Ok(users)
}

/// Checks that `tbl.col` is a column that can hold text ciphertexts.
pub fn check_text_column(tbl: pg_sys::Oid, col: &str) -> McResult<()> {
    let ok = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped \
           AND atttypid IN ('text'::regtype, 'varchar'::regtype, 'manna_crypt.encrypted_text'::regtype))",
        &[tbl.into(), col.into()],
    )?
    .unwrap_or(false);
    if !ok {
        return Err(McError::BadArgument {
            message: format!("column \"{col}\" is not a text column of the table"),
            detail: None,
            hint: Some("manna_crypt re-encrypts text, varchar and encrypted_text columns".into()),
        });
    }
    Ok(())
}

/// Records that `tbl.col` holds ciphertexts. Idempotent.
pub fn register(tbl: pg_sys::Oid, col: &str) -> McResult<()> {
    check_text_column(tbl, col)?;
    Spi::run_with_args(
        "INSERT INTO manna_crypt.registered_columns (tbl, col) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[tbl.into(), col.into()],
    )?;
    Ok(())
}

/// Tells manna_crypt that a column holds ciphertexts, so keys it uses are
/// protected from revocation and destruction.
#[pg_extern(volatile, parallel_unsafe)]
fn register_column(tbl: PgRelation, col: &str) {
    as_owner(|| register(tbl.oid(), col)).or_raise()
}

/// Forgets a registered column.
#[pg_extern(volatile, parallel_unsafe)]
fn unregister_column(tbl: PgRelation, col: &str) {
    as_owner(|| {
        Spi::run_with_args(
            "DELETE FROM manna_crypt.registered_columns WHERE tbl = $1 AND col = $2",
            &[tbl.oid().into(), col.into()],
        )?;
        Ok(())
    })
    .or_raise()
}
