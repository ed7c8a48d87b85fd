//! Secret key material that is wiped from memory when dropped.
//!
//! Keys never implement `Debug` or `Display` with their bytes, so a stray
//! `{:?}` in an error path cannot leak them.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 256-bit key (data key, root key, or a Fernet key's two halves).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key32([u8; 32]);

/// The reason a byte string is not a usable 32-byte key. Carries only the
/// length, never the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadKeyLength(pub usize);

impl Key32 {
    pub const LEN: usize = 32;

    pub fn from_slice(bytes: &[u8]) -> Result<Self, BadKeyLength> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadKeyLength(bytes.len()))?;
        Ok(Key32(arr))
    }

    pub fn from_array(bytes: [u8; 32]) -> Self {
        Key32(bytes)
    }

    /// Parses exactly 64 hex characters (surrounding ASCII whitespace, such as
    /// the newline a file or a command's output ends with, is ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        let ok = hex::decode_to_slice(trimmed, &mut out).is_ok();
        let key = Key32(out);
        out.zeroize();
        ok.then_some(key)
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        use rand_core::{OsRng, RngCore};
        let mut k = Key32([0u8; 32]);
        OsRng.fill_bytes(&mut k.0);
        k
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_parsing_is_strict_about_length_and_digits() {
        let good = "00".repeat(31) + "ff";
        assert_eq!(Key32::from_hex(&good).unwrap().as_bytes()[31], 0xff);
        assert!(Key32::from_hex(&format!("{good}\n")).is_some());
        assert!(Key32::from_hex(&good[..62]).is_none());
        assert!(Key32::from_hex(&(good.clone() + "00")).is_none());
        assert!(Key32::from_hex(&("zz".to_string() + &good[2..])).is_none());
    }

    #[test]
    fn debug_never_shows_bytes() {
        let k = Key32::from_array([0xab; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.contains("ab") && !shown.contains("171"));
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(Key32::generate().as_bytes(), Key32::generate().as_bytes());
    }

    #[test]
    fn wrong_lengths_are_reported_without_bytes() {
        assert_eq!(Key32::from_slice(&[1u8; 16]).unwrap_err(), BadKeyLength(16));
        assert!(Key32::from_slice(&[1u8; 32]).is_ok());
    }
}
