//! Registered columns: the text columns that hold manna_crypt ciphertexts,
//! and how many values under a given key they hold.
//!
//! A column is registered explicitly with `register_column()`, and
//! automatically by every re-encryption procedure run on it; a column whose
//! type is `encrypted_text` (or a domain over it) declares itself and counts
//! as registered without asking. Before a key is revoked or destroyed, every
//! such column is scanned for values under that key — ciphertexts naming
//! its key id, or, for a Fernet key, tokens its HMAC verifies — and while
//! any remain the operation is refused unless forced.
//!
//! The scan runs as the extension owner, who must be a superuser: it then
//! runs no code of any table owner's (superusers bypass row-level security,
//! `row_security = off`, and the query calls only manna_crypt's and
//! pg_catalog's functions on text), and an administrator who cannot read a
//! registered table is not blocked by it. Each leaf table is read `ONLY`
//! (partitions and inheritance children are enumerated); foreign tables and
//! other sessions' temporary tables are skipped. Each scanned table is
//! locked in SHARE mode until the revocation commits, so no writer can
//! store a value under the key between the count and the revocation.

use pgrx::prelude::*;
use serde_json::json;

use std::cell::RefCell;

use manna_crypt_core::fernet::{FernetKey, Token};
use manna_crypt_core::keywrap::KeyKind;

use super::{cache, store};
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::datum::Regclass;
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::spi::{self, Mode};

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

const TABLE_NAME: &str = "SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = $1";

const CAN_SELECT: &str = "SELECT has_table_privilege($1, 'SELECT')";

const REGISTERED_COUNT: &str = "SELECT count(*) FROM manna_crypt.registered_columns";

const OWNER_IS_SUPERUSER: &str = "\
    SELECT r.rolsuper FROM pg_catalog.pg_extension e \
      JOIN pg_catalog.pg_roles r ON r.oid = e.extowner WHERE e.extname = 'manna_crypt'";

/// Every (leaf table, column) that may hold ciphertexts, quoted: registered
/// columns and every column of type encrypted_text or a domain over it, in
/// the tables themselves and all their partitions and inheritance children;
/// only tables with storage (relkind 'r'), not other sessions' temp tables.
const KEY_COLUMNS: &str = "\
    WITH RECURSIVE enc(t) AS ( \
        SELECT 'manna_crypt.encrypted_text'::pg_catalog.regtype::pg_catalog.oid \
        UNION SELECT ty.oid FROM pg_catalog.pg_type ty JOIN enc ON ty.typbasetype = enc.t \
         WHERE ty.typtype = 'd'), \
    cols(rel, col) AS ( \
        SELECT c.tbl::pg_catalog.oid, c.col FROM manna_crypt.registered_columns c \
        UNION SELECT a.attrelid, a.attname FROM pg_catalog.pg_attribute a \
          JOIN enc ON a.atttypid = enc.t WHERE a.attnum > 0 AND NOT a.attisdropped), \
    tree(rel, col) AS ( \
        SELECT rel, col FROM cols \
        UNION SELECT i.inhrelid, t.col FROM tree t \
          JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel) \
    SELECT DISTINCT pg_catalog.format('%I.%I', n.nspname, r.relname), \
           pg_catalog.quote_ident(t.col) \
      FROM tree t \
      JOIN pg_catalog.pg_class r ON r.oid = t.rel AND r.relkind = 'r' \
      JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace \
      JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attname = t.col \
       AND a.attnum > 0 AND NOT a.attisdropped \
       AND {types} \
     WHERE r.relpersistence <> 't' OR r.relnamespace = pg_catalog.pg_my_temp_schema() \
     ORDER BY 1, 2";

/// The column types [`KEY_COLUMNS`] looks at for data keys.
const TEXT_TYPES: &str = "\
    (a.atttypid IN ('text'::pg_catalog.regtype, 'varchar'::pg_catalog.regtype) \
     OR a.atttypid IN (SELECT enc.t FROM enc))";

/// ... and for blind-index keys: the registered blind-index columns.
const INDEX_TYPES: &str = "a.atttypid = 'bytea'::pg_catalog.regtype";

/// Counts one blind-index column's terms under one index key: $1 is the
/// terms' first bytes (format and key id, see `manna_crypt_core::blind`).
const COUNT_INDEX: &str = "\
    SELECT pg_catalog.count(*) FROM ONLY {tbl} \
     WHERE pg_catalog.substr({col}, 1, 5) OPERATOR(pg_catalog.=) $1";

/// Counts one column's values under one AES-GCM key; `{tbl}` and `{col}`
/// come from [`KEY_COLUMNS`], already quoted.
const COUNT_GCM: &str = "\
    SELECT pg_catalog.count(*) FROM ONLY {tbl} \
     WHERE manna_crypt.is_encrypted({col}::pg_catalog.text) \
       AND manna_crypt.key_id({col}::pg_catalog.text) OPERATOR(pg_catalog.=) $1";

/// Counts one column's Fernet tokens that the probed key signed.
const COUNT_FERNET: &str = "\
    SELECT pg_catalog.count(*) FROM ONLY {tbl} \
     WHERE {col}::pg_catalog.text OPERATOR(pg_catalog.~~) 'gAAAAA%' \
       AND manna_crypt._fernet_key_signed({col}::pg_catalog.text)";

const LOCK_SHARE: &str = "LOCK TABLE ONLY {tbl} IN SHARE MODE";

thread_local! {
    /// The Fernet key whose tokens `_fernet_key_signed` looks for.
    static PROBE: RefCell<Option<FernetKey>> = const { RefCell::new(None) };
}

/// Per token of a Fernet key's usage count: whether the probed key signed
/// it. Refuses outside that count.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _fernet_key_signed(token: &str) -> bool {
    PROBE.with(|p| match p.borrow().as_ref() {
        Some(key) => Token::parse(token).is_ok_and(|t| t.signed_by(key)),
        None => McError::PermissionDenied {
            message: "manna_crypt._fernet_key_signed() is internal to manna_crypt".into(),
            hint: "it serves revoke_key() and destroy_key()".into(),
        }
        .raise(),
    })
}

/// The count for one column, with the probe (if any) in place.
fn count_column(tbl: &str, col: &str, key_id: i32, kind: KeyKind) -> McResult<i64> {
    let fill = |sql: &str| sql.replace("{tbl}", tbl).replace("{col}", col);
    spi::run(&fill(LOCK_SHARE), &[])?;
    let n = match kind {
        KeyKind::Fernet => spi::one::<i64>(Mode::Write, &fill(COUNT_FERNET), &[])?,
        KeyKind::Gcm => {
            spi::one::<i64>(Mode::Write, &fill(COUNT_GCM), &[i64::from(key_id).into()])?
        }
        KeyKind::Index => {
            let mut prefix = vec![manna_crypt_core::blind::FORMAT_V1];
            prefix.extend_from_slice(&(key_id as u32).to_be_bytes());
            spi::one::<i64>(Mode::Write, &fill(COUNT_INDEX), &[prefix.into()])?
        }
    };
    Ok(n.unwrap_or(0))
}

/// (column as `table.column`, number of values) for each column that still
/// holds values under `key_id` (see the module comment for how and as whom).
pub fn key_usage(key_id: i32) -> McResult<Vec<(String, i64)>> {
    run_as(Identity::ExtensionOwner, || {
        if !spi::one::<bool>(Mode::Read, OWNER_IS_SUPERUSER, &[])?.unwrap_or(false) {
            return Err(McError::WrongState {
                message: "cannot count the values under the key safely".into(),
                detail: Some(
                    "the extension's owner is no longer a superuser, so counting would run \
                     table owners' row-level security policies"
                        .into(),
                ),
                hint: Some("restore the owner's superuser attribute, or pass force => true".into()),
            });
        }
        let Some(key) = store::key_by_id(key_id as u32)? else {
            return Ok(Vec::new());
        };
        let probe = match (key.kind, cache::material(key_id as u32)?) {
            (KeyKind::Fernet, Some((KeyKind::Fernet, material))) => {
                Some(FernetKey::from_key32(material))
            }
            // A destroyed Fernet key opens nothing any more.
            (KeyKind::Fernet, _) => return Ok(Vec::new()),
            _ => None,
        };
        struct Unprobe;
        impl Drop for Unprobe {
            fn drop(&mut self) {
                PROBE.with(|p| p.borrow_mut().take());
            }
        }
        let _unprobe = Unprobe;
        PROBE.with(|p| *p.borrow_mut() = probe);
        let types = match key.kind {
            KeyKind::Index => INDEX_TYPES,
            _ => TEXT_TYPES,
        };
        let columns = spi::rows(
            Mode::Read,
            &KEY_COLUMNS.replace("{types}", types),
            &[],
            |r| Ok((r.req::<String>(1)?, r.req::<String>(2)?)),
        )?;
        let mut users = Vec::new();
        for (tbl, col) in columns {
            let n = count_column(&tbl, &col, key_id, key.kind)?;
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

/// Records that `tbl.col` holds blind-index terms (a `bytea` column, checked
/// by the caller), so the index keys they use cannot be retired under them.
/// Must run as the extension owner.
pub fn register_index_column(tbl: pg_sys::Oid, col: &str) -> McResult<()> {
    spi::run(REGISTER, &[tbl.into(), col.into()])
}

/// The table's name as SQL, or 42P01 for the OID of a dropped table.
fn table_name(tbl: Regclass) -> McResult<String> {
    spi::one::<String>(Mode::Read, TABLE_NAME, &[tbl.0.into()])?.ok_or_else(|| {
        McError::UndefinedTable {
            message: format!("relation with OID {} does not exist", tbl.0.to_u32()),
        }
    })
}

/// Tells manna_crypt that a column holds ciphertexts, so keys it uses are
/// protected from revocation and destruction.
#[pg_extern(volatile, parallel_unsafe)]
fn register_column(tbl: Option<Regclass>, col: Option<&str>) {
    let tbl = not_null(tbl, "tbl");
    let col = not_null(col, "col");
    let name = table_name(tbl).or_raise();
    // Checked as the caller: registering a table is a claim about its
    // contents, which only someone who can read it may make.
    let readable = spi::one::<bool>(Mode::Read, CAN_SELECT, &[tbl.0.into()])
        .or_raise()
        .unwrap_or(false);
    if !readable {
        McError::PermissionDenied {
            message: format!("permission denied for table {name}"),
            hint: "register only tables you can read".into(),
        }
        .raise();
    }
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || {
        register(tbl.0, col)?;
        audit_column(&role, "register_column", &name, col)
    })
    .or_raise()
}

/// Forgets a registered column.
#[pg_extern(volatile, parallel_unsafe)]
fn unregister_column(tbl: Option<Regclass>, col: Option<&str>) {
    let tbl = not_null(tbl, "tbl");
    let col = not_null(col, "col");
    let role = caller_name();
    let name = table_name(tbl).or_raise();
    run_as(Identity::ExtensionOwner, || {
        spi::run(UNREGISTER, &[tbl.0.into(), col.into()])?;
        audit_column(&role, "unregister_column", &name, col)
    })
    .or_raise()
}

fn audit_column(role: &str, event: &str, table: &str, col: &str) -> McResult<()> {
    store::audit(
        role,
        event,
        None,
        None,
        json!({ "table": table, "column": col }),
    )
}

/// For an index key: a session whose snapshot (or transaction) is older
/// than the keyring's latest index-key rotation may still see this key as
/// the active one and write terms under it after it is retired — the count
/// of rows under the key cannot see those writes coming. $1 is the key.
const OLDER_SNAPSHOT: &str = "\
    SELECT a.pid FROM pg_catalog.pg_stat_activity a, manna_crypt.data_keys k \
     WHERE k.key_id = (SELECT max(n.key_id) FROM manna_crypt.data_keys o \
                         JOIN manna_crypt.data_keys n USING (keyring_id) \
                        WHERE o.key_id = $1 AND n.purpose = 'index') \
       AND k.purpose = 'index' AND k.key_id <> $1 \
       AND a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid() \
       AND GREATEST(pg_catalog.age(a.backend_xmin), pg_catalog.age(a.backend_xid)) \
           OPERATOR(pg_catalog.>=) pg_catalog.age(k.xmin) \
     LIMIT 1";

/// Refuses to retire an index key while a session that may not have seen
/// the rotation away from it is still running (see [`OLDER_SNAPSHOT`]).
/// Nothing for data keys. Must run as the extension owner (who reads every
/// session's `backend_xmin`).
pub fn refuse_while_older_snapshots(key_id: i32, action: &str) -> McResult<()> {
    let Some(pid) = spi::one::<i32>(Mode::Write, OLDER_SNAPSHOT, &[key_id.into()])? else {
        return Ok(());
    };
    Err(McError::WrongState {
        message: format!(
            "a transaction older than the rotation away from index key {key_id} is still running"
        ),
        detail: Some(format!(
            "backend {pid} may still see key {key_id} as the active index key and write terms \
             under it after it is retired"
        )),
        hint: Some(format!(
            "wait for that transaction to end, then {action} again (or pass force => true)"
        )),
    })
}
