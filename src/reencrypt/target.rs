//! The table and column a run works on: what may be re-encrypted, whether
//! the caller may do it, and how big the table is.
//!
//! Everything that reads the table's rows runs as the table's owner in a
//! security-restricted operation with `row_security = off` (see
//! [`crate::pg::security`]): no code of the table owner's (a policy, a
//! trigger, a CHECK, an index expression) ever runs with the caller's
//! rights, and a FORCE ROW LEVEL SECURITY table fails instead of being
//! silently half converted. What the caller may do is checked first, as the
//! caller.

use pgrx::pg_sys;
use pgrx::spi::quote_identifier;

use crate::error::{McError, McResult};
use crate::keys::usage;
use crate::pg::security::{caller_id, run_as, Identity};
use crate::pg::spi::{self, Mode};

const RELKIND: &str = "SELECT relkind::text, relhassubclass FROM pg_class WHERE oid = $1";

/// May role $1 convert column $3 of table $2 (reading column $4 as AAD)?
/// Its owner (or a member of the owning role) may, as PostgreSQL's own
/// maintenance commands require; so may a role with SELECT and UPDATE on
/// the column and SELECT on the AAD column.
const MAY_CONVERT: &str = "\
    SELECT pg_has_role($1, c.relowner, 'MEMBER') \
        OR (has_column_privilege($1, $2, $3, 'SELECT') \
            AND has_column_privilege($1, $2, $3, 'UPDATE') \
            AND ($4 IS NULL OR has_column_privilege($1, $2, $4, 'SELECT'))) \
      FROM pg_class c WHERE c.oid = $2";

const HAS_TYPMOD: &str = "\
    SELECT atttypmod <> -1 FROM pg_attribute WHERE attrelid = $1 AND attname = $2";

const COLUMN_EXISTS: &str = "\
    SELECT EXISTS (SELECT FROM pg_attribute \
     WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped)";

/// Always schema-qualified: the table is read under `search_path =
/// pg_catalog, pg_temp` (see [`crate::pg::security`]).
const TABLE_NAME: &str = "\
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) \
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid = $1";

const BLOCKS: &str = "\
    SELECT pg_catalog.pg_relation_size($1) / current_setting('block_size')::int8";

const STATS: &str = "SELECT reltuples, relpages FROM pg_class WHERE oid = $1";

/// Checks that the table exists (42P01 for the OID of a dropped table) and
/// is an ordinary table without inheritance children: each batch is a range
/// of this table's own heap blocks, so a partitioned parent or inheritance
/// children would be silently skipped (run it on each partition instead).
pub fn check_table(tbl: pg_sys::Oid) -> McResult<()> {
    let kind = spi::rows(Mode::Read, RELKIND, &[tbl.into()], |r| {
        Ok((r.get::<String>(1)?, r.get::<bool>(2)?))
    })?;
    let Some(kind) = kind.first() else {
        return Err(McError::UndefinedTable {
            message: format!("relation with OID {} does not exist", tbl.to_u32()),
        });
    };
    if !matches!(kind, (Some(relkind), Some(false)) if relkind == "r") {
        return Err(McError::BadArgument {
            message: "re-encryption works on one ordinary table at a time".into(),
            detail: Some("the table is partitioned or has inheritance children".into()),
            hint: Some("CALL the procedure on each partition (each child table)".into()),
        });
    }
    Ok(())
}

/// The column to re-encrypt, quoted: a text column without a length limit
/// (ciphertexts are longer than their plaintexts, so one long value would
/// fail every batch that holds it).
pub fn text_column(tbl: pg_sys::Oid, col: &str) -> McResult<String> {
    usage::check_text_column(tbl, col)?;
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

/// The AAD column, quoted; any type (its text form is the AAD) but the
/// converted column itself: that would bind each value to its own old form,
/// so no value would decrypt once it changed.
pub fn aad_column(tbl: pg_sys::Oid, col: &str, converted: &str) -> McResult<String> {
    if col == converted {
        return Err(McError::BadArgument {
            message: "aad_column must not be the column being converted".into(),
            detail: Some(format!("both are \"{col}\"")),
            hint: Some("name a column that identifies the row, such as its primary key".into()),
        });
    }
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

/// The table's name as SQL, schema-qualified.
pub fn table_sql(tbl: pg_sys::Oid) -> McResult<String> {
    Ok(spi::one::<String>(Mode::Read, TABLE_NAME, &[tbl.into()])?.unwrap_or_default())
}

/// The table's size in heap blocks now.
pub fn block_count(tbl: pg_sys::Oid) -> McResult<i64> {
    Ok(spi::one::<i64>(Mode::Read, BLOCKS, &[tbl.into()])?.unwrap_or(0))
}

/// Checks, as the caller, that the caller may convert `col` (42501).
pub fn check_privileges(tbl: pg_sys::Oid, col: &str, aad: Option<&str>) -> McResult<()> {
    let args = [caller_id().into(), tbl.into(), col.into(), aad.into()];
    let allowed = run_as(Identity::Caller, || {
        spi::one::<bool>(Mode::Read, MAY_CONVERT, &args)
    })?;
    if allowed.unwrap_or(false) {
        return Ok(());
    }
    Err(McError::PermissionDenied {
        message: format!("permission denied to re-encrypt column \"{col}\""),
        hint: "the table's owner may, or a role with SELECT and UPDATE on the column \
               and SELECT on the aad_column"
            .into(),
    })
}

/// Rows in the table: the planner's estimate when it has one, else a count
/// (read as the table's owner).
pub fn row_estimate(tbl: pg_sys::Oid, tbl_sql: &str) -> McResult<i64> {
    let stats = spi::rows(Mode::Read, STATS, &[tbl.into()], |r| {
        Ok((r.get::<f32>(1)?, r.get::<i32>(2)?))
    })?;
    match stats.first() {
        Some((Some(t), Some(pages))) if *t >= 0.0 && *pages > 0 => Ok(*t as i64),
        _ => {
            let sql = format!("SELECT count(*) FROM ONLY {tbl_sql}");
            run_as(Identity::TableOwner(tbl), || {
                Ok(spi::one::<i64>(Mode::Read, &sql, &[])?.unwrap_or(0))
            })
        }
    }
}
