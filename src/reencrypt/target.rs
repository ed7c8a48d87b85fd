//! The table and column a run works on: what may be re-encrypted, and how
//! big it is.

use pgrx::pg_sys;
use pgrx::spi::quote_identifier;

use crate::error::{McError, McResult};
use crate::keys::usage;
use crate::pg::spi::{self, Mode};

const RELKIND: &str = "SELECT relkind::text, relhassubclass FROM pg_class WHERE oid = $1";

const HAS_TYPMOD: &str = "\
    SELECT atttypmod <> -1 FROM pg_attribute WHERE attrelid = $1 AND attname = $2";

const COLUMN_EXISTS: &str = "\
    SELECT EXISTS (SELECT FROM pg_attribute \
     WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped)";

const TABLE_NAME: &str = "SELECT $1::regclass::text";

const BLOCKS: &str = "\
    SELECT pg_catalog.pg_relation_size($1) / current_setting('block_size')::int8";

const STATS: &str = "SELECT reltuples, relpages FROM pg_class WHERE oid = $1";

/// The column to re-encrypt, quoted: a text column of an ordinary table
/// without inheritance children (each batch is a range of this table's own
/// heap blocks, so a partitioned parent or inheritance children would be
/// silently skipped: run it on each partition instead), and without a
/// length limit (ciphertexts are longer than their plaintexts, so one long
/// value would fail every batch that holds it).
pub fn text_column(tbl: pg_sys::Oid, col: &str) -> McResult<String> {
    usage::check_text_column(tbl, col)?;
    let kind = spi::rows(Mode::Read, RELKIND, &[tbl.into()], |r| {
        Ok((r.get::<String>(1)?, r.get::<bool>(2)?))
    })?;
    let plain_table = matches!(
        kind.first(),
        Some((Some(relkind), Some(false))) if relkind == "r"
    );
    if !plain_table {
        return Err(McError::BadArgument {
            message: "re-encryption works on one ordinary table at a time".into(),
            detail: Some("the table is partitioned or has inheritance children".into()),
            hint: Some("CALL the procedure on each partition (each child table)".into()),
        });
    }
    let limited =
        spi::one::<bool>(Mode::Read, HAS_TYPMOD, &[tbl.into(), col.into()])?.unwrap_or(false);
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
    Ok(quote_identifier(col))
}

/// The AAD column, quoted; any type (its text form is the AAD).
pub fn aad_column(tbl: pg_sys::Oid, col: &str) -> McResult<String> {
    let ok =
        spi::one::<bool>(Mode::Read, COLUMN_EXISTS, &[tbl.into(), col.into()])?.unwrap_or(false);
    if !ok {
        return Err(McError::BadArgument {
            message: format!("aad_column \"{col}\" does not exist in the table"),
            detail: None,
            hint: None,
        });
    }
    Ok(quote_identifier(col))
}

/// The table's name as SQL: schema-qualified unless on the search path.
pub fn table_sql(tbl: pg_sys::Oid) -> McResult<String> {
    Ok(spi::one::<String>(Mode::Read, TABLE_NAME, &[tbl.into()])?.unwrap_or_default())
}

/// The table's size in heap blocks now.
pub fn block_count(tbl: pg_sys::Oid) -> McResult<i64> {
    Ok(spi::one::<i64>(Mode::Read, BLOCKS, &[tbl.into()])?.unwrap_or(0))
}

/// Rows in the table: the planner's estimate when it has one, else a count.
pub fn row_estimate(tbl: pg_sys::Oid, tbl_sql: &str) -> McResult<i64> {
    let stats = spi::rows(Mode::Read, STATS, &[tbl.into()], |r| {
        Ok((r.get::<f32>(1)?, r.get::<i32>(2)?))
    })?;
    match stats.first() {
        Some((Some(t), Some(pages))) if *t >= 0.0 && *pages > 0 => Ok(*t as i64),
        _ => {
            let sql = format!("SELECT count(*) FROM {tbl_sql}");
            Ok(spi::one::<i64>(Mode::Read, &sql, &[])?.unwrap_or(0))
        }
    }
}
