//! Registered columns: the text columns that hold manna_crypt ciphertexts,
//! and how many values under a given key they hold.
//!
//! A column is registered explicitly with `register_column()`, and
//! automatically by every re-encryption procedure run on it. Before a key is
//! revoked or destroyed, every registered column is scanned for values under
//! that key; while any remain, the operation is refused unless forced.

use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::error::{McError, McResult, OrRaise};
use crate::pg::security::{run_as, Identity};
use crate::pg::spi::{self, Mode};

/// Registered columns that still exist as text columns of ordinary or
/// partitioned tables, as (qualified table, quoted column).
const REGISTERED: &str = "\
    SELECT c.tbl::text, quote_ident(c.col) FROM manna_crypt.registered_columns c \
      JOIN pg_class r ON r.oid = c.tbl AND r.relkind IN ('r', 'p') \
      JOIN pg_attribute a ON a.attrelid = c.tbl AND a.attname = c.col AND NOT a.attisdropped \
       AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, \
                          'manna_crypt.encrypted_text'::regtype) \
     ORDER BY 1, 2";

const IS_TEXT_COLUMN: &str = "\
    SELECT EXISTS (SELECT FROM pg_attribute a \
      JOIN pg_class r ON r.oid = a.attrelid AND r.relkind IN ('r', 'p') \
     WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
       AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, \
                          'manna_crypt.encrypted_text'::regtype))";

const REGISTER: &str = "\
    INSERT INTO manna_crypt.registered_columns (tbl, col) VALUES ($1, $2) \
    ON CONFLICT DO NOTHING";

const UNREGISTER: &str = "DELETE FROM manna_crypt.registered_columns WHERE tbl = $1 AND col = $2";

const CAN_SELECT: &str = "SELECT has_table_privilege($1, 'SELECT')";

const REGISTERED_COUNT: &str = "SELECT count(*) FROM manna_crypt.registered_columns";

/// Counts the values of one column under one key; `{tbl}` and `{col}` come
/// from [`REGISTERED`], already quoted.
fn count_under_key_sql(tbl: &str, col: &str) -> String {
    format!(
        "SELECT count(*) FROM {tbl} WHERE manna_crypt.is_encrypted({col}::text) \
         AND manna_crypt.key_id({col}::text) = $1"
    )
}

/// (column as `table.column`, number of values) for each registered column
/// that still holds values under `key_id`.
///
/// The list is read as the extension owner (the registry is the owner's);
/// the counting runs as the *calling* role, never as the owner: counting
/// reads user tables, and nothing a table owner controls may run with the
/// extension owner's privileges. Only ordinary and partitioned tables with
/// text-typed columns are read (no views, no user casts), and a caller who
/// cannot read one gets 42501 (`force => true` skips the check).
pub fn key_usage(key_id: i32) -> McResult<Vec<(String, i64)>> {
    let columns = run_as(Identity::ExtensionOwner, || {
        spi::rows(Mode::Read, REGISTERED, &[], |r| {
            Ok((r.req::<String>(1)?, r.req::<String>(2)?))
        })
    })?;
    run_as(Identity::Caller, || {
        let mut users = Vec::new();
        for (tbl, col) in columns {
            let sql = count_under_key_sql(&tbl, &col);
            let n = spi::one::<i64>(Mode::Read, &sql, &[i64::from(key_id).into()])?.unwrap_or(0);
            if n > 0 {
                users.push((format!("{tbl}.{col}"), n));
            }
        }
        Ok(users)
    })
}

/// How many columns are registered (for `info()`).
pub fn registered_count() -> McResult<i64> {
    Ok(spi::one::<i64>(Mode::Read, REGISTERED_COUNT, &[])?.unwrap_or(0))
}

/// Checks that `tbl.col` is a column that can hold text ciphertexts.
pub fn check_text_column(tbl: pg_sys::Oid, col: &str) -> McResult<()> {
    let ok =
        spi::one::<bool>(Mode::Read, IS_TEXT_COLUMN, &[tbl.into(), col.into()])?.unwrap_or(false);
    if !ok {
        return Err(McError::BadArgument {
            message: format!("column \"{col}\" is not a text column of a table"),
            detail: None,
            hint: Some(
                "manna_crypt re-encrypts text, varchar and encrypted_text columns of \
                 ordinary tables"
                    .into(),
            ),
        });
    }
    Ok(())
}

/// Records that `tbl.col` holds ciphertexts. Idempotent. Must run as the
/// extension owner.
pub fn register(tbl: pg_sys::Oid, col: &str) -> McResult<()> {
    check_text_column(tbl, col)?;
    spi::run(REGISTER, &[tbl.into(), col.into()])
}

/// Tells manna_crypt that a column holds ciphertexts, so keys it uses are
/// protected from revocation and destruction.
#[pg_extern(volatile, parallel_unsafe)]
fn register_column(tbl: PgRelation, col: &str) {
    // Checked as the caller: registering a table is a claim about its
    // contents, which only someone who can read it may make.
    let readable = spi::one::<bool>(Mode::Read, CAN_SELECT, &[tbl.oid().into()])
        .or_raise()
        .unwrap_or(false);
    if !readable {
        McError::PermissionDenied {
            message: format!("permission denied for table {}", tbl.name()),
            hint: "register only tables you can read".into(),
        }
        .raise();
    }
    run_as(Identity::ExtensionOwner, || register(tbl.oid(), col)).or_raise()
}

/// Forgets a registered column.
#[pg_extern(volatile, parallel_unsafe)]
fn unregister_column(tbl: PgRelation, col: &str) {
    run_as(Identity::ExtensionOwner, || {
        spi::run(UNREGISTER, &[tbl.oid().into(), col.into()])
    })
    .or_raise()
}
