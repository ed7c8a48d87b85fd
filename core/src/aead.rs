//! AES-256-GCM seal and open over the version-1 envelope.
//!
//! Invariants:
//! - the nonce is 96 bits and comes from [`crate::nonce::NonceSource`], never
//!   from the caller, so no API here can be driven into nonce reuse (the
//!   bare [`open_raw`] primitive decrypts only);
//! - the GCM associated data is the envelope header (version and key id)
//!   followed by the caller's AAD, so a key id cannot be swapped and a value
//!   cannot be moved to another row whose AAD differs;
//! - the tag is 128 bits and is checked by the `aes-gcm` crate in constant
//!   time before any plaintext is released.
//!
//! A Python program with the same raw key reproduces this exactly with
//! `AESGCM(key).decrypt(env[5:17], env[17:], env[0:5] + aad)`.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use zeroize::Zeroizing;

use crate::envelope::{self, Envelope, HEADER_LEN, NONCE_LEN, TAG_LEN};
use crate::secret::Key32;

/// Decryption failed: wrong key, wrong AAD, or tampered data. Deliberately
/// carries no detail, like the tag check it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

/// An expanded AES-256-GCM key, ready for many operations. Expanding the key
/// schedule once per key (not once per row) is what the key cache keeps.
#[derive(Clone)]
pub struct Cipher(Aes256Gcm);

impl Cipher {
    pub fn new(key: &Key32) -> Self {
        Cipher(Aes256Gcm::new(key.as_bytes().into()))
    }
}

/// Header bytes followed by the caller's AAD. Small AADs are the norm (a
/// row id), so this is one short allocation per call.
fn full_aad(header: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(header.len() + aad.len());
    v.extend_from_slice(header);
    v.extend_from_slice(aad);
    v
}

/// Encrypts `plaintext` into a complete binary envelope under `key_id`.
pub fn seal(
    cipher: &Cipher,
    key_id: u32,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let header = envelope::header(key_id);
    let mut out = Vec::with_capacity(envelope::OVERHEAD + plaintext.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let body_start = HEADER_LEN + NONCE_LEN;
    let tag = cipher
        .0
        .encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &full_aad(&header, aad),
            &mut out[body_start..],
        )
        // Only fails for plaintexts beyond GCM's 64 GiB limit, which a
        // PostgreSQL value (at most 1 GiB) can never reach.
        .expect("plaintext exceeds the AES-GCM length limit");
    out.extend_from_slice(&tag);
    out
}

/// The bare AEAD primitive's sealing side, `ciphertext ‖ tag`, for formats
/// of the crate's own that are not envelopes (wrapped keys). Not exposed to
/// SQL: a caller-chosen nonce must never reach an encryption there.
pub fn seal_raw(cipher: &Cipher, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = plaintext.to_vec();
    let tag = cipher
        .0
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out)
        // Only fails beyond GCM's 64 GiB limit; callers seal 32-byte keys.
        .expect("plaintext exceeds the AES-GCM length limit");
    out.extend_from_slice(&tag);
    out
}

/// Decrypts a parsed envelope. The plaintext buffer is wiped when dropped.
pub fn open(
    cipher: &Cipher,
    env: &Envelope<'_>,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    open_parts(cipher, env.nonce, env.sealed, &full_aad(env.header, aad))
}

/// The bare AEAD primitive: `sealed` is ciphertext followed by a 16-byte tag.
/// For reading foreign AES-GCM formats and running published test vectors.
pub fn open_raw(
    key: &Key32,
    nonce: &[u8],
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    open_parts(&Cipher::new(key), nonce, sealed, aad)
}

/// [`open_raw`] with an already expanded key.
pub fn open_raw_with(
    cipher: &Cipher,
    nonce: &[u8],
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    open_parts(cipher, nonce, sealed, aad)
}

fn open_parts(
    cipher: &Cipher,
    nonce: &[u8],
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    if nonce.len() != NONCE_LEN || sealed.len() < TAG_LEN {
        return Err(AuthError);
    }
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut buf = Zeroizing::new(ct.to_vec());
    cipher
        .0
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            aad,
            &mut buf,
            Tag::from_slice(tag),
        )
        .map_err(|_| AuthError)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nonce::NonceSource;

    fn key(b: u8) -> Key32 {
        Key32::from_array([b; 32])
    }

    fn seal_with(k: &Key32, key_id: u32, aad: &[u8], pt: &[u8]) -> Vec<u8> {
        seal(&Cipher::new(k), key_id, NonceSource::new().draw(), aad, pt)
    }

    fn open_with(k: &Key32, bytes: &[u8], aad: &[u8]) -> Result<Vec<u8>, AuthError> {
        let env = Envelope::parse(bytes).expect("well-formed");
        open(&Cipher::new(k), &env, aad).map(|z| z.to_vec())
    }

    #[test]
    fn round_trips_with_and_without_aad() {
        let k = key(1);
        for (aad, pt) in [
            (&b""[..], &b"hello"[..]),
            (b"row-42", "h\u{e9}llo \u{1F510}".as_bytes()),
            (b"", b""),
        ] {
            let env = seal_with(&k, 7, aad, pt);
            assert_eq!(env.len(), envelope::OVERHEAD + pt.len());
            assert_eq!(open_with(&k, &env, aad).unwrap(), pt);
        }
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let k = key(2);
        let env = seal_with(&k, 3, b"aad", b"sixteen byte msg and more");
        for i in 0..env.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = env.clone();
                bad[i] ^= bit;
                // A flipped version byte is a format error; everything else
                // must fail authentication.
                match Envelope::parse(&bad) {
                    Err(_) => assert_eq!(i, 0),
                    Ok(p) => assert_eq!(
                        open(&Cipher::new(&k), &p, b"aad").unwrap_err(),
                        AuthError,
                        "byte {i}"
                    ),
                }
            }
        }
    }

    #[test]
    fn truncations_are_rejected() {
        let k = key(3);
        let env = seal_with(&k, 3, b"", b"some plaintext");
        for len in 0..env.len() {
            let cut = &env[..len];
            if let Ok(p) = Envelope::parse(cut) {
                assert!(open(&Cipher::new(&k), &p, b"").is_err(), "length {len}");
            }
        }
    }

    #[test]
    fn wrong_key_wrong_aad_and_swapped_key_id_fail() {
        let env = seal_with(&key(4), 11, b"row-1", b"secret");
        assert_eq!(open_with(&key(5), &env, b"row-1").unwrap_err(), AuthError);
        assert_eq!(open_with(&key(4), &env, b"row-2").unwrap_err(), AuthError);
        assert_eq!(open_with(&key(4), &env, b"").unwrap_err(), AuthError);
        let mut swapped = env.clone();
        swapped[4] = 12;
        assert_eq!(
            open_with(&key(4), &swapped, b"row-1").unwrap_err(),
            AuthError
        );
    }

    #[test]
    fn aad_is_header_then_caller_aad() {
        // Reproduce the documented construction with the bare primitive.
        let k = key(6);
        let env = seal_with(&k, 99, b"ctx", b"interop");
        let mut aad = env[..5].to_vec();
        aad.extend_from_slice(b"ctx");
        assert_eq!(
            &open_raw(&k, &env[5..17], &env[17..], &aad).unwrap()[..],
            b"interop"
        );
    }

    #[test]
    fn nonces_are_fresh_per_seal() {
        let k = key(7);
        let mut src = NonceSource::new();
        let c = Cipher::new(&k);
        let a = seal(&c, 0, src.draw(), b"", b"same");
        let b = seal(&c, 0, src.draw(), b"", b"same");
        assert_ne!(a[5..17], b[5..17]);
        assert_ne!(a, b);
    }

    #[test]
    fn one_mib_round_trip() {
        let k = key(8);
        let pt: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
        let env = seal_with(&k, 1, b"big", &pt);
        assert_eq!(open_with(&k, &env, b"big").unwrap(), pt);
    }

    #[test]
    fn hundred_mib_round_trip() {
        let k = key(9);
        let pt = vec![0x5au8; 100 << 20];
        let mut env = seal_with(&k, 1, b"", &pt);
        assert!(open_with(&k, &env, b"").unwrap() == pt);
        let mid = env.len() / 2;
        env[mid] ^= 1;
        assert!(open_with(&k, &env, b"").is_err());
    }

    #[test]
    fn open_raw_rejects_bad_nonce_and_short_input() {
        let k = key(1);
        assert!(open_raw(&k, &[0u8; 8], &[0u8; 32], b"").is_err());
        assert!(open_raw(&k, &[0u8; 12], &[0u8; 15], b"").is_err());
    }

    /// Wycheproof AES-GCM vectors (Apache-2.0, C2SP/wycheproof; see
    /// tests/vectors/README.md): every AES-256, 96-bit IV, 128-bit tag case.
    #[test]
    fn wycheproof_aes_256_gcm() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/wycheproof/aes_gcm_test.json"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let h = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for g in doc["testGroups"].as_array().unwrap() {
            if g["keySize"] != 256 || g["ivSize"] != 96 || g["tagSize"] != 128 {
                continue;
            }
            for t in g["tests"].as_array().unwrap() {
                let key = Key32::from_slice(&h(&t["key"])).unwrap();
                let mut sealed = h(&t["ct"]);
                sealed.extend(h(&t["tag"]));
                let got = open_raw(&key, &h(&t["iv"]), &sealed, &h(&t["aad"]));
                match t["result"].as_str().unwrap() {
                    "valid" => {
                        assert_eq!(
                            got.expect("valid case").to_vec(),
                            h(&t["msg"]),
                            "tcId {}",
                            t["tcId"]
                        );
                        valid += 1;
                    }
                    _ => {
                        assert!(got.is_err(), "tcId {}", t["tcId"]);
                        invalid += 1;
                    }
                }
            }
        }
        assert_eq!((valid, invalid), (39, 27));
    }
}
