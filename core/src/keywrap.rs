//! Data keys wrapped under the root key (envelope encryption), and the root
//! key's check value and fingerprint.
//!
//! Wrapped form: `0x01 ‖ nonce(12) ‖ AES-256-GCM(root, data key) ‖ tag(16)`,
//! with associated data `"manna_crypt/data-key/v1" ‖ key_id (u32 BE)`. Binding
//! the key id means a wrapped key copied onto another key id's row does not
//! unwrap: the envelope's key id always names the key that sealed it.
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

const WRAP_VERSION: u8 = 0x01;
const WRAP_AAD_LABEL: &[u8] = b"manna_crypt/data-key/v1";
pub const WRAPPED_LEN: usize = 1 + 12 + 32 + 16;

fn wrap_aad(key_id: u32) -> Vec<u8> {
    let mut aad = WRAP_AAD_LABEL.to_vec();
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad
}

/// Wraps a 32-byte data key for storage under `key_id`.
pub fn wrap(root: &Key32, key_id: u32, data_key: &Key32, nonces: &mut NonceSource) -> Vec<u8> {
    // `aead::seal` writes a 5-byte envelope header we do not need here; the
    // wrapped form keeps its own one-byte version instead.
    let sealed = aead::seal(
        &Cipher::new(root),
        0,
        nonces.draw(),
        &wrap_aad(key_id),
        data_key.as_bytes(),
    );
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(WRAP_VERSION);
    out.extend_from_slice(&sealed[5..]);
    out
}

/// Unwraps a data key stored under `key_id`.
pub fn unwrap(root: &Key32, key_id: u32, wrapped: &[u8]) -> Result<Key32, AuthError> {
    if wrapped.len() != WRAPPED_LEN || wrapped[0] != WRAP_VERSION {
        return Err(AuthError);
    }
    // Rebuild the header `seal` authenticated (version 1, key id 0).
    let mut aad = crate::envelope::header(0).to_vec();
    aad.extend_from_slice(&wrap_aad(key_id));
    let plain: Zeroizing<Vec<u8>> = aead::open_raw(root, &wrapped[1..13], &wrapped[13..], &aad)?;
    Key32::from_slice(&plain).map_err(|_| AuthError)
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

    #[test]
    fn wrap_round_trips_and_binds_key_id() {
        let root = Key32::generate();
        let dk = Key32::generate();
        let mut n = NonceSource::new();
        let w = wrap(&root, 42, &dk, &mut n);
        assert_eq!(w.len(), WRAPPED_LEN);
        assert_eq!(unwrap(&root, 42, &w).unwrap().as_bytes(), dk.as_bytes());
        assert!(unwrap(&root, 43, &w).is_err());
        assert!(unwrap(&Key32::generate(), 42, &w).is_err());
        let mut bad = w.clone();
        bad[20] ^= 1;
        assert!(unwrap(&root, 42, &bad).is_err());
        assert!(unwrap(&root, 42, &w[..60]).is_err());
        // The wrapped form never contains the key in the clear.
        assert!(!w.windows(32).any(|win| win == dk.as_bytes()));
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
