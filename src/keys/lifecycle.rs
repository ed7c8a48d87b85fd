//! The key lifecycle: create, rotate, revoke, reinstate, destroy, import
//! Fernet keys, re-wrap under a new root key, scheduled rotation, `info()`.
//!
//! These functions take names and ids, never key material (except
//! `import_fernet_key`, whose whole purpose is to receive a legacy key). Each
//! runs its catalog work as the extension owner (see [`super::owner`]) and
//! appends to `manna_crypt.audit_log` in the same transaction, so an event is
//! recorded exactly when it happens.

use manna_crypt_core::fernet::FernetKey;
use manna_crypt_core::keywrap;
use manna_crypt_core::nonce::NonceSource;
use manna_crypt_core::secret::Key32;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use super::cache::{self, Status};
use super::owner::{as_owner, caller, read_one};
use super::rootkey::{self, RootKey, Which};
use crate::error::{not_null, McError, McResult, OrRaise};

/// Keyring names: what a DBA types and what appears in logs. Lowercase
/// identifiers keep them unambiguous in SQL and free of anything secret-like.
pub fn check_name(name: &str) -> McResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(McError::BadArgument {
            message: "invalid keyring name".into(),
            detail: Some(format!("the name given is {} bytes long", name.len())),
            hint: Some("a keyring name is 1 to 63 characters: a lowercase letter, then lowercase letters, digits or underscores".into()),
        })
    }
}

/// Key changes are writes: on a hot standby, refuse them the way PostgreSQL
/// refuses any write there (SQLSTATE 25006), before the first catalog access
/// would fail with an internal error trying to assign a transaction id.
fn refuse_during_recovery(what: &std::ffi::CStr) {
    // SAFETY: raises a normal ERROR during recovery, otherwise does nothing.
    unsafe { pgrx::pg_sys::PreventCommandDuringRecovery(what.as_ptr()) }
}

/// The first column of the first row a writing statement returns, `None`
/// when it returns no row (`INSERT ... ON CONFLICT DO NOTHING RETURNING`,
/// an `UPDATE ... RETURNING` that matched nothing). `Spi::get_one_with_args`
/// reports "no row" as an error instead.
fn write_one<T: FromDatum + IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> McResult<Option<T>> {
    Spi::connect_mut(|client| {
        let rows = client.update(query, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(rows.first().get_one::<T>()?)
    })
}

pub fn audit(
    role: &str,
    event: &str,
    keyring: Option<&str>,
    key_id: Option<i32>,
    detail: Value,
) -> McResult<()> {
    Spi::run_with_args(
        "INSERT INTO manna_crypt.audit_log (role_name, event, keyring, key_id, detail) VALUES ($1, $2, $3, $4, $5)",
        &[role.into(), event.into(), keyring.into(), key_id.into(), JsonB(detail).into()],
    )?;
    Ok(())
}

/// The root key new data keys are wrapped under. The first time keys are
/// created, stores the root key's check value.
///
/// Holds a share lock on the check value row until commit, and
/// `rewrap_keys()` updates that row before it reads the keys: so a key
/// created concurrently with a root-key rotation is either seen (and
/// re-wrapped) by the rotation, or created after it, under the new root key.
fn root_for_new_keys() -> McResult<std::rc::Rc<RootKey>> {
    let root = cache::effective_root()?;
    Spi::run_with_args(
        "INSERT INTO manna_crypt.root_key_check (check_value, fingerprint) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[keywrap::check_value(&root.key).to_vec().into(), root.fingerprint.clone().into()],
    )?;
    let locked = write_one::<Vec<u8>>(
        "SELECT check_value FROM manna_crypt.root_key_check FOR SHARE",
        &[],
    )?
    .unwrap_or_default();
    if keywrap::matches_check_value(&root.key, &locked) {
        return Ok(root);
    }
    // A rewrap_keys() committed while we waited for the lock: the keys are
    // now under another root key. Look again with a fresh snapshot.
    cache::clear();
    let root = cache::effective_root()?;
    if keywrap::matches_check_value(&root.key, &locked) {
        Ok(root)
    } else {
        Err(McError::WrongState {
            message: "the root key changed during this transaction".into(),
            detail: Some("manna_crypt.rewrap_keys() ran concurrently".into()),
            hint: Some("retry the transaction".into()),
        })
    }
}

/// Generates, wraps and stores a new data key. Returns its key id.
fn insert_key(keyring_id: i32, version: i32, status: Status, key: &Key32) -> McResult<i32> {
    let root = root_for_new_keys()?;
    let key_id = Spi::get_one::<i32>("SELECT nextval('manna_crypt.key_id_seq')::int4")?
        .ok_or_else(|| McError::Internal("nextval returned null".into()))?;
    let wrapped = keywrap::wrap(&root.key, key_id as u32, key, &mut NonceSource::new());
    Spi::run_with_args(
        "INSERT INTO manna_crypt.data_keys (key_id, keyring_id, version, status, wrapped, root_fingerprint) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            key_id.into(),
            keyring_id.into(),
            version.into(),
            status.as_str().into(),
            wrapped.into(),
            root.fingerprint.clone().into(),
        ],
    )?;
    Ok(key_id)
}

fn keyring_row(name: &str) -> McResult<(i32, String)> {
    Spi::get_two_with_args::<i32, String>(
        "SELECT keyring_id, kind FROM manna_crypt.keyrings WHERE name = $1 FOR UPDATE",
        &[name.into()],
    )
    .ok()
    .and_then(|(id, kind)| Some((id?, kind?)))
    .ok_or_else(|| McError::UnknownObject {
        message: format!("keyring \"{name}\" does not exist"),
        hint: Some("see SELECT * FROM manna_crypt.keys".into()),
    })
}

fn next_version(keyring_id: i32) -> McResult<i32> {
    Ok(Spi::get_one_with_args::<i32>(
        "SELECT coalesce(max(version), 0) + 1 FROM manna_crypt.data_keys WHERE keyring_id = $1",
        &[keyring_id.into()],
    )?
    .unwrap_or(1))
}

/// Creates an AES-256-GCM keyring with its first, active key. Returns the key id.
#[pg_extern(volatile, parallel_unsafe)]
fn create_keyring(name: Option<&str>, rotation_period: default!(Option<Interval>, "NULL")) -> i32 {
    let name = not_null(name, "name");
    check_name(name).or_raise();
    refuse_during_recovery(c"manna_crypt.create_keyring()");
    let role = caller();
    as_owner(|| {
        let id = write_one::<i32>(
            "INSERT INTO manna_crypt.keyrings (name, kind, rotation_period, created_by) VALUES ($1, 'gcm', $2, $3) \
             ON CONFLICT (name) DO NOTHING RETURNING keyring_id",
            &[name.into(), rotation_period.into(), role.as_str().into()],
        )?
        .ok_or_else(|| McError::Duplicate(format!("keyring \"{name}\" already exists")))?;
        let key_id = insert_key(id, 1, Status::Active, &Key32::generate())?;
        let period = rotation_period.map(|p| p.to_string());
        audit(&role, "create_keyring", Some(name), Some(key_id), json!({ "version": 1, "rotation_period": period }))?;
        Ok(key_id)
    })
    .or_raise()
}

fn rotate(name: &str, role: &str, reason: &str) -> McResult<i32> {
    let (id, kind) = keyring_row(name)?;
    if kind != "gcm" {
        return Err(McError::BadArgument {
            message: format!("keyring \"{name}\" is a Fernet keyring and cannot be rotated"),
            detail: None,
            hint: Some(
                "add legacy keys with import_fernet_key(); new data belongs in an AES-GCM keyring"
                    .into(),
            ),
        });
    }
    let old = write_one::<i32>(
        "UPDATE manna_crypt.data_keys SET status = 'decrypt_only', status_changed_at = now() \
         WHERE keyring_id = $1 AND status = 'active' RETURNING key_id",
        &[id.into()],
    )?;
    let version = next_version(id)?;
    let key_id = insert_key(id, version, Status::Active, &Key32::generate())?;
    Spi::run_with_args(
        "UPDATE manna_crypt.keyrings SET rotated_at = now() WHERE keyring_id = $1",
        &[id.into()],
    )?;
    audit(
        role,
        "rotate_keyring",
        Some(name),
        Some(key_id),
        json!({ "version": version, "previous_key_id": old, "reason": reason }),
    )?;
    Ok(key_id)
}

/// Makes a new version the active one; the previous active version stays
/// readable (`decrypt_only`). Returns the new key id.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_keyring(name: &str) -> i32 {
    refuse_during_recovery(c"manna_crypt.rotate_keyring()");
    let role = caller();
    as_owner(|| rotate(name, &role, "manual")).or_raise()
}

/// Rotates every AES-GCM keyring whose rotation period has elapsed since its
/// last rotation (or creation). Meant for a scheduler such as pg_cron.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_due() -> TableIterator<'static, (name!(keyring, String), name!(key_id, i32))> {
    refuse_during_recovery(c"manna_crypt.rotate_due()");
    let role = caller();
    let rotated = as_owner(|| {
        let due: Vec<String> = Spi::connect(|client| {
            let rows = client.select(
                "SELECT name FROM manna_crypt.keyrings WHERE kind = 'gcm' AND rotation_period IS NOT NULL \
                 AND coalesce(rotated_at, created_at) + rotation_period <= now() ORDER BY name",
                None,
                &[],
            )?;
            rows.map(|r| r.get::<String>(1).map(|v| v.unwrap_or_default())).collect::<Result<Vec<_>, _>>()
        })?;
        due.into_iter().map(|name| rotate(&name, &role, "rotation period elapsed").map(|id| (name, id))).collect::<McResult<Vec<_>>>()
    })
    .or_raise();
    TableIterator::new(rotated)
}

/// Sets (or with NULL clears) a keyring's rotation period.
#[pg_extern(volatile, parallel_unsafe)]
fn set_rotation_period(keyring: Option<&str>, rotation_period: Option<Interval>) {
    let keyring = not_null(keyring, "keyring");
    refuse_during_recovery(c"manna_crypt.set_rotation_period()");
    let role = caller();
    as_owner(|| {
        let (id, _) = keyring_row(keyring)?;
        Spi::run_with_args(
            "UPDATE manna_crypt.keyrings SET rotation_period = $2 WHERE keyring_id = $1",
            &[id.into(), rotation_period.into()],
        )?;
        audit(
            &role,
            "set_rotation_period",
            Some(keyring),
            None,
            json!({ "rotation_period": rotation_period.map(|p| p.to_string()) }),
        )
    })
    .or_raise()
}

struct KeyRow {
    keyring: String,
    status: Status,
}

fn key_row(key_id: i32) -> McResult<KeyRow> {
    let (keyring, status) = Spi::get_two_with_args::<String, String>(
        "SELECT r.name, k.status FROM manna_crypt.data_keys k JOIN manna_crypt.keyrings r USING (keyring_id) \
         WHERE k.key_id = $1 FOR UPDATE OF k",
        &[key_id.into()],
    )
    .unwrap_or((None, None));
    match (keyring, status) {
        (Some(keyring), Some(status)) => Ok(KeyRow {
            keyring,
            status: Status::parse(&status),
        }),
        _ => Err(McError::UnknownObject {
            message: format!("key id {key_id} does not exist"),
            hint: Some("see SELECT * FROM manna_crypt.keys".into()),
        }),
    }
}

/// Refuses to retire a key that registered columns still use.
fn refuse_if_in_use(key_id: i32, action: &str, force: bool) -> McResult<()> {
    if force {
        return Ok(());
    }
    let users = crate::reencrypt::registry::key_usage(key_id)?;
    if users.is_empty() {
        return Ok(());
    }
    let list = users
        .iter()
        .map(|(c, n)| format!("{c}: {n} values"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(McError::WrongState {
        message: format!("key {key_id} is still used by registered columns"),
        detail: Some(list),
        hint: Some(format!("re-encrypt those columns first (CALL manna_crypt.rewrap_column(...)), or {action} with force => true")),
    })
}

/// Revokes a key: it can no longer encrypt or decrypt. Every session sees
/// this by its next transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn revoke_key(key_id: i32, force: default!(bool, false)) {
    refuse_during_recovery(c"manna_crypt.revoke_key()");
    let role = caller();
    // As the caller: counting reads user tables (see registry::key_usage).
    refuse_if_in_use(key_id, "revoke", force).or_raise();
    as_owner(|| {
        let row = key_row(key_id)?;
        match row.status {
            Status::Revoked => {
                notice!("key {key_id} is already revoked");
                return Ok(());
            }
            Status::Destroyed => {
                return Err(McError::WrongState { message: format!("key {key_id} is destroyed"), detail: None, hint: None })
            }
            _ => {}
        }
        Spi::run_with_args(
            "UPDATE manna_crypt.data_keys SET status = 'revoked', status_changed_at = now() WHERE key_id = $1",
            &[key_id.into()],
        )?;
        audit(&role, "revoke_key", Some(&row.keyring), Some(key_id), json!({ "previous_status": row.status.as_str(), "forced": force }))
    })
    .or_raise()
}

/// Undoes a revocation: the key becomes `decrypt_only` again.
#[pg_extern(volatile, parallel_unsafe)]
fn reinstate_key(key_id: i32) {
    refuse_during_recovery(c"manna_crypt.reinstate_key()");
    let role = caller();
    as_owner(|| {
        let row = key_row(key_id)?;
        if row.status != Status::Revoked {
            return Err(McError::WrongState {
                message: format!("key {key_id} is {}, not revoked", row.status.as_str()),
                detail: None,
                hint: None,
            });
        }
        Spi::run_with_args(
            "UPDATE manna_crypt.data_keys SET status = 'decrypt_only', status_changed_at = now() WHERE key_id = $1",
            &[key_id.into()],
        )?;
        audit(&role, "reinstate_key", Some(&row.keyring), Some(key_id), json!({}))
    })
    .or_raise()
}

/// Crypto-shredding: wipes a revoked key's wrapped material. Irreversible.
#[pg_extern(volatile, parallel_unsafe)]
fn destroy_key(key_id: i32, force: default!(bool, false)) {
    refuse_during_recovery(c"manna_crypt.destroy_key()");
    let role = caller();
    // As the caller: counting reads user tables (see registry::key_usage).
    refuse_if_in_use(key_id, "destroy", force).or_raise();
    as_owner(|| {
        let row = key_row(key_id)?;
        match row.status {
            Status::Destroyed => {
                notice!("key {key_id} is already destroyed");
                return Ok(());
            }
            Status::Revoked => {}
            other => {
                return Err(McError::WrongState {
                    message: format!("key {key_id} is {}; only a revoked key can be destroyed", other.as_str()),
                    detail: None,
                    hint: Some(format!("SELECT manna_crypt.revoke_key({key_id}) first")),
                })
            }
        }
        Spi::run_with_args(
            "UPDATE manna_crypt.data_keys SET status = 'destroyed', wrapped = NULL, status_changed_at = now() WHERE key_id = $1",
            &[key_id.into()],
        )?;
        audit(&role, "destroy_key", Some(&row.keyring), Some(key_id), json!({ "forced": force }))
    })
    .or_raise()
}

/// Imports a legacy Fernet key (44-character base64url) into a Fernet
/// keyring, creating the keyring if needed. Returns the key id. Keys are
/// tried newest first when reading tokens.
#[pg_extern(volatile, parallel_unsafe)]
fn import_fernet_key(keyring: &str, fernet_key: &str) -> i32 {
    check_name(keyring).or_raise();
    let key = FernetKey::parse(fernet_key)
        .ok_or_else(|| McError::BadArgument {
            message: "invalid Fernet key".into(),
            detail: Some("a Fernet key is 32 bytes in URL-safe base64 (44 characters)".into()),
            hint: None,
        })
        .or_raise();
    refuse_during_recovery(c"manna_crypt.import_fernet_key()");
    let role = caller();
    as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO manna_crypt.keyrings (name, kind, created_by) VALUES ($1, 'fernet', $2) ON CONFLICT (name) DO NOTHING",
            &[keyring.into(), role.as_str().into()],
        )?;
        let (id, kind) = keyring_row(keyring)?;
        if kind != "fernet" {
            return Err(McError::BadArgument {
                message: format!("keyring \"{keyring}\" is an AES-GCM keyring"),
                detail: None,
                hint: Some("import Fernet keys into a keyring of their own, e.g. legacy_fernet".into()),
            });
        }
        // Importing the same key twice is a no-op, not a second version.
        if let Ok(existing) = cache::fernet_keys(keyring) {
            if let Some((dup, _)) = existing.iter().find(|(_, k)| k.as_key32().as_bytes() == key.as_key32().as_bytes()) {
                notice!("this Fernet key is already in keyring \"{keyring}\" as key {dup}");
                return Ok(*dup as i32);
            }
        }
        let version = next_version(id)?;
        let key_id = insert_key(id, version, Status::DecryptOnly, key.as_key32())?;
        audit(&role, "import_fernet_key", Some(keyring), Some(key_id), json!({ "version": version }))?;
        Ok(key_id)
    })
    .or_raise()
}

/// Root-key rotation: re-wraps every data key, now under the previous root
/// key, under the current one. No encrypted row is touched. Returns the
/// number of keys re-wrapped (0 when they already are under the current key).
#[pg_extern(volatile, parallel_unsafe)]
fn rewrap_keys() -> i32 {
    refuse_during_recovery(c"manna_crypt.rewrap_keys()");
    let role = caller();
    as_owner(|| {
        let current = rootkey::current()?;
        let from = cache::effective_root()?;
        if from.fingerprint == current.fingerprint {
            notice!("all data keys are already wrapped under the current root key ({})", current.fingerprint);
            return Ok(0);
        }
        // The check value first: this row lock orders us after any
        // transaction that is creating a key (see root_for_new_keys), so the
        // select below sees its key.
        Spi::run_with_args(
            "UPDATE manna_crypt.root_key_check SET check_value = $1, fingerprint = $2, created_at = now()",
            &[keywrap::check_value(&current.key).to_vec().into(), current.fingerprint.clone().into()],
        )?;
        // `update`, not `select`: a read-only SPI query cannot lock rows, and
        // SPI runs read-only until the transaction has a transaction id.
        let rows: Vec<(i32, Vec<u8>)> = Spi::connect_mut(|client| {
            let rows = client.update(
                "SELECT key_id, wrapped FROM manna_crypt.data_keys WHERE wrapped IS NOT NULL ORDER BY key_id FOR UPDATE",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in rows {
                out.push((r.get::<i32>(1)?.unwrap_or_default(), r.get::<Vec<u8>>(2)?.unwrap_or_default()));
            }
            Ok::<_, McError>(out)
        })?;
        let mut nonces = NonceSource::new();
        for (key_id, wrapped) in &rows {
            let key = keywrap::unwrap(&from.key, *key_id as u32, wrapped).map_err(|_| McError::Unauthenticated {
                detail: format!("the stored data key {key_id} does not unwrap under the previous root key"),
            })?;
            let rewrapped = keywrap::wrap(&current.key, *key_id as u32, &key, &mut nonces);
            Spi::run_with_args(
                "UPDATE manna_crypt.data_keys SET wrapped = $2, root_fingerprint = $3 WHERE key_id = $1",
                &[(*key_id).into(), rewrapped.into(), current.fingerprint.clone().into()],
            )?;
        }
        audit(&role, "rewrap_keys", None, None, json!({ "from_root": from.fingerprint, "to_root": current.fingerprint, "keys": rows.len() }))?;
        cache::clear();
        Ok(rows.len() as i32)
    })
    .or_raise()
}

fn root_info() -> Value {
    let current = match rootkey::current() {
        Ok(k) => k,
        Err(e) => return json!({ "configured": false, "error": error_text(e) }),
    };
    let previous = rootkey::get(Which::Previous).ok().flatten();
    let effective = as_owner(cache::effective_root);
    json!({
        "configured": true,
        "source": current.source,
        "fingerprint": current.fingerprint,
        "previous_configured": previous.is_some(),
        "matches_stored_keys": matches!(&effective, Ok(e) if e.fingerprint == current.fingerprint),
        "rotation_pending": matches!(&effective, Ok(e) if e.fingerprint != current.fingerprint),
        "error": effective.err().map(error_text),
    })
}

fn error_text(e: McError) -> String {
    match e {
        McError::RootKeyMissing { message, .. } | McError::RootKeyIo { message, .. } => message,
        McError::RootKeyMismatch { .. } => "root key does not match".into(),
        other => format!("{other:?}"),
    }
}

/// Version, root key source and fingerprint (never the key), keyrings and
/// their active versions, key counts by status, and CPU AES support.
#[pg_extern(stable, parallel_unsafe)]
fn info() -> JsonB {
    let tables = as_owner(|| {
        let keyrings = read_one::<JsonB>(
            "SELECT coalesce(jsonb_agg(jsonb_build_object(
                 'name', r.name, 'kind', r.kind,
                 'active_key_id', a.key_id, 'active_version', a.version,
                 'versions', (SELECT count(*) FROM manna_crypt.data_keys k WHERE k.keyring_id = r.keyring_id),
                 'rotation_period', r.rotation_period::text,
                 'rotation_due', r.rotation_period IS NOT NULL AND coalesce(r.rotated_at, r.created_at) + r.rotation_period <= now()
               ) ORDER BY r.name), '[]')
             FROM manna_crypt.keyrings r
             LEFT JOIN manna_crypt.data_keys a ON a.keyring_id = r.keyring_id AND a.status = 'active'",
        )?
        .map(|j| j.0)
        .unwrap_or(Value::Null);
        let by_status = read_one::<JsonB>(
            "SELECT jsonb_build_object(
                'active', count(*) FILTER (WHERE status = 'active'),
                'decrypt_only', count(*) FILTER (WHERE status = 'decrypt_only'),
                'revoked', count(*) FILTER (WHERE status = 'revoked'),
                'destroyed', count(*) FILTER (WHERE status = 'destroyed'))
             FROM manna_crypt.data_keys",
        )?
        .map(|j| j.0)
        .unwrap_or(Value::Null);
        let registered = read_one::<i64>("SELECT count(*) FROM manna_crypt.registered_columns")?.unwrap_or(0);
        Ok::<_, McError>((keyrings, by_status, registered))
    })
    .or_raise();
    JsonB(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "root_key": root_info(),
        "keyrings": tables.0,
        "keys_by_status": tables.1,
        "registered_columns": tables.2,
        "cpu": cpu_features(),
    }))
}

fn cpu_features() -> Value {
    #[cfg(target_arch = "x86_64")]
    {
        json!({ "arch": "x86_64", "aes": std::arch::is_x86_feature_detected!("aes"), "pclmulqdq": std::arch::is_x86_feature_detected!("pclmulqdq") })
    }
    #[cfg(target_arch = "aarch64")]
    {
        json!({ "arch": "aarch64", "aes": std::arch::is_aarch64_feature_detected!("aes"), "pmull": std::arch::is_aarch64_feature_detected!("pmull") })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        json!({ "arch": std::env::consts::ARCH, "aes": false })
    }
}
