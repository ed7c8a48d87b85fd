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

/// Registered columns that still exist as text columns of ordinary or
/// partitioned tables, as (quoted table, quoted column). Must run as owner
/// (the registry is the owner's); returns names only.
fn registered() -> McResult<Vec<(String, String)>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT c.tbl::text, quote_ident(c.col) FROM manna_crypt.registered_columns c \
               JOIN pg_class r ON r.oid = c.tbl AND r.relkind IN ('r', 'p') \
               JOIN pg_attribute a ON a.attrelid = c.tbl AND a.attname = c.col AND NOT a.attisdropped \
                AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'manna_crypt.encrypted_text'::regtype) \
              ORDER BY 1, 2",
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
    })
}

/// (column as `table.column`, number of values) for each registered column
/// that still holds values under `key_id`.
///
/// Must run as the *calling* role, never as the owner: counting reads user
/// tables, and nothing a table owner controls may run with the extension
/// owner's privileges. Only ordinary and partitioned tables with text-typed
/// columns are read (no views, no user casts), and a caller who cannot read
/// one gets 42501 (`force => true` skips the check).
pub fn key_usage(key_id: i32) -> McResult<Vec<(String, i64)>> {
    let columns = as_owner(registered)?;
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
        "SELECT EXISTS (SELECT FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid AND r.relkind IN ('r', 'p') \
           WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'manna_crypt.encrypted_text'::regtype))",
        &[tbl.into(), col.into()],
    )?
    .unwrap_or(false);
    if !ok {
        return Err(McError::BadArgument {
            message: format!("column \"{col}\" is not a text column of a table"),
            detail: None,
            hint: Some("manna_crypt re-encrypts text, varchar and encrypted_text columns of ordinary tables".into()),
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
    // Checked as the caller: registering a table is a claim about its
    // contents, which only someone who can read it may make.
    let readable = Spi::get_one_with_args::<bool>(
        "SELECT has_table_privilege($1, 'SELECT')",
        &[tbl.oid().into()],
    )
    .map_err(McError::from)
    .or_raise()
    .unwrap_or(false);
    if !readable {
        McError::Usage {
            code: pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: format!("permission denied for table {}", tbl.name()),
            hint: Some("register only tables you can read".into()),
        }
        .raise();
    }
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
