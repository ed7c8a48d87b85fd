//! `encrypt_gcm` / `decrypt_gcm` and the bare `aes_gcm_decrypt` primitive.
//!
//! SQL wrappers only: every form funnels into [`crate::crypto`]'s
//! `seal_value` and `open_value`; the forms differ only in where the key
//! comes from (a raw 32-byte key, id 0, or a keyring's data key) and whether
//! the envelope travels as bytea or as `mc1:` text.
//!
//! Volatility: encryption draws a random nonce, so it is VOLATILE. Raw-key
//! decryption depends only on its arguments: IMMUTABLE. Keyring decryption
//! reads key state that a revocation changes: STABLE. All are PARALLEL SAFE —
//! each parallel worker is a separate process with its own nonce generator
//! (see `manna_crypt_core::nonce`) and its own key cache.
//!
//! Not STRICT on purpose: a NULL plaintext or ciphertext gives NULL, a NULL
//! AAD means "no AAD", but a NULL key or keyring is an error, so a missing key
//! can never silently turn a secret into NULL.

use manna_crypt_core::aead;
use manna_crypt_core::envelope::{self, Envelope};
use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::crypto::{open_value, raw_key, seal_value, Form, KeySource};
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::datum::{EncryptedText, SecretBytes, SecretText};

fn aad_bytes(aad: Option<&str>) -> &[u8] {
    aad.map(str::as_bytes).unwrap_or(b"")
}

fn to_text(bytes: Zeroizing<Vec<u8>>) -> McResult<SecretText> {
    SecretText::from_utf8(bytes).ok_or(McError::NotUtf8)
}

// ---- text forms ---------------------------------------------------------

#[pg_extern(name = "encrypt_gcm", volatile, parallel_safe, requires = ["encrypted_text_domain"])]
fn encrypt_gcm_raw(
    plaintext: Option<&str>,
    key: Option<&[u8]>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<EncryptedText> {
    let key = not_null(key, "key");
    let pt = plaintext?;
    let env = seal_value(
        KeySource::Raw(key),
        Form::Text,
        pt.as_bytes(),
        aad_bytes(aad),
    );
    Some(EncryptedText(envelope::to_text(&env.or_raise())))
}

#[pg_extern(name = "encrypt_gcm", volatile, parallel_safe, requires = ["encrypted_text_domain"])]
fn encrypt_gcm_keyring(
    plaintext: Option<&str>,
    keyring: Option<&str>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<EncryptedText> {
    let keyring = not_null(keyring, "keyring");
    let pt = plaintext?;
    let source = KeySource::Keyring(keyring);
    let env = seal_value(source, Form::Text, pt.as_bytes(), aad_bytes(aad));
    Some(EncryptedText(envelope::to_text(&env.or_raise())))
}

/// The benchmark's baseline (scripts/bench.sh gcm): `encrypt_gcm(text,
/// keyring)` without counting the encryption. Only in a build with the
/// `bench_uncounted` feature, never in a release.
#[cfg(feature = "bench_uncounted")]
#[pg_extern(volatile, parallel_safe, requires = ["encrypted_text_domain"])]
fn _bench_encrypt_gcm_uncounted(
    plaintext: Option<&str>,
    keyring: Option<&str>,
) -> Option<EncryptedText> {
    let keyring = not_null(keyring, "keyring");
    let pt = plaintext?;
    let source = KeySource::KeyringUncounted(keyring);
    let env = seal_value(source, Form::Text, pt.as_bytes(), b"");
    Some(EncryptedText(envelope::to_text(&env.or_raise())))
}

/// The benchmark's baseline (scripts/bench.sh grants): `encrypt_gcm(text,
/// keyring)` and `decrypt_gcm(text)` without the keyring grant check. Only
/// in a build with the `bench_unchecked` feature, never in a release.
#[cfg(feature = "bench_unchecked")]
#[pg_extern(volatile, parallel_safe, requires = ["encrypted_text_domain"])]
fn _bench_encrypt_gcm_unchecked(
    plaintext: Option<&str>,
    keyring: Option<&str>,
) -> Option<EncryptedText> {
    let keyring = not_null(keyring, "keyring");
    let source = KeySource::KeyringUnchecked(keyring);
    let env = seal_value(source, Form::Text, plaintext?.as_bytes(), b"");
    Some(EncryptedText(envelope::to_text(&env.or_raise())))
}

#[cfg(feature = "bench_unchecked")]
#[pg_extern(stable, parallel_safe)]
fn _bench_decrypt_gcm_unchecked(ciphertext: Option<&str>) -> Option<SecretText> {
    let bytes = envelope::from_text(ciphertext?).or_raise();
    let plaintext = crate::crypto::open_value_prechecked(&bytes, b"").or_raise();
    Some(to_text(plaintext).or_raise())
}

#[pg_extern(name = "decrypt_gcm", immutable, parallel_safe)]
fn decrypt_gcm_raw(
    ciphertext: Option<&str>,
    key: Option<&[u8]>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<SecretText> {
    let key = not_null(key, "key");
    let ct = ciphertext?;
    let bytes = envelope::from_text(ct).or_raise();
    Some(to_text(open_value(Some(key), &bytes, aad_bytes(aad)).or_raise()).or_raise())
}

#[pg_extern(name = "decrypt_gcm", stable, parallel_safe)]
fn decrypt_gcm_keyring(
    ciphertext: Option<&str>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<SecretText> {
    let ct = ciphertext?;
    let bytes = envelope::from_text(ct).or_raise();
    Some(to_text(open_value(None, &bytes, aad_bytes(aad)).or_raise()).or_raise())
}

// ---- bytea forms: binary plaintext, binary envelope ----------------------

#[pg_extern(name = "encrypt_gcm", volatile, parallel_safe)]
fn encrypt_gcm_raw_bytea(
    plaintext: Option<&[u8]>,
    key: Option<&[u8]>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<Vec<u8>> {
    let key = not_null(key, "key");
    Some(seal_value(KeySource::Raw(key), Form::Bytes, plaintext?, aad_bytes(aad)).or_raise())
}

#[pg_extern(name = "encrypt_gcm", volatile, parallel_safe)]
fn encrypt_gcm_keyring_bytea(
    plaintext: Option<&[u8]>,
    keyring: Option<&str>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<Vec<u8>> {
    let keyring = not_null(keyring, "keyring");
    let source = KeySource::Keyring(keyring);
    Some(seal_value(source, Form::Bytes, plaintext?, aad_bytes(aad)).or_raise())
}

#[pg_extern(name = "decrypt_gcm", immutable, parallel_safe)]
fn decrypt_gcm_raw_bytea(
    ciphertext: Option<&[u8]>,
    key: Option<&[u8]>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<SecretBytes> {
    let key = not_null(key, "key");
    Some(SecretBytes(
        open_value(Some(key), ciphertext?, aad_bytes(aad)).or_raise(),
    ))
}

#[pg_extern(name = "decrypt_gcm", stable, parallel_safe)]
fn decrypt_gcm_keyring_bytea(
    ciphertext: Option<&[u8]>,
    aad: default!(Option<&str>, "NULL"),
) -> Option<SecretBytes> {
    Some(SecretBytes(
        open_value(None, ciphertext?, aad_bytes(aad)).or_raise(),
    ))
}

// ---- the bare primitive and format helpers -------------------------------

/// AES-256-GCM decryption of a foreign format. There is deliberately no
/// encrypting twin that takes a nonce: nonce reuse must stay impossible.
#[pg_extern(immutable, parallel_safe)]
fn aes_gcm_decrypt(
    key: Option<&[u8]>,
    nonce: Option<&[u8]>,
    ciphertext_and_tag: Option<&[u8]>,
    aad: default!(Option<&[u8]>, "NULL"),
) -> Option<SecretBytes> {
    let key = raw_key(not_null(key, "key")).or_raise();
    let nonce = not_null(nonce, "nonce");
    if nonce.len() != envelope::NONCE_LEN {
        McError::BadArgument {
            message: "AES-GCM nonce must be 12 bytes".into(),
            detail: Some(format!("the nonce given is {} bytes long", nonce.len())),
            hint: None,
        }
        .raise();
    }
    let sealed = ciphertext_and_tag?;
    if sealed.len() < envelope::TAG_LEN {
        McError::Malformed {
            what: "ciphertext",
            detail: format!("{} bytes cannot hold a 16-byte GCM tag", sealed.len()),
        }
        .raise();
    }
    Some(SecretBytes(
        aead::open_raw(&key, nonce, sealed, aad.unwrap_or(b"")).or_raise(),
    ))
}

/// The CHECK of the `encrypted_text` domain: a well-formed version-1 text
/// ciphertext. Says nothing about which key opens it.
#[pg_extern(immutable, strict, parallel_safe)]
fn is_encrypted(value: &str) -> bool {
    envelope::is_well_formed_text(value)
}

/// The key id in a text ciphertext's header (0 for a raw key).
#[pg_extern(immutable, strict, parallel_safe)]
fn key_id(ciphertext: &str) -> i64 {
    let bytes = envelope::from_text(ciphertext).or_raise();
    i64::from(Envelope::parse(&bytes).or_raise().key_id)
}

/// The key id in a binary envelope's header.
#[pg_extern(name = "key_id", immutable, strict, parallel_safe)]
fn key_id_bytea(ciphertext: &[u8]) -> i64 {
    i64::from(Envelope::parse(ciphertext).or_raise().key_id)
}
