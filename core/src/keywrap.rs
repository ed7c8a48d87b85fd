//! Data keys wrapped under the root key (envelope encryption), and the root
//! key's check value and fingerprint.
//!
//! Wrapped form, version 2 (written since 0.2.0):
//! `0x02 ‖ nonce(12) ‖ AES-256-GCM(root, data key) ‖ tag(16)`, with
//! associated data `"manna_crypt/data-key/v2" ‖ key_id (u32 BE) ‖ kind (1
//! byte: 'g' AES-GCM, 'f' Fernet) ‖ len(keyring) (1 byte) ‖ keyring`. A
//! wrapped key moved to another row — another key id, another keyring, or
//! from a Fernet keyring into an AES-GCM one — no longer unwraps.
//!
//! Version 1 (0.1.0): `0x01 ‖ nonce ‖ ciphertext ‖ tag` with associated data
//! `envelope header(key id 0) ‖ "manna_crypt/data-key/v1" ‖ key_id`: it
//! bound the key id only, behind a constant header that was an accident of
//! reusing the envelope sealer. A 0.1.0 dump restored into 0.2.0 brings
//! version-1 wraps, so they are read for good; `rewrap_keys()` rewrites
//! them as version 2.
//!
//! The check value is HMAC-SHA256(root, "manna_crypt/root-key-check/v1"): a
//! PRF output, so storing it reveals nothing about the root key, yet a wrong
//! root key is recognised as such instead of surfacing later as a vague
//! decryption failure. The fingerprint shown by `info()` is a different PRF
//! output, truncated, so it cannot be compared against the stored check value.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::aead::{self, AuthError, Cipher};
use crate::nonce::NonceSource;
use crate::secret::Key32;

const V1: u8 = 0x01;
const V2: u8 = 0x02;
const V1_AAD_LABEL: &[u8] = b"manna_crypt/data-key/v1";
const V2_AAD_LABEL: &[u8] = b"manna_crypt/data-key/v2";
/// Both versions have the same length: version byte, nonce, key, tag.
pub const WRAPPED_LEN: usize = 1 + 12 + 32 + 16;

/// The kinds of key a keyring holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Gcm,
    Fernet,
    /// A blind-index key (see [`crate::blind`]): never encrypts.
    Index,
}

impl KeyKind {
    /// The byte bound into a wrapped key's associated data; also how the
    /// key tables' queries spell the kind.
    pub fn code(self) -> u8 {
        match self {
            KeyKind::Gcm => b'g',
            KeyKind::Fernet => b'f',
            KeyKind::Index => b'i',
        }
    }

    pub fn from_code(code: &str) -> Option<KeyKind> {
        match code {
            "g" => Some(KeyKind::Gcm),
            "f" => Some(KeyKind::Fernet),
            "i" => Some(KeyKind::Index),
            _ => None,
        }
    }
}

/// Where a wrapped key belongs: bound into its associated data.
#[derive(Clone, Copy, Debug)]
pub struct Slot<'a> {
    pub key_id: u32,
    pub kind: KeyKind,
    pub keyring: &'a str,
}

fn v2_aad(slot: &Slot<'_>) -> Vec<u8> {
    let name = slot.keyring.as_bytes();
    let mut aad = Vec::with_capacity(V2_AAD_LABEL.len() + 6 + name.len());
    aad.extend_from_slice(V2_AAD_LABEL);
    aad.extend_from_slice(&slot.key_id.to_be_bytes());
    aad.push(slot.kind.code());
    // Keyring names are at most 63 bytes (crate::names).
    aad.push(name.len().min(255) as u8);
    aad.extend_from_slice(name);
    aad
}

fn v1_aad(key_id: u32) -> Vec<u8> {
    // The header `aead::seal` authenticated in 0.1.0: version 1, key id 0.
    let mut aad = crate::envelope::header(0).to_vec();
    aad.extend_from_slice(V1_AAD_LABEL);
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad
}

/// Wraps a 32-byte data key for storage in `slot` (version 2).
pub fn wrap(root: &Key32, slot: &Slot<'_>, data_key: &Key32, nonces: &mut NonceSource) -> Vec<u8> {
    let nonce = nonces.draw();
    let sealed = aead::seal_raw(
        &Cipher::new(root),
        &nonce,
        &v2_aad(slot),
        data_key.as_bytes(),
    );
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(V2);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Unwraps a data key stored in `slot`, in either version.
pub fn unwrap(root: &Key32, slot: &Slot<'_>, wrapped: &[u8]) -> Result<Key32, AuthError> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(AuthError);
    }
    let aad = match wrapped[0] {
        V2 => v2_aad(slot),
        V1 => v1_aad(slot.key_id),
        _ => return Err(AuthError),
    };
    let plain: Zeroizing<Vec<u8>> = aead::open_raw(root, &wrapped[1..13], &wrapped[13..], &aad)?;
    Key32::from_slice(&plain).map_err(|_| AuthError)
}

/// Whether a wrapped key is in the current format (version 2).
pub fn is_current(wrapped: &[u8]) -> bool {
    wrapped.first() == Some(&V2)
}

/// A version-1 wrap as 0.1.0 wrote it, for tests of the reader.
#[cfg(test)]
fn wrap_v1(root: &Key32, key_id: u32, data_key: &Key32, nonce: [u8; 12]) -> Vec<u8> {
    let mut aad = V1_AAD_LABEL.to_vec();
    aad.extend_from_slice(&key_id.to_be_bytes());
    let sealed = aead::seal(&Cipher::new(root), 0, nonce, &aad, data_key.as_bytes());
    let mut out = vec![V1];
    out.extend_from_slice(&sealed[5..]);
    out
}

fn prf(root: &Key32, label: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(root.as_bytes()).expect("HMAC takes any key length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

/// The value stored once, the first time keys are created.
pub fn check_value(root: &Key32) -> [u8; 32] {
    prf(root, b"manna_crypt/root-key-check/v1")
}

/// Constant-time comparison of a root key against a stored check value.
pub fn matches_check_value(root: &Key32, stored: &[u8]) -> bool {
    stored.len() == 32 && bool::from(check_value(root).ct_eq(stored))
}

/// A short public identifier of the root key for `info()` and the audit log.
pub fn fingerprint(root: &Key32) -> String {
    hex::encode(&prf(root, b"manna_crypt/root-key-fingerprint/v1")[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: Slot<'static> = Slot {
        key_id: 42,
        kind: KeyKind::Gcm,
        keyring: "pii",
    };

    #[test]
    fn wrap_round_trips_and_binds_its_slot() {
        let root = Key32::generate();
        let dk = Key32::generate();
        let mut n = NonceSource::new();
        let w = wrap(&root, &RING, &dk, &mut n);
        assert_eq!(w.len(), WRAPPED_LEN);
        assert!(is_current(&w));
        assert_eq!(unwrap(&root, &RING, &w).unwrap().as_bytes(), dk.as_bytes());
        for other in [
            Slot { key_id: 43, ..RING },
            Slot {
                kind: KeyKind::Fernet,
                ..RING
            },
            Slot {
                keyring: "pii2",
                ..RING
            },
            Slot {
                keyring: "pi",
                ..RING
            },
        ] {
            assert!(unwrap(&root, &other, &w).is_err(), "{other:?}");
        }
        assert!(unwrap(&Key32::generate(), &RING, &w).is_err());
        let mut bad = w.clone();
        bad[20] ^= 1;
        assert!(unwrap(&root, &RING, &bad).is_err());
        let mut downgraded = w.clone();
        downgraded[0] = V1;
        assert!(unwrap(&root, &RING, &downgraded).is_err());
        assert!(unwrap(&root, &RING, &w[..60]).is_err());
        // The wrapped form never contains the key in the clear.
        assert!(!w.windows(32).any(|win| win == dk.as_bytes()));
    }

    #[test]
    fn version_one_wraps_still_unwrap_by_key_id() {
        let root = Key32::generate();
        let dk = Key32::generate();
        let w = wrap_v1(&root, 42, &dk, [9; 12]);
        assert!(!is_current(&w));
        assert_eq!(unwrap(&root, &RING, &w).unwrap().as_bytes(), dk.as_bytes());
        // Version 1 bound the key id only: any keyring name opens it.
        let elsewhere = Slot {
            keyring: "other",
            ..RING
        };
        assert_eq!(
            unwrap(&root, &elsewhere, &w).unwrap().as_bytes(),
            dk.as_bytes()
        );
        assert!(unwrap(&root, &Slot { key_id: 43, ..RING }, &w).is_err());
    }

    #[test]
    fn check_value_and_fingerprint() {
        let a = Key32::from_array([1; 32]);
        let b = Key32::from_array([2; 32]);
        assert!(matches_check_value(&a, &check_value(&a)));
        assert!(!matches_check_value(&b, &check_value(&a)));
        assert!(!matches_check_value(&a, &check_value(&a)[..31]));
        assert_eq!(fingerprint(&a).len(), 16);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(hex::encode(&check_value(&a)[..8]), fingerprint(&a));
    }
}
