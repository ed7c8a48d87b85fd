//! What a stored text value is, without any key: the basis of
//! `column_status()` and of what the re-encryption procedures do per row.

use crate::envelope::{self, Envelope, TEXT_PREFIX};
use crate::fernet::{self, TOKEN_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A well-formed version-1 text ciphertext under this key id.
    Mc1(u32),
    /// A well-formed Fernet token.
    Fernet,
    /// Starts like a ciphertext or token but does not parse.
    Malformed,
    /// Anything else.
    Plaintext,
}

impl Class {
    /// The name `value_class()` and `column_status()` report.
    pub fn name(self) -> &'static str {
        match self {
            Class::Mc1(_) => "mc1",
            Class::Fernet => "fernet",
            Class::Malformed => "malformed",
            Class::Plaintext => "plaintext",
        }
    }
}

/// Classifies a value by its shape alone.
pub fn classify(value: &str) -> Class {
    if value.starts_with(TEXT_PREFIX) {
        return match envelope::from_text(value)
            .ok()
            .and_then(|b| Envelope::parse(&b).ok().map(|e| e.key_id))
        {
            Some(id) => Class::Mc1(id),
            None => Class::Malformed,
        };
    }
    if value.starts_with(TOKEN_PREFIX) {
        return if fernet::looks_like_token(value) {
            Class::Fernet
        } else {
            Class::Malformed
        };
    }
    Class::Plaintext
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fernet::{encrypt_with, FernetKey};

    #[test]
    fn classes() {
        let env = crate::aead::seal(
            &crate::aead::Cipher::new(&crate::secret::Key32::from_array([7; 32])),
            42,
            [1; 12],
            b"",
            b"x",
        );
        assert_eq!(classify(&envelope::to_text(&env)), Class::Mc1(42));
        let key = FernetKey::from_key32(crate::secret::Key32::from_array([3; 32]));
        assert_eq!(
            classify(&encrypt_with(&key, 1, &[0; 16], b"x")),
            Class::Fernet
        );
        assert_eq!(classify("mc1:not base64!"), Class::Malformed);
        assert_eq!(classify("gAAAAAhello"), Class::Malformed);
        assert_eq!(classify("hello"), Class::Plaintext);
        assert_eq!(classify(""), Class::Plaintext);
    }
}
