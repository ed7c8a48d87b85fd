//! Data keys under the root key: wrapping a new key, and re-wrapping every
//! key under a new root key (`rewrap_keys()`, root-key rotation; it also
//! rewrites 0.1.0's version-1 wraps in the current format).
//!
//! The two are ordered by the `root_key_check` row: creating a key holds a
//! share lock on it until commit, and `rewrap_keys()` updates it before it
//! reads the keys. So a key created concurrently with a root-key rotation is
//! either seen (and re-wrapped) by the rotation, or created after it, under
//! the new root key.

use std::rc::Rc;

use manna_crypt_core::keywrap::{self, KeyKind, Slot};
use manna_crypt_core::nonce::NonceSource;
use manna_crypt_core::secret::Key32;
use pgrx::prelude::*;
use serde_json::json;

use super::cache;
use super::rootkey::{self, RootKey};
use super::rootstatus;
use super::store::{self, NewKey, Purpose, Status};
use crate::error::{McError, McResult, OrRaise};
use crate::pg::report::notice;
use crate::pg::security::{caller_name, run_as, Identity};
use crate::pg::xact::refuse_during_recovery;

/// The root key new data keys are wrapped under. The first time keys are
/// created, stores the root key's check value; then share-locks it.
fn root_for_new_keys() -> McResult<Rc<RootKey>> {
    let root = rootkey::effective_root()?;
    store::insert_check(&keywrap::check_value(&root.key), &root.fingerprint)?;
    rootstatus::note_database(Some(&root.fingerprint));
    let locked = store::lock_check()?;
    match &locked {
        Some(check) if !keywrap::matches_check_value(&root.key, &check.check_value) => {
            // A rewrap_keys() committed while we waited for the lock: the
            // keys are now under another root key. Decide again against the
            // value we now hold locked.
            cache::clear();
            rootkey::root_for_check(Some(check))
        }
        _ => Ok(root),
    }
}

/// A new version of a keyring.
pub struct NewVersion<'a> {
    pub keyring_id: i32,
    pub keyring: &'a str,
    pub kind: KeyKind,
    pub version: i32,
    pub status: Status,
}

/// Wraps and stores `key` as a new version of a keyring. Returns its key id.
/// Must run as the extension owner.
pub fn insert_key(v: NewVersion<'_>, key: &Key32) -> McResult<i32> {
    let root = root_for_new_keys()?;
    let key_id = store::next_key_id()?;
    let slot = Slot {
        key_id: key_id as u32,
        kind: v.kind,
        keyring: v.keyring,
    };
    let wrapped = keywrap::wrap(&root.key, &slot, key, &mut NonceSource::new());
    store::insert_key(NewKey {
        key_id,
        keyring_id: v.keyring_id,
        version: v.version,
        status: v.status,
        wrapped,
        root_fingerprint: &root.fingerprint,
        purpose: if v.kind == KeyKind::Index {
            Purpose::Index
        } else {
            Purpose::Data
        },
    })?;
    Ok(key_id)
}

/// Root-key rotation: re-wraps every data key, now under the previous root
/// key, under the current one. No encrypted row is touched. Returns the
/// number of keys re-wrapped (0 when they already are under the current key).
#[pg_extern(volatile, parallel_unsafe)]
fn rewrap_keys() -> i32 {
    refuse_during_recovery(c"manna_crypt.rewrap_keys()");
    let role = caller_name();
    run_as(Identity::ExtensionOwner, || rewrap_all(&role)).or_raise()
}

fn rewrap_all(role: &str) -> McResult<i32> {
    let current = rootkey::current()?;
    let from = rootkey::effective_root()?;
    let root_changes = from.fingerprint != current.fingerprint;
    if root_changes {
        // The check value first: this row lock orders us after any
        // transaction that is creating a key (see root_for_new_keys), so
        // the select below sees its key.
        store::replace_check(&keywrap::check_value(&current.key), &current.fingerprint)?;
        rootstatus::note_database(Some(&current.fingerprint));
    }
    // Under an unchanged root key, only 0.1.0's version-1 wraps are
    // rewritten, in the current format that binds keyring and kind.
    let rows: Vec<_> = store::lock_all_wrapped()?
        .into_iter()
        .filter(|r| root_changes || !keywrap::is_current(&r.wrapped))
        .collect();
    if rows.is_empty() {
        notice(format!(
            "all data keys are already wrapped under the current root key ({})",
            current.fingerprint
        ));
        return Ok(0);
    }
    let mut nonces = NonceSource::new();
    for row in &rows {
        let slot = Slot {
            key_id: row.key_id as u32,
            kind: row.kind,
            keyring: &row.keyring,
        };
        let key = keywrap::unwrap(&from.key, &slot, &row.wrapped).map_err(|_| {
            McError::Unauthenticated {
                detail: format!(
                    "the stored data key {} does not unwrap under the {} root key",
                    row.key_id,
                    if root_changes { "previous" } else { "current" }
                ),
            }
        })?;
        let rewrapped = keywrap::wrap(&current.key, &slot, &key, &mut nonces);
        store::set_wrapped(row.key_id, &rewrapped, &current.fingerprint)?;
    }
    store::audit(
        role,
        "rewrap_keys",
        None,
        None,
        json!({
            "from_root": from.fingerprint,
            "to_root": current.fingerprint,
            "keys": rows.len(),
        }),
    )?;
    cache::clear();
    Ok(rows.len() as i32)
}
