//! What a stored text value is, without any key: the basis of
//! `column_status()` and of what the re-encryption procedures do per row.

use manna_crypt_core::envelope::{self, Envelope, TEXT_PREFIX};
use manna_crypt_core::fernet;
use pgrx::prelude::*;

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
    pub fn name(self) -> &'static str {
        match self {
            Class::Mc1(_) => "mc1",
            Class::Fernet => "fernet",
            Class::Malformed => "malformed",
            Class::Plaintext => "plaintext",
        }
    }
}

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
    // Every Fernet token starts with the version byte 0x80 followed by a
    // timestamp whose high bytes are zero for centuries: "gAAAAA".
    if value.starts_with("gAAAAA") {
        return if fernet::looks_like_token(value) {
            Class::Fernet
        } else {
            Class::Malformed
        };
    }
    Class::Plaintext
}

/// The class of a value: 'mc1', 'fernet', 'malformed' or 'plaintext'.
#[pg_extern(immutable, strict, parallel_safe)]
fn value_class(value: &str) -> &'static str {
    classify(value).name()
}
