//! The seal/open service every SQL surface and the re-encryption engine
//! share: a nonce source per backend, raw keys, keyring keys through the key
//! cache, Fernet tokens through a Fernet keyring, and blind-index terms
//! under a keyring's index keys.
//!
//! Keyring grants: sealing under a keyring needs `encrypt` on it, opening
//! a keyring's value or token needs `decrypt` (see `keys::grants`), judged
//! for the current user after the key itself was found, so an unknown
//! keyring or key stays 42704. The re-encryption engine checks its caller
//! before it switches to the table's owner and then uses the `prechecked`
//! forms here.
//!
//! Nonces: each backend (and each parallel worker, a separate process) draws
//! from its own generator, reseeded whenever the process id changes (see
//! `manna_crypt_core::nonce`), so forked processes never share a stream.

use std::cell::RefCell;

use manna_crypt_core::aead::{self, Cipher};
use manna_crypt_core::blind::{self, BlindKey, Normalize};
use manna_crypt_core::envelope::{self, Envelope};
use manna_crypt_core::fernet::Token;
use manna_crypt_core::nonce::{NonceSource, NONCE_LEN};
use manna_crypt_core::secret::Key32;
use zeroize::Zeroizing;

use crate::error::{McError, McResult};
use crate::keys::access_stats::AccessOp;
use crate::keys::budget;
use crate::keys::cache::{self, ActiveKey};
use crate::keys::grants::{self, Privilege};
use crate::pg::xact::backend_pid;

thread_local! {
    static NONCES: RefCell<NonceSource> = const { RefCell::new(NonceSource::new()) };
    /// The last raw key used, with its expanded schedule: a query that passes
    /// the same key for a million rows expands it once.
    static RAW_KEY: RefCell<Option<(Key32, Cipher)>> = const { RefCell::new(None) };
    /// The ciphertext [`seal_verified`] produced last (see [`sealed_by_engine`]).
    static ENGINE_SEALED: RefCell<Option<String>> = const { RefCell::new(None) };
    /// The term [`engine_term`] computed last (see [`term_by_engine`]).
    static ENGINE_TERM: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// The largest text or bytea value PostgreSQL holds: 1 GB less the varlena
/// header. A longer result would trip pgrx's datum conversion (XX000).
pub const MAX_VALUE_BYTES: usize = 0x3fff_ffff - 4;

fn too_large(len: usize) -> McError {
    McError::TooLarge {
        message: "encrypted value would exceed 1 GB".into(),
        detail: format!(
            "the ciphertext would be {len} bytes; PostgreSQL holds at most {MAX_VALUE_BYTES}"
        ),
    }
}

/// The output forms of an encryption, and how long each is for a plaintext.
#[derive(Clone, Copy)]
pub enum Form {
    /// The binary envelope (`bytea`).
    Bytes,
    /// `mc1:` and the envelope in base64 (`text`, `encrypted_text`).
    Text,
}

impl Form {
    fn len_for(self, plaintext_len: usize) -> usize {
        let envelope = plaintext_len.saturating_add(envelope::OVERHEAD);
        match self {
            Form::Bytes => envelope,
            Form::Text => envelope::TEXT_PREFIX.len() + envelope.div_ceil(3).saturating_mul(4),
        }
    }

    /// Checks, before any work is done, that the result of encrypting
    /// `plaintext_len` bytes fits in a PostgreSQL value (54000 otherwise).
    pub fn check(self, plaintext_len: usize) -> McResult<()> {
        let len = self.len_for(plaintext_len);
        if len > MAX_VALUE_BYTES {
            return Err(too_large(len));
        }
        Ok(())
    }
}

/// A fresh 96-bit nonce for one encryption.
pub fn next_nonce() -> [u8; NONCE_LEN] {
    NONCES.with(|n| n.borrow_mut().draw_in(backend_pid()))
}

/// Where the key for an operation comes from.
pub enum KeySource<'a> {
    Raw(&'a [u8]),
    Keyring(&'a str),
    /// A keyring without counting the encryption: only in the benchmark
    /// build (feature `bench_uncounted`), to measure what counting costs.
    #[cfg(feature = "bench_uncounted")]
    KeyringUncounted(&'a str),
    /// A keyring without the grant check: only in the benchmark build
    /// (feature `bench_unchecked`), to measure what the check costs.
    #[cfg(feature = "bench_unchecked")]
    KeyringUnchecked(&'a str),
}

/// A caller's raw AES-256 key: exactly 32 bytes (22023 otherwise).
pub fn raw_key(key: &[u8]) -> McResult<Key32> {
    Key32::from_slice(key).map_err(|e| McError::BadArgument {
        message: "AES-256-GCM key must be 32 bytes".into(),
        detail: Some(format!("the key given is {} bytes long", e.0)),
        hint: Some("use gen_random_bytes(32) from pgcrypto, or a keyring".into()),
    })
}

fn with_raw_cipher<T>(key: &[u8], f: impl FnOnce(&Cipher) -> T) -> McResult<T> {
    let key = raw_key(key)?;
    RAW_KEY.with(|slot| {
        let mut slot = slot.borrow_mut();
        match &*slot {
            Some((k, cipher)) if k.as_bytes() == key.as_bytes() => Ok(f(cipher)),
            _ => {
                let cipher = Cipher::new(&key);
                let out = f(&cipher);
                *slot = Some((key, cipher));
                Ok(out)
            }
        }
    })
}

/// Seals `plaintext` into a binary envelope, for a result of form `form`
/// (checked to fit first).
pub fn seal_value(
    source: KeySource<'_>,
    form: Form,
    plaintext: &[u8],
    aad: &[u8],
) -> McResult<Vec<u8>> {
    form.check(plaintext.len())?;
    let nonce = next_nonce();
    match source {
        KeySource::Raw(key) => with_raw_cipher(key, |c| aead::seal(c, 0, nonce, aad, plaintext)),
        KeySource::Keyring(name) => {
            let key = cache::active_key(name)?;
            grants::require(name, Privilege::Encrypt)?;
            budget::count_encryption(&key.tally, key.key_id, name)?;
            key.access.record(AccessOp::Encrypt, key.key_id);
            Ok(aead::seal(&key.cipher, key.key_id, nonce, aad, plaintext))
        }
        #[cfg(feature = "bench_uncounted")]
        KeySource::KeyringUncounted(name) => {
            let key = cache::active_key(name)?;
            key.access.record(AccessOp::Encrypt, key.key_id);
            Ok(aead::seal(&key.cipher, key.key_id, nonce, aad, plaintext))
        }
        #[cfg(feature = "bench_unchecked")]
        KeySource::KeyringUnchecked(name) => {
            let key = cache::active_key(name)?;
            budget::count_encryption(&key.tally, key.key_id, name)?;
            key.access.record(AccessOp::Encrypt, key.key_id);
            Ok(aead::seal(&key.cipher, key.key_id, nonce, aad, plaintext))
        }
    }
}

/// Opens a binary envelope. With `None` the key comes from the envelope's
/// key id (and the current user needs `decrypt` on its keyring); with a raw
/// key the envelope's key id is only authenticated.
pub fn open_value(
    raw_key: Option<&[u8]>,
    bytes: &[u8],
    aad: &[u8],
) -> McResult<Zeroizing<Vec<u8>>> {
    open_checked(raw_key, bytes, aad, true)
}

/// [`open_value`] of a keyring's value without the grant check: for the
/// re-encryption engine, whose caller was checked before the switch to the
/// table's owner, and the benchmark's baseline.
pub fn open_value_prechecked(bytes: &[u8], aad: &[u8]) -> McResult<Zeroizing<Vec<u8>>> {
    open_checked(None, bytes, aad, false)
}

fn open_checked(
    raw_key: Option<&[u8]>,
    bytes: &[u8],
    aad: &[u8],
    check: bool,
) -> McResult<Zeroizing<Vec<u8>>> {
    let env = Envelope::parse(bytes)?;
    match raw_key {
        Some(key) => with_raw_cipher(key, |c| aead::open(c, &env, aad))?.map_err(|_| {
            McError::Unauthenticated {
                detail: if env.key_id == 0 {
                    "the AES-GCM authentication tag did not verify".into()
                } else {
                    format!(
                        "the value names keyring key id {}, not a raw key (id 0)",
                        env.key_id
                    )
                },
            }
        }),
        None => {
            let key = cache::key_for_decrypt(env.key_id)?;
            if check {
                grants::require(&key.keyring, Privilege::Decrypt)?;
            }
            // Counted once the key is found and may be used, whether or not
            // the value then authenticates: an attempt is an access too.
            key.access.record(AccessOp::Decrypt, env.key_id);
            aead::open(&key.cipher, &env, aad).map_err(|_| McError::Unauthenticated {
                detail: format!(
                    "the AES-GCM authentication tag did not verify under key id {}",
                    env.key_id
                ),
            })
        }
    }
}

/// Seals under a keyring's active key (counted like every encryption) and
/// opens the result again before handing it out: the re-encryption engine
/// writes nothing that does not decrypt back to its plaintext.
pub fn seal_verified(
    key: &ActiveKey,
    keyring: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> McResult<String> {
    Form::Text.check(plaintext.len())?;
    budget::count_encryption(&key.tally, key.key_id, keyring)?;
    key.access.record(AccessOp::Encrypt, key.key_id);
    let (cipher, key_id) = (&*key.cipher, key.key_id);
    let env = aead::seal(cipher, key_id, next_nonce(), aad, plaintext);
    let back = aead::open(cipher, &Envelope::parse(&env)?, aad)?;
    if back[..] != plaintext[..] {
        return Err(McError::Internal(
            "re-encrypted value did not decrypt back to its plaintext".into(),
        ));
    }
    let text = envelope::to_text(&env);
    ENGINE_SEALED.with(|s| *s.borrow_mut() = Some(text.clone()));
    Ok(text)
}

/// Whether `value` is the ciphertext [`seal_verified`] produced last in this
/// backend: the re-encryption batch writing it, whose caller was checked
/// before the switch to the table's owner. The protect trigger, fired by
/// that write as the owner, then verifies it without a grant check of its
/// own; a trigger of the owner's cannot use this to read anything (the
/// value only ever decrypts to what the engine sealed, and verification
/// returns no plaintext).
pub fn sealed_by_engine(value: &str) -> bool {
    ENGINE_SEALED.with(|s| s.borrow().as_deref() == Some(value))
}

/// A backfill batch's term for the row it is updating, computed under the
/// active index key and remembered (see [`term_by_engine`]).
pub fn engine_term(key: &BlindKey, shape: TermShape, value: &str) -> Vec<u8> {
    let term = key.term(shape.normalize, value, shape.mac_len);
    ENGINE_TERM.with(|t| *t.borrow_mut() = Some(term.clone()));
    term
}

/// Whether `term` is the term [`engine_term`] computed last in this backend:
/// the backfill batch writing it into the row whose ciphertext it was
/// computed from. The protect trigger, fired by that write as the table's
/// owner, keeps it without recomputing it (the batch's caller was checked
/// for `decrypt` and `blind_index` before the switch to the owner).
pub fn term_by_engine(term: &[u8]) -> bool {
    ENGINE_TERM.with(|t| t.borrow().as_deref() == Some(term))
}

/// Decrypts a Fernet token with a Fernet keyring's keys, newest first; the
/// current user needs `decrypt` on the keyring.
pub fn open_token(token: &str, keyring: &str) -> McResult<Zeroizing<Vec<u8>>> {
    let token = Token::parse(token)?;
    // The keyring first: an unknown one is 42704 before any grant check.
    cache::fernet_ring(keyring)?;
    grants::require(keyring, Privilege::Decrypt)?;
    open_parsed_token(&token, keyring)
}

/// Decrypts an already parsed token with a Fernet keyring's keys, without
/// the grant check: for the re-encryption engine (see [`open_value_prechecked`]).
pub fn open_parsed_token(token: &Token, keyring: &str) -> McResult<Zeroizing<Vec<u8>>> {
    let (keys, access) = cache::fernet_ring(keyring)?;
    let result = token.decrypt(keys.iter().map(|(_, k)| k));
    // Counted whether or not a key opened the token, as for AES-GCM; the
    // LOG line names the key that did (the newest when none did).
    let used = result.as_ref().map_or(0, |(i, _)| *i);
    access.record(AccessOp::Decrypt, keys.get(used).map_or(0, |(id, _)| *id));
    Ok(result?.1)
}

/// How a blind-index term is computed: the normalization and how many MAC
/// bytes it keeps, from the SQL arguments `normalize` and `bits` (22023 for
/// anything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermShape {
    pub normalize: Normalize,
    pub mac_len: usize,
}

impl TermShape {
    pub fn parse(normalize: &str, bits: i32) -> McResult<TermShape> {
        let normalize = Normalize::parse(normalize).map_err(|_| McError::BadArgument {
            message: format!("unknown normalization \"{normalize}\""),
            detail: None,
            hint: Some(format!("use one of: {}", Normalize::NAMES)),
        })?;
        let mac_len = blind::mac_bytes(bits).map_err(|_| McError::BadArgument {
            message: "bits must be a multiple of 8 between 8 and 256".into(),
            detail: Some(format!("bits is {bits}")),
            hint: None,
        })?;
        Ok(TermShape { normalize, mac_len })
    }
}

/// The blind-index term of `value` under the keyring's active index key.
/// The current user needs `blind_index` on the keyring.
pub fn index_term(keyring: &str, shape: TermShape, value: &str) -> McResult<Vec<u8>> {
    index_term_checked(keyring, shape, value, true)
}

/// [`index_term`] without the grant check: for the protect trigger writing
/// a value a re-encryption batch sealed (its caller was checked, see
/// [`sealed_by_engine`]).
pub fn index_term_prechecked(keyring: &str, shape: TermShape, value: &str) -> McResult<Vec<u8>> {
    index_term_checked(keyring, shape, value, false)
}

fn index_term_checked(
    keyring: &str,
    shape: TermShape,
    value: &str,
    check: bool,
) -> McResult<Vec<u8>> {
    let ring = cache::index_ring(keyring)?;
    if check {
        grants::require(keyring, Privilege::BlindIndex)?;
    }
    match ring.live.first() {
        Some(key) if ring.has_active => {
            ring.access.record(AccessOp::BlindIndex, key.key_id());
            Ok(key.term(shape.normalize, value, shape.mac_len))
        }
        _ => Err(McError::WrongState {
            message: format!("keyring \"{keyring}\" has no active blind-index key"),
            detail: Some("its active index key was revoked".into()),
            hint: Some(format!(
                "create one with SELECT manna_crypt.rotate_index_key('{keyring}')"
            )),
        }),
    }
}

/// The terms of `value` under every live index key of the keyring, the
/// active key's first: what a lookup compares against while a rotation's
/// backfill is under way.
pub fn index_terms_all(keyring: &str, shape: TermShape, value: &str) -> McResult<Vec<Vec<u8>>> {
    let ring = cache::index_ring(keyring)?;
    grants::require(keyring, Privilege::BlindIndex)?;
    if let Some(key) = ring.live.first() {
        ring.access.record(AccessOp::BlindIndex, key.key_id());
    }
    Ok(ring
        .live
        .iter()
        .map(|key| key.term(shape.normalize, value, shape.mac_len))
        .collect())
}
