//! The version-1 ciphertext envelope (docs/DESIGN.md section 1).
//!
//! ```text
//! byte 0        format version, 0x01
//! bytes 1..5    key id, u32 big-endian (0 = raw key supplied by the caller)
//! bytes 5..17   96-bit nonce
//! bytes 17..n-16  AES-256-GCM ciphertext
//! bytes n-16..n   128-bit GCM tag
//! ```
//!
//! The text form is `mc1:` followed by standard, padded base64 (RFC 4648
//! section 4) of those bytes. Parsing never allocates more than the decoded
//! envelope and never looks at key material.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

pub const VERSION_1: u8 = 0x01;
pub const HEADER_LEN: usize = 5;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Header, nonce and tag: the envelope of an empty plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
pub const TEXT_PREFIX: &str = "mc1:";

/// Why bytes or text are not a version-1 envelope. These are format errors
/// (SQLSTATE 22P02), distinct from authentication failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    MissingPrefix,
    BadBase64,
    TooShort { len: usize },
    UnknownVersion(u8),
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::MissingPrefix => {
                write!(f, "text ciphertext does not start with \"{TEXT_PREFIX}\"")
            }
            FormatError::BadBase64 => write!(
                f,
                "text ciphertext is not valid padded standard base64 after \"{TEXT_PREFIX}\""
            ),
            FormatError::TooShort { len } => {
                write!(
                    f,
                    "envelope is {len} bytes long; a version-1 envelope has at least {OVERHEAD}"
                )
            }
            FormatError::UnknownVersion(v) => write!(
                f,
                "envelope format version {v} is not supported (expected 1)"
            ),
        }
    }
}

/// A parsed view of a version-1 envelope, borrowing the bytes.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub key_id: u32,
    /// Bytes 0..5: authenticated as the start of the GCM associated data.
    pub header: &'a [u8],
    pub nonce: &'a [u8],
    /// Ciphertext followed by the 16-byte tag.
    pub sealed: &'a [u8],
}

impl<'a> Envelope<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        // The version byte is checked first so that a future format with a
        // different minimum length is reported as "unknown version", not
        // as "too short".
        match bytes.first() {
            None => return Err(FormatError::TooShort { len: 0 }),
            Some(&VERSION_1) => {}
            Some(&v) => return Err(FormatError::UnknownVersion(v)),
        }
        if bytes.len() < OVERHEAD {
            return Err(FormatError::TooShort { len: bytes.len() });
        }
        Ok(Envelope {
            key_id: u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
            header: &bytes[..HEADER_LEN],
            nonce: &bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN],
            sealed: &bytes[HEADER_LEN + NONCE_LEN..],
        })
    }

    pub fn plaintext_len(&self) -> usize {
        self.sealed.len() - TAG_LEN
    }
}

/// The five header bytes for a key id.
pub fn header(key_id: u32) -> [u8; HEADER_LEN] {
    let id = key_id.to_be_bytes();
    [VERSION_1, id[0], id[1], id[2], id[3]]
}

/// `mc1:` + base64 of the envelope.
pub fn to_text(envelope: &[u8]) -> String {
    let mut out = String::with_capacity(TEXT_PREFIX.len() + envelope.len().div_ceil(3) * 4);
    out.push_str(TEXT_PREFIX);
    STANDARD.encode_string(envelope, &mut out);
    out
}

/// Decodes the text form into envelope bytes (not yet parsed).
pub fn from_text(text: &str) -> Result<Vec<u8>, FormatError> {
    let b64 = text
        .strip_prefix(TEXT_PREFIX)
        .ok_or(FormatError::MissingPrefix)?;
    // The STANDARD engine insists on canonical padding and rejects trailing
    // bits, so every envelope has exactly one text form.
    STANDARD.decode(b64).map_err(|_| FormatError::BadBase64)
}

/// Whether `text` is a well-formed version-1 text ciphertext: the CHECK of
/// the `encrypted_text` domain. Says nothing about whether it authenticates.
pub fn is_well_formed_text(text: &str) -> bool {
    // What from_text + Envelope::parse accept, without allocating: the
    // base64 is decoded in 4 KiB pieces into a stack buffer (a protected
    // column's CHECK runs this for every row written).
    let Some(body) = text.strip_prefix(TEXT_PREFIX) else {
        return false;
    };
    let body = body.as_bytes();
    if body.len() % 4 != 0 || body.len() / 4 * 3 < OVERHEAD {
        return false;
    }
    let mut buf = [0u8; 3072];
    let mut first = true;
    let mut total = 0;
    for piece in body.chunks(4096) {
        match STANDARD.decode_slice(piece, &mut buf) {
            Ok(n) => {
                if first && buf[0] != VERSION_1 {
                    return false;
                }
                first = false;
                total += n;
            }
            Err(_) => return false,
        }
    }
    total >= OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_text_agrees_with_parse() {
        let long = to_text(&sample(9, 10_000));
        for t in [
            to_text(&sample(1, 0)),
            to_text(&sample(1, 1)),
            to_text(&sample(7, 3070)),
            long.clone(),
            "mc1:".to_string(),
            "mc1:AQ==".to_string(),
            format!("{}=", to_text(&sample(1, 2))),
            format!("{}x", &long[..long.len() - 1]),
            to_text(&[2u8; 40]),
            "plaintext".to_string(),
            format!("{}====", to_text(&sample(1, 5))),
        ] {
            let slow = from_text(&t).is_ok_and(|b| Envelope::parse(&b).is_ok());
            assert_eq!(is_well_formed_text(&t), slow, "{t:.40}");
        }
    }

    fn sample(key_id: u32, ct_len: usize) -> Vec<u8> {
        let mut v = header(key_id).to_vec();
        v.extend(std::iter::repeat_n(7u8, NONCE_LEN + ct_len + TAG_LEN));
        v
    }

    #[test]
    fn parses_fields_at_their_offsets() {
        let mut bytes = sample(0x0102_0304, 3);
        bytes[5] = 0xaa;
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.key_id, 0x0102_0304);
        assert_eq!(env.header, &[1, 1, 2, 3, 4]);
        assert_eq!(env.nonce.len(), 12);
        assert_eq!(env.nonce[0], 0xaa);
        assert_eq!(env.sealed.len(), 3 + 16);
        assert_eq!(env.plaintext_len(), 3);
    }

    #[test]
    fn rejects_short_and_unknown_versions() {
        assert_eq!(
            Envelope::parse(&[]).unwrap_err(),
            FormatError::TooShort { len: 0 }
        );
        let short = sample(1, 0);
        assert!(Envelope::parse(&short).is_ok());
        assert_eq!(
            Envelope::parse(&short[..OVERHEAD - 1]).unwrap_err(),
            FormatError::TooShort { len: OVERHEAD - 1 }
        );
        let mut v2 = sample(1, 0);
        v2[0] = 2;
        assert_eq!(
            Envelope::parse(&v2).unwrap_err(),
            FormatError::UnknownVersion(2)
        );
    }

    #[test]
    fn text_form_round_trips_and_is_strict() {
        let bytes = sample(9, 10);
        let text = to_text(&bytes);
        assert!(text.starts_with("mc1:AQ"));
        assert_eq!(from_text(&text).unwrap(), bytes);
        assert!(is_well_formed_text(&text));
        assert_eq!(
            from_text("mc2:AAAA").unwrap_err(),
            FormatError::MissingPrefix
        );
        assert_eq!(from_text("mc1:AA-_").unwrap_err(), FormatError::BadBase64);
        assert_eq!(from_text("mc1:AAA").unwrap_err(), FormatError::BadBase64);
        assert_eq!(
            from_text(&format!("{text}\n")).unwrap_err(),
            FormatError::BadBase64
        );
        // Non-canonical trailing bits are refused: one envelope, one text.
        assert_eq!(from_text("mc1:AR==").unwrap_err(), FormatError::BadBase64);
        assert!(!is_well_formed_text("plain secret"));
        assert!(!is_well_formed_text("mc1:AQAAAA=="));
        assert!(!is_well_formed_text(""));
    }
}
