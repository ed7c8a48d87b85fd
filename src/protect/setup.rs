//! `protect_column()` / `unprotect_column()`: install and remove the
//! protect trigger and the CHECK that backs it, for the table's owner.
//!
//! The DDL runs as the caller, who must own the table (or be a member of
//! its owner role): nothing runs with another role's rights, and no code of
//! the table's owner runs with the caller's. Only the registration (so the
//! keys the column uses cannot be revoked under it) and its audit row are
//! written as the extension owner.
//!
//! The CHECK is added `NOT VALID` and then validated in a subtransaction:
//! a table that still holds plaintext keeps the trigger (new writes are
//! encrypted) and an unvalidated CHECK, and a NOTICE says how to encrypt
//! the rest and validate. A domain CHECK (`encrypted_text`) would run
//! before the trigger and refuse the plaintext the trigger is there to
//! encrypt; a table CHECK runs after BEFORE triggers.

use manna_crypt_core::blind;
use pgrx::prelude::*;
use serde_json::json;

use super::config::{current_specs, Fields};
use super::trigger::TRIGGER_NAME;
use crate::crypto::TermShape;
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::keys::{indexkeys, store, usage};
use crate::pg::datum::Regclass;
use crate::pg::report;
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::spi::{self, Mode};
use crate::pg::subxact;

const TABLE: &str = "\
    SELECT c.relkind::text, pg_catalog.pg_has_role(c.relowner, 'USAGE'), \
           c.oid::pg_catalog.regclass::text \
      FROM pg_catalog.pg_class c WHERE c.oid = $1";

const COLUMN: &str = "\
    SELECT pg_catalog.format_type(a.atttypid, NULL), a.attgenerated <> '' \
      FROM pg_catalog.pg_attribute a \
     WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped";

const KEYRING_KIND: &str = "SELECT kind FROM manna_crypt.keyrings WHERE name = $1";

const CREATE_TRIGGER: &str = "\
    SELECT pg_catalog.format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %s FOR EACH ROW \
             EXECUTE FUNCTION manna_crypt._protect(%s)', $2, $1::pg_catalog.regclass, \
           (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a), ', ' ORDER BY o) \
              FROM pg_catalog.unnest($3::text[]) WITH ORDINALITY AS u(a, o)))";

const DROP_TRIGGER: &str = "\
    SELECT pg_catalog.format('DROP TRIGGER %I ON %s', $2, $1::pg_catalog.regclass)";

const HAS_CONSTRAINT: &str = "\
    SELECT EXISTS (SELECT FROM pg_catalog.pg_constraint WHERE conrelid = $1 AND conname = $2)";

const ADD_CHECK: &str = "\
    SELECT pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I CHECK \
             (manna_crypt._protected_check(%I, %L)) NOT VALID', \
           $1::pg_catalog.regclass, $2, $3, $3)";

const VALIDATE_CHECK: &str = "\
    SELECT pg_catalog.format('ALTER TABLE %s VALIDATE CONSTRAINT %I', \
           $1::pg_catalog.regclass, $2)";

const DROP_CHECK: &str = "\
    SELECT pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I', \
           $1::pg_catalog.regclass, $2)";

/// Types whose text form does not depend on session settings.
const AAD_TYPES: [&str; 6] = [
    "smallint",
    "integer",
    "bigint",
    "text",
    "character varying",
    "uuid",
];

/// Runs a DDL statement that `builder` (a `format()` query) spells out.
fn ddl(builder: &str, args: &[spi::Arg<'_>]) -> McResult<()> {
    let sql = spi::one::<String>(Mode::Read, builder, args)?
        .ok_or_else(|| McError::Internal("format() returned NULL".into()))?;
    spi::run(&sql, &[])
}

/// The table's name, after checking it is an ordinary or partitioned table
/// the caller owns.
fn owned_table(tbl: Regclass) -> McResult<String> {
    let row = spi::rows(Mode::Read, TABLE, &[tbl.0.into()], |r| {
        Ok((r.req::<String>(1)?, r.req::<bool>(2)?, r.req::<String>(3)?))
    })?;
    let Some((kind, owner, name)) = row.into_iter().next() else {
        return Err(McError::UndefinedTable {
            message: format!("relation with OID {} does not exist", tbl.0.to_u32()),
        });
    };
    if kind != "r" && kind != "p" {
        return Err(McError::bad_arg(format!("\"{name}\" is not a table")));
    }
    if !owner {
        return Err(McError::PermissionDenied {
            message: format!("must be owner of table {name}"),
            hint: "protect_column() and unprotect_column() are for the table's owner".into(),
        });
    }
    Ok(name)
}

/// The column's type name and whether it is generated.
fn column_type(tbl: Regclass, table: &str, col: &str) -> McResult<(String, bool)> {
    spi::rows(Mode::Read, COLUMN, &[tbl.0.into(), col.into()], |r| {
        Ok((r.req::<String>(1)?, r.req::<bool>(2)?))
    })?
    .into_iter()
    .next()
    .ok_or_else(|| McError::UndefinedColumn {
        message: format!("column \"{col}\" of table {table} does not exist"),
        hint: "name an existing column".into(),
    })
}

pub fn aad_type_error(col: &str) -> McError {
    McError::WrongType {
        message: format!("AAD column \"{col}\" has a type whose text form is not fixed"),
        hint: "use a smallint, integer, bigint, text, varchar or uuid column as AAD (the text of \
               timestamps, floats and bytea depends on session settings)"
            .into(),
    }
}

fn install_trigger(tbl: Regclass, existed: bool, specs: &[Fields]) -> McResult<()> {
    if existed {
        ddl(DROP_TRIGGER, &[tbl.0.into(), TRIGGER_NAME.into()])?;
    }
    if specs.is_empty() {
        return Ok(());
    }
    let flat: Vec<String> = specs.iter().flatten().cloned().collect();
    ddl(
        CREATE_TRIGGER,
        &[tbl.0.into(), TRIGGER_NAME.into(), flat.into()],
    )
}

/// The CHECK's name: `manna_crypt_protected_` and the column's name, cut to
/// PostgreSQL's identifier length at a character boundary.
fn check_name(col: &str) -> String {
    let mut name = format!("manna_crypt_protected_{col}");
    let mut n = name.len().min(63);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    name.truncate(n);
    name
}

fn has_constraint(tbl: Regclass, name: &str) -> McResult<bool> {
    Ok(
        spi::one::<bool>(Mode::Read, HAS_CONSTRAINT, &[tbl.0.into(), name.into()])?
            .unwrap_or(false),
    )
}

fn add_check(tbl: Regclass, table: &str, col: &str) -> McResult<()> {
    let name = check_name(col);
    if !has_constraint(tbl, &name)? {
        ddl(ADD_CHECK, &[tbl.0.into(), name.as_str().into(), col.into()])?;
    }
    let validated = subxact::attempt(|| ddl(VALIDATE_CHECK, &[tbl.0.into(), name.as_str().into()]));
    match validated {
        Ok(result) => result,
        Err(failed) if failed.code == pgrx::PgSqlErrorCode::ERRCODE_CHECK_VIOLATION => {
            report::notice(format!(
                "column \"{col}\" of table {table} still holds values that are not ciphertexts; \
                 new writes are encrypted from now on. Encrypt the rest with CALL \
                 manna_crypt.encrypt_column(...), then ALTER TABLE {table} VALIDATE CONSTRAINT \
                 \"{name}\""
            ));
            Ok(())
        }
        Err(failed) => Err(McError::WrongState {
            message: failed.message,
            detail: None,
            hint: None,
        }),
    }
}

/// A blind-index column to maintain: its name, normalization and bits.
struct IndexSpec<'a> {
    col: &'a str,
    normalize: &'a str,
    bits: i32,
}

/// Encrypts every value written to `tbl.col` under `keyring`, bound to the
/// row's `aad_column`, and keeps `blind_index_column` (bytea) set to its
/// blind-index term; see README "Protected columns" and "Blind indexes".
#[pg_extern(volatile, parallel_unsafe)]
fn protect_column(
    tbl: Option<Regclass>,
    col: Option<&str>,
    keyring: Option<&str>,
    aad_column: default!(Option<&str>, "NULL"),
    blind_index_column: default!(Option<&str>, "NULL"),
    normalization: default!(Option<&str>, "'none'"),
    bits: default!(Option<i32>, 256),
) {
    let tbl = not_null(tbl, "tbl");
    let col = not_null(col, "col");
    let keyring = not_null(keyring, "keyring");
    let index = blind_index_column
        .filter(|c| !c.is_empty())
        .map(|c| IndexSpec {
            col: c,
            normalize: not_null(normalization, "normalization"),
            bits: not_null(bits, "bits"),
        });
    let aad = aad_column.filter(|a| !a.is_empty());
    protect(tbl, col, keyring, aad, index).or_raise()
}

/// Checks a blind-index column: another bytea column, not generated.
fn check_index_column(
    tbl: Regclass,
    table: &str,
    col: &str,
    aad: Option<&str>,
    index: &IndexSpec<'_>,
) -> McResult<()> {
    TermShape::parse(index.normalize, index.bits)?;
    if index.col == col || Some(index.col) == aad {
        return Err(McError::bad_arg(
            "the blind-index column must be a column of its own",
        ));
    }
    let (ty, generated) = column_type(tbl, table, index.col)?;
    if ty != "bytea" || generated {
        return Err(McError::WrongType {
            message: format!(
                "blind-index column \"{}\" of table {table} must be a plain bytea column",
                index.col
            ),
            hint: format!("ALTER TABLE {table} ADD COLUMN {}_bidx bytea", col),
        });
    }
    Ok(())
}

fn protect(
    tbl: Regclass,
    col: &str,
    keyring: &str,
    aad: Option<&str>,
    index: Option<IndexSpec<'_>>,
) -> McResult<()> {
    let table = owned_table(tbl)?;
    let (ty, _) = column_type(tbl, &table, col)?;
    if ty != "text" {
        return Err(McError::WrongType {
            message: format!("column \"{col}\" of table {table} is {ty}, not text"),
            hint: if ty == "manna_crypt.encrypted_text" {
                "ALTER TABLE ... ALTER COLUMN ... TYPE text first (no table rewrite): the \
                 domain's CHECK would refuse plaintext before the trigger could encrypt it"
            } else {
                "a protected column is of type text"
            }
            .into(),
        });
    }
    if let Some(aad) = aad {
        if aad == col {
            return Err(McError::bad_arg("the AAD column must be another column"));
        }
        let (aad_ty, generated) = column_type(tbl, &table, aad)?;
        if generated {
            return Err(McError::bad_arg(format!(
                "AAD column \"{aad}\" is a generated column, which BEFORE triggers cannot see"
            )));
        }
        if !AAD_TYPES.contains(&aad_ty.as_str()) {
            return Err(aad_type_error(aad));
        }
    }
    let kind = run_as(Identity::ExtensionOwner, || {
        spi::one::<String>(Mode::Read, KEYRING_KIND, &[keyring.into()])
    })?;
    match kind.as_deref() {
        None => return Err(McError::unknown_keyring(keyring)),
        Some("gcm") => {}
        Some(_) => {
            return Err(McError::bad_arg(format!(
                "keyring \"{keyring}\" is a Fernet keyring, which cannot encrypt"
            )))
        }
    }
    if let Some(index) = &index {
        check_index_column(tbl, &table, col, aad, index)?;
    }
    let mut specs = current_specs(tbl)?;
    let existed = !specs.is_empty();
    let spec: Fields = [
        col.to_owned(),
        keyring.to_owned(),
        aad.unwrap_or("").to_owned(),
        index.as_ref().map_or("", |i| i.col).to_owned(),
        index.as_ref().map_or("", |i| i.normalize).to_owned(),
        index.as_ref().map_or(String::new(), |i| i.bits.to_string()),
    ];
    let changed = match specs.iter_mut().find(|s| s[0] == col) {
        Some(s) if *s == spec => false,
        Some(s) => {
            *s = spec;
            true
        }
        None => {
            specs.push(spec);
            true
        }
    };
    if changed {
        install_trigger(tbl, existed, &specs)?;
    }
    add_check(tbl, &table, col)?;
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || {
        usage::register(tbl.0, col)?;
        if let Some(index) = &index {
            // The index key is created with the first blind index, and the
            // column registered so the key cannot be retired under it.
            indexkeys::ensure(keyring, &role)?;
            usage::register_index_column(tbl.0, index.col)?;
        }
        audit(&role, "protect_column", &table, col, Some((keyring, aad)))
    })?;
    if let Some(index) = &index {
        notice_unindexed(tbl, &table, col, index)?;
    }
    Ok(())
}

/// Rows with a value and no term, or a term of another normalization or
/// truncation (the term's sixth byte and its length, see
/// `manna_crypt_core::blind`).
const UNINDEXED: &str = "\
    SELECT pg_catalog.format('SELECT EXISTS (SELECT FROM ONLY %s WHERE %I IS NOT NULL \
             AND (%I IS NULL OR pg_catalog.substr(%I, 6, 1) OPERATOR(pg_catalog.<>) %L::bytea \
                  OR pg_catalog.length(%I) OPERATOR(pg_catalog.<>) %s))', \
           $1::pg_catalog.regclass, $2, $3, $3, $4, $3, $5)";

/// Rows written before the index existed (or before its normalization or
/// truncation changed) have no current term: say how to fill it.
fn notice_unindexed(tbl: Regclass, table: &str, col: &str, index: &IndexSpec<'_>) -> McResult<()> {
    let shape = TermShape::parse(index.normalize, index.bits)?;
    let code = format!("\\x{:02x}", shape.normalize.code());
    let len = (blind::HEADER_LEN + shape.mac_len) as i32;
    let args = [
        tbl.0.into(),
        col.into(),
        index.col.into(),
        code.as_str().into(),
        len.into(),
    ];
    let sql = spi::one::<String>(Mode::Read, UNINDEXED, &args)?.unwrap_or_default();
    let index_col = index.col;
    if spi::one::<bool>(Mode::Read, &sql, &[])?.unwrap_or(false) {
        report::notice(format!(
            "rows of {table} written before now have no current blind-index term in \
             \"{index_col}\" and are not found by lookups yet: CALL \
             manna_crypt.backfill_blind_index('{table}', '{col}')"
        ));
    }
    Ok(())
}

fn audit(
    role: &str,
    event: &str,
    table: &str,
    col: &str,
    how: Option<(&str, Option<&str>)>,
) -> McResult<()> {
    let mut detail = json!({ "table": table, "column": col });
    if let Some((keyring, aad)) = how {
        detail["keyring"] = json!(keyring);
        detail["aad_column"] = json!(aad);
    }
    store::audit(role, event, None, None, detail)
}

/// Stops encrypting writes to `tbl.col`: removes it from the protect
/// trigger and drops its CHECK. Stored values stay as they are (and the
/// column stays registered, so its keys stay protected).
#[pg_extern(volatile, parallel_unsafe)]
fn unprotect_column(tbl: Option<Regclass>, col: Option<&str>) {
    let tbl = not_null(tbl, "tbl");
    let col = not_null(col, "col");
    unprotect(tbl, col).or_raise()
}

fn unprotect(tbl: Regclass, col: &str) -> McResult<()> {
    let table = owned_table(tbl)?;
    let mut specs = current_specs(tbl)?;
    let before = specs.len();
    specs.retain(|s| s[0] != col);
    if specs.len() != before {
        install_trigger(tbl, true, &specs)?;
    }
    let name = check_name(col);
    if has_constraint(tbl, &name)? {
        ddl(DROP_CHECK, &[tbl.0.into(), name.as_str().into()])?;
    }
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || {
        audit(&role, "unprotect_column", &table, col, None)
    })
}

/// The CHECK behind a protected column: true for NULL and well-formed
/// ciphertexts; anything else raises 23514 with a message of its own, never
/// PostgreSQL's "Failing row contains (...)", which would print the row —
/// the plaintext — to the client and the log. It fails only when the
/// trigger was bypassed (disabled, `session_replication_role = replica`).
#[pg_extern(immutable, parallel_safe)]
fn _protected_check(value: Option<&str>, col: Option<&str>) -> bool {
    let Some(value) = value else { return true };
    if manna_crypt_core::envelope::is_well_formed_text(value) {
        return true;
    }
    McError::CheckViolation {
        message: format!(
            "value for protected column \"{}\" is not a manna_crypt ciphertext",
            col.unwrap_or("?")
        ),
        detail: "the protect trigger did not encrypt it (disabled, or \
                 session_replication_role = replica)"
            .into(),
        hint: "write plaintext with the trigger enabled, or write mc1: ciphertexts".into(),
    }
    .raise()
}
