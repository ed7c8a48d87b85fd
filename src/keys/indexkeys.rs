//! Blind-index keys: their own kind of key in a keyring (README "Blind
//! indexes"). Each AES-GCM keyring has at most one *active* index key,
//! which computes new terms; older versions stay `decrypt_only` — for an
//! index key that means "still matched by lookups, no longer used for new
//! terms" — until every row is backfilled under the active one, and then
//! can be revoked and destroyed like any key (refused while a registered
//! blind-index column still holds terms under it, see [`super::usage`]).
//!
//! Index keys are random keys of their own, wrapped under the root key with
//! kind `i` bound into the wrap: a data key never indexes and an index key
//! never decrypts (the key cache refuses it). `rotate_keyring()` and
//! `rotate_due()` rotate data keys only: an index key's rotation makes every
//! stored term old, so it is a planned step with a backfill, never a timer's.

use manna_crypt_core::keywrap::KeyKind;
use manna_crypt_core::secret::Key32;
use pgrx::prelude::*;
use serde_json::json;

use super::lifecycle::key_change;
use super::store::{self, Purpose, Status};
use super::wrapping::{insert_key, NewVersion};
use crate::error::{not_null, McError, McResult};

fn refuse_fernet(name: &str) -> McError {
    McError::bad_arg(format!(
        "keyring \"{name}\" is a Fernet keyring, which has no blind-index keys"
    ))
}

/// Makes a new index key the active one (the first, if the keyring has
/// none); the previous active one stays matched by lookups. Returns the new
/// key id. Must run as the extension owner.
pub fn rotate(name: &str, role: &str) -> McResult<i32> {
    let ring = store::lock_ring(name)?;
    if ring.fernet {
        return Err(refuse_fernet(name));
    }
    let old = store::retire_active(ring.keyring_id, Purpose::Index)?;
    let version = store::next_version(ring.keyring_id, Purpose::Index)?;
    let new = NewVersion {
        keyring_id: ring.keyring_id,
        keyring: name,
        kind: KeyKind::Index,
        version,
        status: Status::Active,
    };
    let key_id = insert_key(new, &Key32::generate())?;
    store::audit(
        role,
        "rotate_index_key",
        Some(name),
        Some(key_id),
        json!({ "version": version, "previous_key_id": old }),
    )?;
    Ok(key_id)
}

/// The keyring's active index key, created if it has none yet (for
/// `protect_column(..., blind_index_column => ...)`). Must run as the
/// extension owner.
pub fn ensure(name: &str, role: &str) -> McResult<i32> {
    let ring = store::lock_ring(name)?;
    if ring.fernet {
        return Err(refuse_fernet(name));
    }
    match store::active_key_id(ring.keyring_id, Purpose::Index)? {
        Some(id) => Ok(id),
        None => rotate(name, role),
    }
}

/// Creates a new active blind-index key for a keyring (its first, or the
/// next version); the previous one keeps matching lookups until it is
/// revoked. Returns the new key id.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_index_key(keyring: Option<&str>) -> i32 {
    let keyring = not_null(keyring, "keyring");
    key_change(c"manna_crypt.rotate_index_key()", |role| {
        rotate(keyring, role)
    })
}
