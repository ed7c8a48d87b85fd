//! Legacy Fernet tokens (<https://github.com/fernet/spec>), as written by
//! Python's `cryptography.fernet`.
//!
//! ```text
//! token = base64url( 0x80 ‖ timestamp u64 BE ‖ IV(16) ‖ AES-128-CBC-PKCS7(ct) ‖ HMAC-SHA256(32) )
//! key   = base64url( signing key(16) ‖ encryption key(16) )
//! ```
//!
//! The HMAC covers everything before it and is verified, in constant time,
//! before any decryption: a padding error is only possible once the MAC has
//! passed, so no padding oracle exists. The timestamp is not checked against
//! a TTL: stored data is old by nature, and the migration reads it once.
//! Several keys can be tried in order, like `MultiFernet`.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyIvInit};
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Key32;

const VERSION: u8 = 0x80;
/// How every Fernet token's text begins: the version byte 0x80 followed by a
/// timestamp whose high bytes are zero for centuries, in base64url.
pub const TOKEN_PREFIX: &str = "gAAAAA";
const HEADER_LEN: usize = 1 + 8 + 16;
const MAC_LEN: usize = 32;
const BLOCK: usize = 16;
/// The shortest token: header, one cipher block (PKCS7 always pads), MAC.
pub const MIN_TOKEN_BYTES: usize = HEADER_LEN + BLOCK + MAC_LEN;

/// Python pads its base64; other Fernet libraries do not. Accept both, decode
/// the URL-safe alphabet only.
const B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_encode_padding(true),
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FernetError {
    /// Not a Fernet token at all: bad base64, wrong version, bad length.
    Malformed(&'static str),
    /// No key's HMAC matched, or the padding was bad after a valid MAC.
    Unauthenticated,
}

/// A Fernet key: signing half and encryption half, wiped on drop.
#[derive(Clone)]
pub struct FernetKey {
    key: Key32,
    /// The AES-128 key schedule of the encryption half, expanded once per
    /// key rather than once per token (wiped on drop: `aes` is built with
    /// its `zeroize` feature).
    decrypt: aes::Aes128,
}

impl FernetKey {
    /// Parses the usual 44-character base64url key.
    pub fn parse(text: &str) -> Option<Self> {
        let mut raw = B64.decode(text.trim()).ok()?;
        let key = Key32::from_slice(&raw).ok().map(FernetKey::from_key32);
        raw.zeroize();
        key
    }

    pub fn from_key32(key: Key32) -> Self {
        let decrypt = <aes::Aes128 as aes::cipher::KeyInit>::new_from_slice(&key.as_bytes()[16..])
            .expect("16-byte AES-128 key");
        FernetKey { key, decrypt }
    }

    pub fn as_key32(&self) -> &Key32 {
        &self.key
    }

    fn signing(&self) -> &[u8] {
        &self.key.as_bytes()[..16]
    }

    fn encryption(&self) -> &[u8] {
        &self.key.as_bytes()[16..]
    }

    fn mac(&self, data: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.signing())
            .expect("HMAC takes any key length");
        mac.update(data);
        mac
    }
}

/// A token's bytes, checked for shape but not yet authenticated.
pub struct Token {
    raw: Vec<u8>,
}

impl Token {
    pub fn parse(text: &str) -> Result<Self, FernetError> {
        let raw = B64
            .decode(text)
            .map_err(|_| FernetError::Malformed("token is not valid base64url"))?;
        if raw.first() != Some(&VERSION) {
            return Err(FernetError::Malformed(
                "token does not start with the Fernet version byte 0x80",
            ));
        }
        if raw.len() < HEADER_LEN + MAC_LEN {
            return Err(FernetError::Malformed("token is too short"));
        }
        if !(raw.len() - HEADER_LEN - MAC_LEN).is_multiple_of(BLOCK) {
            return Err(FernetError::Malformed(
                "token ciphertext is not a whole number of AES blocks",
            ));
        }
        if raw.len() < MIN_TOKEN_BYTES {
            return Err(FernetError::Malformed("token has no ciphertext block"));
        }
        Ok(Token { raw })
    }

    pub fn timestamp(&self) -> u64 {
        u64::from_be_bytes(self.raw[1..9].try_into().expect("length checked in parse"))
    }

    /// Whether `key` signed this token (its HMAC verifies, compared in
    /// constant time). Fernet tokens name no key: this is how to tell which
    /// key a stored token needs, without decrypting it.
    pub fn signed_by(&self, key: &FernetKey) -> bool {
        let (signed, tag) = self.raw.split_at(self.raw.len() - MAC_LEN);
        key.mac(signed).verify_slice(tag).is_ok()
    }

    /// Tries each key in order; returns the index of the key that opened the
    /// token and the plaintext (wiped on drop).
    pub fn decrypt<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k FernetKey>,
    ) -> Result<(usize, Zeroizing<Vec<u8>>), FernetError> {
        let signed = &self.raw[..self.raw.len() - MAC_LEN];
        let iv = &signed[9..HEADER_LEN];
        let ct = &signed[HEADER_LEN..];
        for (i, key) in keys.into_iter().enumerate() {
            if !self.signed_by(key) {
                continue;
            }
            let mut buf = Zeroizing::new(ct.to_vec());
            let dec = cbc::Decryptor::<aes::Aes128>::inner_iv_slice_init(key.decrypt.clone(), iv)
                .map_err(|_| FernetError::Unauthenticated)?;
            let n = dec
                .decrypt_padded_mut::<Pkcs7>(&mut buf)
                .map_err(|_| FernetError::Unauthenticated)?
                .len();
            buf.truncate(n);
            return Ok((i, buf));
        }
        Err(FernetError::Unauthenticated)
    }
}

/// Whether `text` has the shape of a Fernet token (no key needed). Used to
/// classify column values.
pub fn looks_like_token(text: &str) -> bool {
    text.starts_with(TOKEN_PREFIX) && Token::parse(text).is_ok()
}

/// Writes a token with a given timestamp and IV. The extension never writes
/// Fernet; this exists to check the spec's `generate` vectors and to build
/// test data.
pub fn encrypt_with(key: &FernetKey, timestamp: u64, iv: &[u8; 16], plaintext: &[u8]) -> String {
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + BLOCK + MAC_LEN);
    out.push(VERSION);
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(iv);
    let enc = cbc::Encryptor::<aes::Aes128>::new_from_slices(key.encryption(), iv)
        .expect("16-byte key and IV");
    out.extend_from_slice(&enc.encrypt_padded_vec_mut::<Pkcs7>(plaintext));
    let tag = key.mac(&out).finalize().into_bytes();
    out.extend_from_slice(&tag);
    B64.encode(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors(name: &str) -> Vec<Value> {
        // Public test vectors from the Fernet spec; see tests/vectors/README.md.
        let path = format!(
            "{}/../tests/vectors/fernet/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn s<'a>(v: &'a Value, k: &str) -> &'a str {
        v[k].as_str().unwrap()
    }

    #[test]
    fn spec_generate_vectors() {
        for v in vectors("generate") {
            let key = FernetKey::parse(s(&v, "secret")).unwrap();
            let iv: Vec<u8> = v["iv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            // 1985-10-26T01:20:00-07:00
            let token = encrypt_with(
                &key,
                499_162_800,
                &iv.try_into().unwrap(),
                s(&v, "src").as_bytes(),
            );
            assert_eq!(token, s(&v, "token"));
        }
    }

    #[test]
    fn spec_verify_vectors() {
        for v in vectors("verify") {
            let key = FernetKey::parse(s(&v, "secret")).unwrap();
            let (i, pt) = Token::parse(s(&v, "token"))
                .unwrap()
                .decrypt([&key])
                .unwrap();
            assert_eq!(i, 0);
            assert_eq!(&pt[..], s(&v, "src").as_bytes());
            let token = Token::parse(s(&v, "token")).unwrap();
            assert!(token.signed_by(&key));
            assert!(!token.signed_by(&FernetKey::from_key32(Key32::from_array([5; 32]))));
        }
    }

    #[test]
    fn spec_invalid_vectors_without_ttl() {
        // The last two cases (clock skew, expired TTL) concern token age,
        // which stored data does not check; the other six must fail.
        let mut failed = 0;
        for v in vectors("invalid") {
            let desc = s(&v, "desc");
            if desc.contains("TTL") || desc.contains("far-future") {
                continue;
            }
            let key = FernetKey::parse(s(&v, "secret")).unwrap();
            let res = Token::parse(s(&v, "token")).and_then(|t| t.decrypt(&[key]));
            assert!(res.is_err(), "{desc} must be rejected");
            failed += 1;
        }
        assert_eq!(failed, 6);
    }

    #[test]
    fn multi_key_tries_in_order() {
        let a = FernetKey::from_key32(Key32::generate());
        let b = FernetKey::from_key32(Key32::generate());
        let t = encrypt_with(&b, 1, &[3; 16], b"rotated");
        let tok = Token::parse(&t).unwrap();
        let (i, pt) = tok.decrypt(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((i, &pt[..]), (1, &b"rotated"[..]));
        assert_eq!(tok.decrypt(&[a]).unwrap_err(), FernetError::Unauthenticated);
        assert_eq!(tok.timestamp(), 1);
    }

    #[test]
    fn shapes() {
        let k = FernetKey::from_key32(Key32::generate());
        let t = encrypt_with(&k, 1_700_000_000, &[9; 16], b"");
        assert!(looks_like_token(&t));
        assert!(looks_like_token(t.trim_end_matches('=')));
        assert!(!looks_like_token("gAAAAAhello"));
        assert!(!looks_like_token("mc1:AQAAAA"));
        assert!(matches!(
            Token::parse("%%%"),
            Err(FernetError::Malformed(_))
        ));
        assert!(FernetKey::parse("short").is_none());
    }
}
