//! Keyring names: what a DBA types, what appears in logs and audit rows.
//!
//! A name is a lowercase SQL identifier of at most 63 bytes (PostgreSQL's
//! identifier limit): unambiguous in SQL without quoting, and too narrow a
//! shape to carry anything secret-like. The key tables enforce the same rule
//! with a CHECK (`^[a-z][a-z0-9_]{0,62}$`).

/// The longest keyring name, in bytes.
pub const MAX_LEN: usize = 63;

/// Why a keyring name was refused. Carries the length only, never the name:
/// a mistyped argument may be a secret pasted into the wrong place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadName {
    pub len: usize,
}

/// Checks a keyring name.
pub fn check_keyring_name(name: &str) -> Result<(), BadName> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BadName { len: bytes.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_lowercase_identifiers() {
        for name in ["a", "plaid_tokens", "pii2", &"x".repeat(MAX_LEN)] {
            assert_eq!(check_keyring_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_everything_else_with_its_length() {
        for name in [
            "",
            "1abc",
            "_x",
            "Pii",
            "a-b",
            "a b",
            "ä",
            &"x".repeat(MAX_LEN + 1),
        ] {
            assert_eq!(
                check_keyring_name(name),
                Err(BadName { len: name.len() }),
                "{name}"
            );
        }
    }
}
