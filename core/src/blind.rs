//! Blind indexes: equality search over encrypted values.
//!
//! A blind index term is a keyed HMAC-SHA256 of a normalized value under a
//! keyring's *index key* — key material of its own, generated at random and
//! wrapped under the root key like a data key, never derived from one: an
//! index key never encrypts and a data key never indexes.
//!
//! Term, format version 1: `0x01 ‖ key_id (u32 BE) ‖ normalization (1 byte)
//! ‖ HMAC[..n]`, where `n` is 1 to 32 bytes (the truncation), the
//! normalization byte is the first of its tag (`n`, `l`, `e`, `d`), and the
//! MAC is over
//!
//! ```text
//! key ⊕ ipad ‖ domain (128 bytes) ‖ normalization tag (2 bytes) ‖ normalized value
//! domain = "manna_crypt/blind-index/v1" ‖ len(keyring) (1 byte) ‖ keyring ‖ zero bytes
//! ```
//!
//! The domain names the keyring, so the same value under two keyrings never
//! gives the same term even if their keys were equal; the normalization tag
//! (its name's first letter and its version) keeps a value normalized one
//! way from matching one normalized another way. The key id in clear lets a
//! lookup compare against every live key version's term during a rotation,
//! and lets a key's retirement count the rows still under it; the
//! normalization in clear, with the term's length (the truncation), lets a
//! backfill see which stored terms a changed normalization or truncation
//! left behind.
//!
//! Speed: the domain fills exactly two SHA-256 blocks, so they are absorbed
//! once per key into the precomputed inner state ([`BlindKey::new`]); a
//! value of up to 53 bytes then costs two compressions (inner, outer).
//! The states are as secret as the key and are wiped on drop.
//!
//! Normalizations are defined here, in Rust, and versioned: never
//! PostgreSQL's `lower()`, whose result depends on the database's collation
//! and provider, so terms computed by a restored copy or by a client would
//! differ. `lower` is Unicode's default lowercase mapping (Rust's
//! `str::to_lowercase`, locale-independent); no Unicode normalization form
//! is applied (a composed and a decomposed "é" differ).

use std::borrow::Cow;

use sha2::digest::generic_array::GenericArray;
use zeroize::Zeroize;

use crate::secret::Key32;

/// The first byte of a version-1 term.
pub const FORMAT_V1: u8 = 0x01;
/// Format byte, key id, normalization byte.
pub const HEADER_LEN: usize = 6;
pub const MAC_LEN: usize = 32;

const DOMAIN_LABEL: &[u8] = b"manna_crypt/blind-index/v1";
const DOMAIN_LEN: usize = 128;

/// How a value is normalized before it is indexed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalize {
    /// The exact bytes.
    None,
    /// Unicode default lowercase.
    Lower,
    /// Leading and trailing white space removed, then lowercase.
    Email,
    /// Only the ASCII digits 0-9, in order (SSNs, phone numbers).
    Digits,
}

/// A normalization name that is not one of [`Normalize::NAMES`].
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownNormalize;

impl Normalize {
    pub const NAMES: &'static str = "none, lower, email, digits";

    pub fn parse(name: &str) -> Result<Normalize, UnknownNormalize> {
        match name {
            "none" => Ok(Normalize::None),
            "lower" => Ok(Normalize::Lower),
            "email" => Ok(Normalize::Email),
            "digits" => Ok(Normalize::Digits),
            _ => Err(UnknownNormalize),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Normalize::None => "none",
            Normalize::Lower => "lower",
            Normalize::Email => "email",
            Normalize::Digits => "digits",
        }
    }

    /// The byte a term carries in clear (the tag's first).
    pub fn code(self) -> u8 {
        self.tag()[0]
    }

    /// Bound into every term: a new version of a normalization gets a new
    /// name and a new tag, and old terms stay what they were.
    fn tag(self) -> [u8; 2] {
        match self {
            Normalize::None => *b"n1",
            Normalize::Lower => *b"l1",
            Normalize::Email => *b"e1",
            Normalize::Digits => *b"d1",
        }
    }

    /// The normalized value (borrowed when nothing changes).
    pub fn apply(self, value: &str) -> Cow<'_, str> {
        match self {
            Normalize::None => Cow::Borrowed(value),
            Normalize::Lower => lower(value),
            Normalize::Email => lower(value.trim()),
            Normalize::Digits => {
                if value.bytes().all(|b| b.is_ascii_digit()) {
                    Cow::Borrowed(value)
                } else {
                    Cow::Owned(value.chars().filter(char::is_ascii_digit).collect())
                }
            }
        }
    }
}

fn lower(value: &str) -> Cow<'_, str> {
    if value
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(value.to_lowercase())
    }
}

/// A truncation that is not a multiple of 8 between 8 and 256 bits.
#[derive(Debug, PartialEq, Eq)]
pub struct BadBits;

/// The MAC bytes a term keeps for `bits` (8, 16, ... 256).
pub fn mac_bytes(bits: i32) -> Result<usize, BadBits> {
    if (8..=256).contains(&bits) && bits % 8 == 0 {
        Ok(bits as usize / 8)
    } else {
        Err(BadBits)
    }
}

/// The key id of a version-1 term, if it is one.
pub fn term_key_id(term: &[u8]) -> Option<u32> {
    if term.len() > HEADER_LEN && term[0] == FORMAT_V1 {
        Some(u32::from_be_bytes([term[1], term[2], term[3], term[4]]))
    } else {
        None
    }
}

/// Whether `term` is a version-1 term under `key_id` of the given
/// normalization and truncation: one a backfill leaves as it is.
pub fn term_is_current(term: &[u8], key_id: u32, normalize: Normalize, mac_len: usize) -> bool {
    term_key_id(term) == Some(key_id)
        && term[5] == normalize.code()
        && term.len() == HEADER_LEN + mac_len
}

const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// SHA-256 from a given state, streaming; wiped on drop.
#[derive(Clone)]
struct Sha256State {
    state: [u32; 8],
    buf: [u8; 64],
    buf_len: usize,
    total: u64,
}

impl Sha256State {
    fn new() -> Self {
        Sha256State {
            state: IV,
            buf: [0; 64],
            buf_len: 0,
            total: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        while !data.is_empty() {
            let take = (64 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len == 64 {
                sha2::compress256(
                    &mut self.state,
                    &[GenericArray::clone_from_slice(&self.buf)],
                );
                self.buf_len = 0;
            }
        }
    }

    fn finalize(mut self) -> [u8; 32] {
        let bit_len = self.total.wrapping_mul(8);
        self.update(&[0x80]);
        while self.buf_len != 56 {
            self.update(&[0]);
        }
        self.update(&bit_len.to_be_bytes());
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.state) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

impl Drop for Sha256State {
    fn drop(&mut self) {
        self.state.zeroize();
        self.buf.zeroize();
    }
}

/// One index key, ready to compute terms: the HMAC's inner state with the
/// key and the keyring's domain absorbed, and its outer state.
pub struct BlindKey {
    key_id: u32,
    inner: Sha256State,
    outer: Sha256State,
}

impl BlindKey {
    pub fn new(key: &Key32, key_id: u32, keyring: &str) -> BlindKey {
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, b) in key.as_bytes().iter().enumerate() {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        let mut inner = Sha256State::new();
        inner.update(&ipad);
        inner.update(&domain(keyring));
        let mut outer = Sha256State::new();
        outer.update(&opad);
        ipad.zeroize();
        opad.zeroize();
        BlindKey {
            key_id,
            inner,
            outer,
        }
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// HMAC-SHA256 over the domain, the tag and the (normalized) value.
    fn mac(&self, tag: [u8; 2], normalized: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(&tag);
        inner.update(normalized);
        let mut digest = inner.finalize();
        let mut outer = self.outer.clone();
        outer.update(&digest);
        digest.zeroize();
        outer.finalize()
    }

    /// The term of `value`, keeping `mac_len` bytes of the MAC (see
    /// [`mac_bytes`]; clamped to 1..=32).
    pub fn term(&self, normalize: Normalize, value: &str, mac_len: usize) -> Vec<u8> {
        let normalized = normalize.apply(value);
        let mut mac = self.mac(normalize.tag(), normalized.as_bytes());
        let n = mac_len.clamp(1, MAC_LEN);
        let mut out = Vec::with_capacity(HEADER_LEN + n);
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.push(normalize.code());
        out.extend_from_slice(&mac[..n]);
        mac.zeroize();
        if let Cow::Owned(mut s) = normalized {
            s.zeroize();
        }
        out
    }
}

/// The fixed-length domain block: label, keyring name length, name, zeros.
fn domain(keyring: &str) -> [u8; DOMAIN_LEN] {
    let mut d = [0u8; DOMAIN_LEN];
    let name = keyring.as_bytes();
    // Keyring names are at most 63 bytes (crate::names); cut defensively.
    let n = name.len().min(DOMAIN_LEN - DOMAIN_LABEL.len() - 1);
    d[..DOMAIN_LABEL.len()].copy_from_slice(DOMAIN_LABEL);
    d[DOMAIN_LABEL.len()] = n as u8;
    d[DOMAIN_LABEL.len() + 1..DOMAIN_LABEL.len() + 1 + n].copy_from_slice(&name[..n]);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    fn key(b: u8) -> Key32 {
        Key32::from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn sha256_stream_matches_sha2() {
        for len in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut s = Sha256State::new();
            for chunk in data.chunks(13) {
                s.update(chunk);
            }
            assert_eq!(s.finalize()[..], Sha256::digest(&data)[..], "len {len}");
        }
    }

    #[test]
    fn mac_is_hmac_sha256_of_the_documented_message() {
        let k = key(7);
        for value in ["", "a@x.io", &"long value ".repeat(20)] {
            let bk = BlindKey::new(&k, 42, "pii");
            let mut reference = Hmac::<Sha256>::new_from_slice(k.as_bytes()).unwrap();
            reference.update(&domain("pii"));
            reference.update(b"n1");
            reference.update(value.as_bytes());
            let expected = reference.finalize().into_bytes();
            assert_eq!(bk.mac(*b"n1", value.as_bytes())[..], expected[..]);
            let term = bk.term(Normalize::None, value, 32);
            assert_eq!(term[0], FORMAT_V1);
            assert_eq!(term_key_id(&term), Some(42));
            assert_eq!(term[HEADER_LEN..], expected[..]);
        }
    }

    #[test]
    fn domain_separates_keyrings_and_normalizations() {
        let k = key(1);
        let a = BlindKey::new(&k, 1, "pii").term(Normalize::None, "x", 32);
        let b = BlindKey::new(&k, 1, "pii2").term(Normalize::None, "x", 32);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        let c = BlindKey::new(&k, 1, "pii").term(Normalize::Lower, "x", 32);
        assert_ne!(a[HEADER_LEN..], c[HEADER_LEN..]);
        let d = BlindKey::new(&key(2), 1, "pii").term(Normalize::None, "x", 32);
        assert_ne!(a[HEADER_LEN..], d[HEADER_LEN..]);
    }

    #[test]
    fn normalizations() {
        assert_eq!(Normalize::None.apply(" A@X.io "), " A@X.io ");
        assert_eq!(Normalize::Lower.apply(" A@X.io "), " a@x.io ");
        assert_eq!(Normalize::Lower.apply("ÄÖÜ İ"), "äöü i\u{307}");
        assert_eq!(Normalize::Email.apply("  A@X.io\t\n"), "a@x.io");
        assert_eq!(Normalize::Digits.apply("123-45-6789"), "123456789");
        assert_eq!(Normalize::Digits.apply("+1 (555) 010-1234"), "15550101234");
        assert_eq!(Normalize::Digits.apply("١٢٣"), "", "ASCII digits only");
        assert!(matches!(Normalize::Lower.apply("plain"), Cow::Borrowed(_)));
        for name in ["none", "lower", "email", "digits"] {
            assert_eq!(Normalize::parse(name).unwrap().name(), name);
        }
        assert_eq!(Normalize::parse("LOWER"), Err(UnknownNormalize));
    }

    #[test]
    fn truncation() {
        assert_eq!(mac_bytes(256), Ok(32));
        assert_eq!(mac_bytes(8), Ok(1));
        assert_eq!(mac_bytes(64), Ok(8));
        for bad in [0, 7, 9, 264, -8] {
            assert_eq!(mac_bytes(bad), Err(BadBits));
        }
        let bk = BlindKey::new(&key(3), 9, "pii");
        let full = bk.term(Normalize::None, "v", 32);
        let short = bk.term(Normalize::None, "v", 4);
        assert_eq!(short.len(), HEADER_LEN + 4);
        assert_eq!(short[..], full[..HEADER_LEN + 4]);
    }

    #[test]
    fn current_terms_match_key_normalization_and_truncation() {
        let bk = BlindKey::new(&key(5), 8, "pii");
        let t = bk.term(Normalize::Email, "a@x.io", 32);
        assert_eq!(t[5], b'e');
        assert!(term_is_current(&t, 8, Normalize::Email, 32));
        assert!(!term_is_current(&t, 9, Normalize::Email, 32));
        assert!(!term_is_current(&t, 8, Normalize::Lower, 32));
        assert!(!term_is_current(&t, 8, Normalize::Email, 8));
    }

    #[test]
    fn equal_after_normalization() {
        let bk = BlindKey::new(&key(4), 3, "pii");
        assert_eq!(
            bk.term(Normalize::Email, " Alice@Example.COM ", 32),
            bk.term(Normalize::Email, "alice@example.com", 32)
        );
        assert_ne!(
            bk.term(Normalize::None, "Alice", 32),
            bk.term(Normalize::None, "alice", 32)
        );
    }

    #[test]
    fn term_key_id_rejects_other_shapes() {
        assert_eq!(term_key_id(b""), None);
        assert_eq!(term_key_id(&[1, 0, 0, 0, 1, b'n']), None);
        assert_eq!(term_key_id(&[2, 0, 0, 0, 1, b'n', 9]), None);
        assert_eq!(term_key_id(&[1, 0, 0, 1, 0, b'n', 9]), Some(256));
    }
}
