//! Every statement on the key tables (`keyrings`, `data_keys`,
//! `root_key_check`, `audit_log`), each a named constant, and the typed rows
//! they return. Callers decide whose rights these run with (normally the
//! extension owner's, see [`crate::pg::security`]); nothing here switches.
//!
//! Reads that serve the key cache use the read-only SPI path (they run in
//! parallel workers and on standbys); everything a lifecycle function reads
//! while it writes uses the read-write path, so it sees its own writes.
//!
//! Wrapped keys and check values reach the statements through
//! [`super::staged`], never as statement text or parameters.

use pgrx::datum::Interval;
use pgrx::pg_sys;
use pgrx::JsonB;

use manna_crypt_core::keywrap::KeyKind;
use manna_crypt_core::names::check_keyring_name;

use super::staged::{run_with_secret, with_last};
use crate::error::{McError, McResult};
use crate::pg::spi::{self, Mode};

/// A key version's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Active,
    DecryptOnly,
    Revoked,
    Destroyed,
}

impl Status {
    /// The column value; the table's CHECK allows exactly these four.
    pub fn parse(s: &str) -> Status {
        match s {
            "active" => Status::Active,
            "decrypt_only" => Status::DecryptOnly,
            "revoked" => Status::Revoked,
            _ => Status::Destroyed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::DecryptOnly => "decrypt_only",
            Status::Revoked => "revoked",
            Status::Destroyed => "destroyed",
        }
    }
}

// ---- reads for the key cache (read-only) ---------------------------------

const DATA_KEYS_OID: &str = "SELECT 'manna_crypt.data_keys'::pg_catalog.regclass::pg_catalog.oid";

const STORED_CHECK: &str = "SELECT check_value, fingerprint FROM manna_crypt.root_key_check";

/// How the queries spell a key's [`KeyKind`] (its code).
const KIND: &str = "\
    CASE WHEN {purpose} = 'index' THEN 'i' WHEN r.kind = 'fernet' THEN 'f' ELSE 'g' END";

/// A key's purpose (`k` being its data_keys row). 0.1.0's catalog has no
/// purpose column, and between a library upgrade and `ALTER EXTENSION
/// UPDATE` this library serves it: there every key is a data key. Read as a
/// field of the whole row, the column is optional.
const PURPOSE: &str = "\
    coalesce(pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'purpose', 'data')";

/// A statement with `{kind}` and `{purpose}` spelled out.
fn sql(statement: &str) -> String {
    statement
        .replace("{kind}", KIND)
        .replace("{purpose}", PURPOSE)
}

const KEY_BY_ID: &str = "\
    SELECT r.name, {kind}, k.status, k.wrapped, r.keyring_id \
      FROM manna_crypt.data_keys k JOIN manna_crypt.keyrings r USING (keyring_id) \
     WHERE k.key_id = $1";

const RING_BY_NAME: &str = "\
    SELECT r.kind, k.key_id::int8, k.status, k.wrapped, r.keyring_id \
      FROM manna_crypt.keyrings r \
      LEFT JOIN manna_crypt.data_keys k ON k.keyring_id = r.keyring_id \
           AND k.status IN ('active', 'decrypt_only') \
           AND {purpose} = $2 \
     WHERE r.name = $1 ORDER BY k.version DESC";

const RING_KEY_IDS: &str = "\
    SELECT k.key_id FROM manna_crypt.data_keys k JOIN manna_crypt.keyrings r USING (keyring_id) \
     WHERE r.name = $1";

/// The OID of `manna_crypt.data_keys` in this database.
pub fn data_keys_oid() -> McResult<pg_sys::Oid> {
    spi::one::<pg_sys::Oid>(Mode::Read, DATA_KEYS_OID, &[])?
        .ok_or_else(|| McError::Internal("manna_crypt.data_keys is missing".into()))
}

/// The stored root-key check value and the fingerprint of its root key.
pub struct StoredCheck {
    pub check_value: Vec<u8>,
    pub fingerprint: String,
}

pub fn stored_check() -> McResult<Option<StoredCheck>> {
    let rows = spi::rows(Mode::Read, STORED_CHECK, &[], check_row)?;
    Ok(rows.into_iter().next())
}

fn check_row(r: &spi::Row) -> McResult<StoredCheck> {
    Ok(StoredCheck {
        check_value: r.req(1)?,
        fingerprint: r.req(2)?,
    })
}

/// A data key as the cache needs it.
pub struct KeyRow {
    pub keyring: String,
    pub keyring_id: u32,
    pub kind: KeyKind,
    pub status: Status,
    pub wrapped: Option<Vec<u8>>,
}

pub fn key_by_id(key_id: u32) -> McResult<Option<KeyRow>> {
    let rows = spi::rows(
        Mode::Read,
        &sql(KEY_BY_ID),
        &[i64::from(key_id).into()],
        |r| {
            Ok(KeyRow {
                keyring: r.req(1)?,
                kind: kind(&r.req::<String>(2)?)?,
                status: Status::parse(&r.req::<String>(3)?),
                wrapped: r.get(4)?,
                keyring_id: r.req::<i32>(5)? as u32,
            })
        },
    )?;
    Ok(rows.into_iter().next())
}

fn kind(code: &str) -> McResult<KeyKind> {
    KeyKind::from_code(code).ok_or_else(|| McError::Internal(format!("unknown key kind {code}")))
}

/// Which keys of a keyring: its data keys or its blind-index keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Data,
    Index,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Data => "data",
            Purpose::Index => "index",
        }
    }
}

/// A keyring's usable keys (active and decrypt_only), newest first.
pub struct RingRows {
    pub keyring_id: u32,
    pub fernet: bool,
    /// (key id, status, wrapped key); empty when the keyring has none.
    pub keys: Vec<(u32, Status, Vec<u8>)>,
}

/// `None` when the keyring does not exist.
pub fn ring_by_name(name: &str, purpose: Purpose) -> McResult<Option<RingRows>> {
    type Raw = (String, Option<i64>, Option<String>, Option<Vec<u8>>, i32);
    let args = [name.into(), purpose.as_str().into()];
    let raw: Vec<Raw> = spi::rows(Mode::Read, &sql(RING_BY_NAME), &args, |r| {
        Ok((r.req(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.req(5)?))
    })?;
    let Some(first) = raw.first() else {
        return Ok(None);
    };
    let (fernet, keyring_id) = (first.0 == "fernet", first.4 as u32);
    let keys = raw
        .into_iter()
        .filter_map(|(_, id, status, wrapped, _)| {
            Some((id? as u32, Status::parse(&status?), wrapped?))
        })
        .collect();
    Ok(Some(RingRows {
        keyring_id,
        fernet,
        keys,
    }))
}

/// Every key id a keyring ever had.
pub fn ring_key_ids(name: &str) -> McResult<Vec<u32>> {
    spi::rows(Mode::Read, RING_KEY_IDS, &[name.into()], |r| {
        Ok(r.req::<i32>(1)? as u32)
    })
}

// ---- lifecycle (read-write) ----------------------------------------------

const INSERT_CHECK: &str = "\
    INSERT INTO manna_crypt.root_key_check (check_value, fingerprint) \
    VALUES (manna_crypt._staged_secret(), $1) \
    ON CONFLICT DO NOTHING";

const LOCK_CHECK: &str = "\
    SELECT check_value, fingerprint FROM manna_crypt.root_key_check FOR SHARE";

const REPLACE_CHECK: &str = "\
    UPDATE manna_crypt.root_key_check \
       SET check_value = manna_crypt._staged_secret(), fingerprint = $1, created_at = now()";

const NEXT_KEY_ID: &str = "SELECT nextval('manna_crypt.key_id_seq')::int4";

/// A data key is inserted without naming `purpose` (its default), so that
/// this works on 0.1.0's catalog too (see [`PURPOSE`]).
const INSERT_KEY: &str = "\
    INSERT INTO manna_crypt.data_keys \
           (key_id, keyring_id, version, status, wrapped, root_fingerprint) \
    VALUES ($1, $2, $3, $4, manna_crypt._staged_secret(), $5)";

const INSERT_INDEX_KEY: &str = "\
    INSERT INTO manna_crypt.data_keys \
           (key_id, keyring_id, version, status, wrapped, root_fingerprint, purpose) \
    VALUES ($1, $2, $3, $4, manna_crypt._staged_secret(), $5, 'index')";

const INSERT_GCM_RING: &str = "\
    INSERT INTO manna_crypt.keyrings (name, kind, rotation_period, created_by) \
    VALUES ($1, 'gcm', $2, $3) \
    ON CONFLICT (name) DO NOTHING RETURNING keyring_id";

const INSERT_FERNET_RING: &str = "\
    INSERT INTO manna_crypt.keyrings (name, kind, created_by) VALUES ($1, 'fernet', $2) \
    ON CONFLICT (name) DO NOTHING";

const LOCK_RING: &str = "\
    SELECT keyring_id, kind FROM manna_crypt.keyrings WHERE name = $1 FOR UPDATE";

const ACTIVE_KEY_ID: &str = "\
    SELECT k.key_id FROM manna_crypt.data_keys k \
     WHERE k.keyring_id = $1 AND k.status = 'active' AND {purpose} = $2";

const NEXT_VERSION: &str = "\
    SELECT coalesce(max(k.version), 0) + 1 FROM manna_crypt.data_keys k \
     WHERE k.keyring_id = $1 AND {purpose} = $2";

const RETIRE_ACTIVE: &str = "\
    UPDATE manna_crypt.data_keys k SET status = 'decrypt_only', status_changed_at = now() \
     WHERE k.keyring_id = $1 AND k.status = 'active' AND {purpose} = $2 RETURNING k.key_id";

const MARK_ROTATED: &str =
    "UPDATE manna_crypt.keyrings SET rotated_at = now() WHERE keyring_id = $1";

const DUE_RINGS: &str = "\
    SELECT name FROM manna_crypt.keyrings \
     WHERE kind = 'gcm' AND rotation_period IS NOT NULL \
       AND coalesce(rotated_at, created_at) + rotation_period <= now() \
     ORDER BY name";

const ACTIVE_GCM_KEYS: &str = "\
    SELECT r.name, k.key_id FROM manna_crypt.keyrings r \
      JOIN manna_crypt.data_keys k USING (keyring_id) \
     WHERE r.kind = 'gcm' AND k.status = 'active' AND {purpose} = 'data' \
     ORDER BY r.name";

const SET_PERIOD: &str =
    "UPDATE manna_crypt.keyrings SET rotation_period = $2 WHERE keyring_id = $1";

const LOCK_KEY: &str = "\
    SELECT r.name, k.status \
      FROM manna_crypt.data_keys k JOIN manna_crypt.keyrings r USING (keyring_id) \
     WHERE k.key_id = $1 FOR UPDATE OF k";

const SET_STATUS: &str = "\
    UPDATE manna_crypt.data_keys SET status = $2, status_changed_at = now() WHERE key_id = $1";

const SHRED: &str = "\
    UPDATE manna_crypt.data_keys \
       SET status = 'destroyed', wrapped = NULL, status_changed_at = now() \
     WHERE key_id = $1";

// `Write`, not `Read`: a read-only statement cannot lock rows.
const LOCK_ALL_WRAPPED: &str = "\
    SELECT k.key_id, r.name, {kind}, k.wrapped \
      FROM manna_crypt.data_keys k JOIN manna_crypt.keyrings r USING (keyring_id) \
     WHERE k.wrapped IS NOT NULL ORDER BY k.key_id FOR UPDATE OF k";

const SET_WRAPPED: &str = "\
    UPDATE manna_crypt.data_keys \
       SET wrapped = manna_crypt._staged_secret(), root_fingerprint = $2 WHERE key_id = $1";

const AUDIT: &str = "\
    INSERT INTO manna_crypt.audit_log (role_name, event, keyring, key_id, detail) \
    VALUES ($1, $2, $3, $4, $5)";

/// Stores the check value unless one is stored already.
pub fn insert_check(check_value: &[u8], fingerprint: &str) -> McResult<()> {
    run_with_secret(INSERT_CHECK, check_value, |s| {
        with_last(vec![fingerprint.into()], s)
    })
}

/// The stored check value, share-locked until commit.
pub fn lock_check() -> McResult<Option<StoredCheck>> {
    let rows = spi::rows(Mode::Write, LOCK_CHECK, &[], check_row)?;
    Ok(rows.into_iter().next())
}

pub fn replace_check(check_value: &[u8], fingerprint: &str) -> McResult<()> {
    run_with_secret(REPLACE_CHECK, check_value, |s| {
        with_last(vec![fingerprint.into()], s)
    })
}

pub fn next_key_id() -> McResult<i32> {
    spi::one::<i32>(Mode::Write, NEXT_KEY_ID, &[])?
        .ok_or_else(|| McError::Internal("nextval returned null".into()))
}

pub struct NewKey<'a> {
    pub key_id: i32,
    pub keyring_id: i32,
    pub version: i32,
    pub status: Status,
    pub wrapped: Vec<u8>,
    pub root_fingerprint: &'a str,
    pub purpose: Purpose,
}

pub fn insert_key(k: NewKey<'_>) -> McResult<()> {
    let statement = match k.purpose {
        Purpose::Data => INSERT_KEY,
        Purpose::Index => INSERT_INDEX_KEY,
    };
    run_with_secret(statement, &k.wrapped, |s| {
        let args = vec![
            k.key_id.into(),
            k.keyring_id.into(),
            k.version.into(),
            k.status.as_str().into(),
            k.root_fingerprint.into(),
        ];
        with_last(args, s)
    })
}

/// The new keyring's id, or `None` when the name is taken.
pub fn insert_gcm_ring(
    name: &str,
    rotation_period: Option<Interval>,
    created_by: &str,
) -> McResult<Option<i32>> {
    spi::one::<i32>(
        Mode::Write,
        INSERT_GCM_RING,
        &[name.into(), rotation_period.into(), created_by.into()],
    )
}

/// Creates a Fernet keyring unless the name is taken (by either kind).
pub fn ensure_fernet_ring(name: &str, created_by: &str) -> McResult<()> {
    spi::run(INSERT_FERNET_RING, &[name.into(), created_by.into()])
}

/// A keyring, locked until commit.
pub struct RingLock {
    pub keyring_id: i32,
    pub fernet: bool,
}

pub fn lock_ring(name: &str) -> McResult<RingLock> {
    // An invalid name is 22023, never echoed back as an unknown keyring.
    check_keyring_name(name)?;
    spi::rows(Mode::Write, LOCK_RING, &[name.into()], |r| {
        Ok(RingLock {
            keyring_id: r.req(1)?,
            fernet: r.req::<String>(2)? == "fernet",
        })
    })?
    .into_iter()
    .next()
    .ok_or_else(|| McError::unknown_keyring(name))
}

/// The keyring's active key id of that purpose, if it has one.
pub fn active_key_id(keyring_id: i32, purpose: Purpose) -> McResult<Option<i32>> {
    let args = [keyring_id.into(), purpose.as_str().into()];
    spi::one::<i32>(Mode::Write, &sql(ACTIVE_KEY_ID), &args)
}

pub fn next_version(keyring_id: i32, purpose: Purpose) -> McResult<i32> {
    let args = [keyring_id.into(), purpose.as_str().into()];
    Ok(spi::one::<i32>(Mode::Write, &sql(NEXT_VERSION), &args)?.unwrap_or(1))
}

/// Makes the active key of that purpose `decrypt_only` (for an index key:
/// still matched by lookups, no longer used for new terms); returns its
/// id, if there was one.
pub fn retire_active(keyring_id: i32, purpose: Purpose) -> McResult<Option<i32>> {
    let args = [keyring_id.into(), purpose.as_str().into()];
    spi::one::<i32>(Mode::Write, &sql(RETIRE_ACTIVE), &args)
}

pub fn mark_rotated(keyring_id: i32) -> McResult<()> {
    spi::run(MARK_ROTATED, &[keyring_id.into()])
}

/// AES-GCM keyrings whose rotation period has elapsed, by name.
pub fn due_rings() -> McResult<Vec<String>> {
    spi::rows(Mode::Write, DUE_RINGS, &[], |r| r.req(1))
}

/// Every AES-GCM keyring with its active key's id.
pub fn active_gcm_keys() -> McResult<Vec<(String, i32)>> {
    spi::rows(Mode::Read, &sql(ACTIVE_GCM_KEYS), &[], |r| {
        Ok((r.req(1)?, r.req(2)?))
    })
}

pub fn set_period(keyring_id: i32, period: Option<Interval>) -> McResult<()> {
    spi::run(SET_PERIOD, &[keyring_id.into(), period.into()])
}

/// A key and its keyring's name, the key row locked until commit.
pub struct KeyLock {
    pub keyring: String,
    pub status: Status,
}

pub fn lock_key(key_id: i32) -> McResult<KeyLock> {
    spi::rows(Mode::Write, LOCK_KEY, &[key_id.into()], |r| {
        Ok(KeyLock {
            keyring: r.req(1)?,
            status: Status::parse(&r.req::<String>(2)?),
        })
    })?
    .into_iter()
    .next()
    .ok_or_else(|| McError::unknown_key(key_id.into()))
}

pub fn set_status(key_id: i32, status: Status) -> McResult<()> {
    spi::run(SET_STATUS, &[key_id.into(), status.as_str().into()])
}

/// Crypto-shredding: the wrapped key is wiped from the row.
pub fn shred(key_id: i32) -> McResult<()> {
    spi::run(SHRED, &[key_id.into()])
}

/// A stored wrapped key with what its wrap is bound to.
pub struct WrappedRow {
    pub key_id: i32,
    pub keyring: String,
    pub kind: KeyKind,
    pub wrapped: Vec<u8>,
}

/// Every wrapped key, locked until commit.
pub fn lock_all_wrapped() -> McResult<Vec<WrappedRow>> {
    spi::rows(Mode::Write, &sql(LOCK_ALL_WRAPPED), &[], |r| {
        Ok(WrappedRow {
            key_id: r.req(1)?,
            keyring: r.req(2)?,
            kind: kind(&r.req::<String>(3)?)?,
            wrapped: r.req(4)?,
        })
    })
}

pub fn set_wrapped(key_id: i32, wrapped: &[u8], root_fingerprint: &str) -> McResult<()> {
    run_with_secret(SET_WRAPPED, wrapped, |s| {
        with_last(vec![key_id.into(), root_fingerprint.into()], s)
    })
}

/// Appends to the audit log, in the caller's transaction.
pub fn audit(
    role: &str,
    event: &str,
    keyring: Option<&str>,
    key_id: Option<i32>,
    detail: serde_json::Value,
) -> McResult<()> {
    spi::run(
        AUDIT,
        &[
            role.into(),
            event.into(),
            keyring.into(),
            key_id.into(),
            JsonB(detail).into(),
        ],
    )
}
