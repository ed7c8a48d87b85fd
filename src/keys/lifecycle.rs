//! The key lifecycle: create, rotate, revoke, reinstate, destroy, import
//! Fernet keys, scheduled rotation.
//!
//! These functions take names and ids, never key material (except
//! `import_fernet_key`, whose whole purpose is to receive a legacy key). Each
//! runs its catalog work as the extension owner (see [`crate::pg::security`])
//! and appends to `manna_crypt.audit_log` in the same transaction, so an
//! event is recorded exactly when it happens.

use manna_crypt_core::fernet::FernetKey;
use manna_crypt_core::keywrap::KeyKind;
use manna_crypt_core::names::check_keyring_name;
use manna_crypt_core::secret::Key32;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use serde_json::json;

use super::budget;
use super::cache;
use super::store::{self, KeyLock, Purpose, Status};
use super::usage;
use super::wrapping::{insert_key, NewVersion};
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::report::notice;
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::xact::refuse_during_recovery;

/// Runs a key change as the extension owner, after refusing it on a standby.
/// `f` gets the calling role's name for the audit row.
pub(super) fn key_change<T>(what: &std::ffi::CStr, f: impl FnOnce(&str) -> McResult<T>) -> T {
    refuse_during_recovery(what);
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || f(&role)).or_raise()
}

/// 0.1.0's `create_keyring(name, rotation_period)`, kept as a symbol only: a
/// 0.1.0 catalog served by this library (before `ALTER EXTENSION manna_crypt
/// UPDATE`) calls it, and it works as it did. SQL gets
/// [`create_keyring_if_not_exists`] under the same name.
#[pg_extern(sql = false)]
fn create_keyring(name: Option<&str>, rotation_period: default!(Option<Interval>, "NULL")) -> i32 {
    create(name, rotation_period, false)
}

/// Creates an AES-256-GCM keyring with its first, active key. Returns the
/// key id. With `if_not_exists`, an existing AES-GCM keyring of that name is
/// left as it is (its rotation period included) and its active key id is
/// returned, so a migration that is run again can create its keyring; a
/// Fernet keyring of that name is still an error (42710).
#[pg_extern(name = "create_keyring", volatile, parallel_unsafe)]
fn create_keyring_if_not_exists(
    name: Option<&str>,
    rotation_period: default!(Option<Interval>, "NULL"),
    if_not_exists: default!(Option<bool>, "false"),
) -> i32 {
    create(
        name,
        rotation_period,
        not_null(if_not_exists, "if_not_exists"),
    )
}

fn create(name: Option<&str>, rotation_period: Option<Interval>, if_not_exists: bool) -> i32 {
    let name = not_null(name, "name");
    check_keyring_name(name).or_raise();
    check_period(rotation_period).or_raise();
    key_change(c"manna_crypt.create_keyring()", |role| {
        let Some(id) = store::insert_gcm_ring(name, rotation_period, role)? else {
            return existing(name, if_not_exists);
        };
        let version = NewVersion {
            keyring_id: id,
            keyring: name,
            kind: KeyKind::Gcm,
            version: 1,
            status: Status::Active,
        };
        let key_id = insert_key(version, &Key32::generate())?;
        let period = rotation_period.map(|p| p.to_string());
        store::audit(
            role,
            "create_keyring",
            Some(name),
            Some(key_id),
            json!({ "version": 1, "rotation_period": period }),
        )?;
        Ok(key_id)
    })
}

/// `create_keyring` of a name that is taken: 42710, or with `if_not_exists`
/// the active key id of the AES-GCM keyring (nothing is changed or
/// audited; a NOTICE says so, as PostgreSQL's own IF NOT EXISTS does).
fn existing(name: &str, if_not_exists: bool) -> McResult<i32> {
    let exists = || McError::Duplicate(format!("keyring \"{name}\" already exists"));
    if !if_not_exists {
        return Err(exists());
    }
    let ring = store::lock_ring(name)?;
    if ring.fernet {
        return Err(McError::Duplicate(format!(
            "keyring \"{name}\" already exists as a Fernet keyring"
        )));
    }
    let key_id = store::active_key_id(ring.keyring_id, Purpose::Data)?.ok_or_else(|| {
        McError::WrongState {
            message: format!("keyring \"{name}\" has no active key"),
            detail: None,
            hint: Some(format!(
                "make one with manna_crypt.rotate_keyring('{name}')"
            )),
        }
    })?;
    notice(format!("keyring \"{name}\" already exists, skipping"));
    Ok(key_id)
}

/// The longest rotation period: past it, `coalesce(rotated_at, created_at) +
/// rotation_period` overflows timestamptz (22008) for every keyring in
/// `rotate_due()` and `info()`, and a scheduled rotation silently stops.
const MAX_PERIOD_DAYS: i128 = 100 * 366;

/// A rotation period is positive and at most a century.
fn check_period(period: Option<Interval>) -> McResult<()> {
    let Some(p) = period else {
        return Ok(());
    };
    // i128: months and days of an absurd interval overflow i64 microseconds.
    const DAY: i128 = 86_400_000_000;
    let micros =
        i128::from(p.months()) * 30 * DAY + i128::from(p.days()) * DAY + i128::from(p.micros());
    let (positive, days) = (micros > 0, micros / DAY);
    if positive && days <= MAX_PERIOD_DAYS {
        return Ok(());
    }
    Err(McError::BadArgument {
        message: "rotation_period must be positive and at most 100 years".into(),
        detail: Some(format!("rotation_period is {p}")),
        hint: None,
    })
}

fn rotate(name: &str, role: &str, reason: &str) -> McResult<i32> {
    let ring = store::lock_ring(name)?;
    if ring.fernet {
        return Err(McError::BadArgument {
            message: format!("keyring \"{name}\" is a Fernet keyring and cannot be rotated"),
            detail: None,
            hint: Some(
                "add legacy keys with import_fernet_key(); new data belongs in an AES-GCM keyring"
                    .into(),
            ),
        });
    }
    let old = store::retire_active(ring.keyring_id, Purpose::Data)?;
    let version = store::next_version(ring.keyring_id, Purpose::Data)?;
    let new = NewVersion {
        keyring_id: ring.keyring_id,
        keyring: name,
        kind: KeyKind::Gcm,
        version,
        status: Status::Active,
    };
    let key_id = insert_key(new, &Key32::generate())?;
    store::mark_rotated(ring.keyring_id)?;
    store::audit(
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
fn rotate_keyring(name: Option<&str>) -> i32 {
    let name = not_null(name, "name");
    key_change(c"manna_crypt.rotate_keyring()", |role| {
        rotate(name, role, "manual")
    })
}

/// Rotates every AES-GCM keyring whose rotation period has elapsed since its
/// last rotation (or creation), or whose active key is past the warning
/// fraction of its nonce budget (see [`super::budget`]). Meant for a
/// scheduler such as pg_cron.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_due() -> TableIterator<'static, (name!(keyring, String), name!(key_id, i32))> {
    let rotated = key_change(c"manna_crypt.rotate_due()", |role| {
        let mut due: Vec<(String, String)> = store::due_rings()?
            .into_iter()
            .map(|name| (name, "rotation period elapsed".to_owned()))
            .collect();
        for (name, count) in budget::past_warning(&store::active_gcm_keys()?)? {
            if !due.iter().any(|(n, _)| *n == name) {
                due.push((name, format!("nonce budget: {count} encryptions")));
            }
        }
        due.sort();
        due.into_iter()
            .map(|(name, why)| rotate(&name, role, &why).map(|id| (name, id)))
            .collect::<McResult<Vec<_>>>()
    });
    TableIterator::new(rotated)
}

/// Sets (or with NULL clears) a keyring's rotation period.
#[pg_extern(volatile, parallel_unsafe)]
fn set_rotation_period(keyring: Option<&str>, rotation_period: Option<Interval>) {
    let keyring = not_null(keyring, "keyring");
    check_period(rotation_period).or_raise();
    key_change(c"manna_crypt.set_rotation_period()", |role| {
        let ring = store::lock_ring(keyring)?;
        store::set_period(ring.keyring_id, rotation_period)?;
        store::audit(
            role,
            "set_rotation_period",
            Some(keyring),
            None,
            json!({ "rotation_period": rotation_period.map(|p| p.to_string()) }),
        )
    })
}

/// Refuses to retire a key that registered columns still use.
fn refuse_if_in_use(key_id: i32, action: &str, force: bool) -> McResult<()> {
    if force {
        return Ok(());
    }
    let users = usage::key_usage(key_id)?;
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
        hint: Some(format!(
            "re-encrypt those columns first (CALL manna_crypt.rewrap_column(...); a \
             blind-index column: CALL manna_crypt.backfill_blind_index(...)), \
             or {action} with force => true"
        )),
    })
}

/// Retires a key (revoke or destroy): refused on a standby, and while
/// columns still hold values under it unless forced (see usage::key_usage:
/// the count locks those tables against writers until commit); then
/// `change` gets the role and the key, its row locked.
fn retire(
    what: &std::ffi::CStr,
    key_id: i32,
    action: &str,
    force: bool,
    change: impl FnOnce(&str, KeyLock) -> McResult<()>,
) {
    refuse_during_recovery(what);
    refuse_if_in_use(key_id, action, force).or_raise();
    if !force {
        run_as(Identity::ExtensionOwner, || {
            usage::refuse_while_older_snapshots(key_id, action)
        })
        .or_raise();
    }
    key_change(what, |role| change(role, store::lock_key(key_id)?))
}

/// Revokes a key: it can no longer encrypt or decrypt. Every session sees
/// this by its next transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn revoke_key(key_id: Option<i32>, force: default!(Option<bool>, false)) {
    let (key_id, force) = (not_null(key_id, "key_id"), not_null(force, "force"));
    retire(
        c"manna_crypt.revoke_key()",
        key_id,
        "revoke",
        force,
        |role, key| {
            match key.status {
                Status::Revoked => {
                    notice(format!("key {key_id} is already revoked"));
                    return Ok(());
                }
                Status::Destroyed => {
                    return Err(McError::WrongState {
                        message: format!("key {key_id} is destroyed"),
                        detail: None,
                        hint: None,
                    })
                }
                _ => {}
            }
            store::set_status(key_id, Status::Revoked)?;
            store::audit(
                role,
                "revoke_key",
                Some(&key.keyring),
                Some(key_id),
                json!({ "previous_status": key.status.as_str(), "forced": force }),
            )
        },
    )
}

/// Undoes a revocation: the key becomes `decrypt_only` again.
#[pg_extern(volatile, parallel_unsafe)]
fn reinstate_key(key_id: Option<i32>) {
    let key_id = not_null(key_id, "key_id");
    key_change(c"manna_crypt.reinstate_key()", |role| {
        let key = store::lock_key(key_id)?;
        if key.status != Status::Revoked {
            return Err(McError::WrongState {
                message: format!("key {key_id} is {}, not revoked", key.status.as_str()),
                detail: None,
                hint: None,
            });
        }
        store::set_status(key_id, Status::DecryptOnly)?;
        store::audit(
            role,
            "reinstate_key",
            Some(&key.keyring),
            Some(key_id),
            json!({}),
        )
    })
}

/// Crypto-shredding: wipes a revoked key's wrapped material. Irreversible.
#[pg_extern(volatile, parallel_unsafe)]
fn destroy_key(key_id: Option<i32>, force: default!(Option<bool>, false)) {
    let (key_id, force) = (not_null(key_id, "key_id"), not_null(force, "force"));
    retire(
        c"manna_crypt.destroy_key()",
        key_id,
        "destroy",
        force,
        |role, key| {
            match key.status {
                Status::Destroyed => {
                    notice(format!("key {key_id} is already destroyed"));
                    return Ok(());
                }
                Status::Revoked => {}
                other => {
                    return Err(McError::WrongState {
                        message: format!(
                            "key {key_id} is {}; only a revoked key can be destroyed",
                            other.as_str()
                        ),
                        detail: None,
                        hint: Some(format!("SELECT manna_crypt.revoke_key({key_id}) first")),
                    })
                }
            }
            store::shred(key_id)?;
            store::audit(
                role,
                "destroy_key",
                Some(&key.keyring),
                Some(key_id),
                json!({ "forced": force }),
            )
        },
    )
}

/// Imports a legacy Fernet key (44-character base64url) into a Fernet
/// keyring, creating the keyring if needed. Returns the key id. Keys are
/// tried newest first when reading tokens.
#[pg_extern(volatile, parallel_unsafe)]
fn import_fernet_key(keyring: Option<&str>, fernet_key: Option<&str>) -> i32 {
    let keyring = not_null(keyring, "keyring");
    let fernet_key = not_null(fernet_key, "fernet_key");
    check_keyring_name(keyring).or_raise();
    let key = FernetKey::parse(fernet_key)
        .ok_or_else(|| McError::BadArgument {
            message: "invalid Fernet key".into(),
            detail: Some("a Fernet key is 32 bytes in URL-safe base64 (44 characters)".into()),
            hint: None,
        })
        .or_raise();
    key_change(c"manna_crypt.import_fernet_key()", |role| {
        import_fernet(keyring, &key, role)
    })
}

pub(super) fn import_fernet(keyring: &str, key: &FernetKey, role: &str) -> McResult<i32> {
    store::ensure_fernet_ring(keyring, role)?;
    let ring = store::lock_ring(keyring)?;
    if !ring.fernet {
        return Err(McError::BadArgument {
            message: format!("keyring \"{keyring}\" is an AES-GCM keyring"),
            detail: None,
            hint: Some("import Fernet keys into a keyring of their own, e.g. legacy_fernet".into()),
        });
    }
    // Importing the same key twice is a no-op, not a second version.
    if let Ok(existing) = cache::fernet_keys(keyring) {
        let same = |k: &FernetKey| k.as_key32().as_bytes() == key.as_key32().as_bytes();
        if let Some((dup, _)) = existing.iter().find(|(_, k)| same(k)) {
            notice(format!(
                "this Fernet key is already in keyring \"{keyring}\" as key {dup}"
            ));
            return Ok(*dup as i32);
        }
    }
    let version = store::next_version(ring.keyring_id, Purpose::Data)?;
    let new = NewVersion {
        keyring_id: ring.keyring_id,
        keyring,
        kind: KeyKind::Fernet,
        version,
        status: Status::DecryptOnly,
    };
    let key_id = insert_key(new, key.as_key32())?;
    store::audit(
        role,
        "import_fernet_key",
        Some(keyring),
        Some(key_id),
        json!({ "version": version }),
    )?;
    Ok(key_id)
}
