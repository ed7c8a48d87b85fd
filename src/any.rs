//! `decrypt_any(value, aad, fernet_keyring)`: one read for the migration
//! window (docs/DESIGN.md section 7.3), when a column holds Fernet tokens
//! and `mc1:` ciphertexts side by side — between `migrate_fernet` and the
//! application's switch, or while a run is going on.
//!
//! The form is decided by the value's prefix alone, never by trying keys:
//! an `mc1:` value is read exactly as `decrypt_gcm(value, aad)` reads it
//! (a malformed one is that function's 22P02), a Fernet token exactly as
//! `decrypt_fernet(value, fernet_keyring)` does. Anything else — plaintext,
//! or a token while no Fernet keyring is named — is 22P02 naming the forms
//! it accepts, never the value: a column that still holds plaintext must
//! fail loudly, not be returned as if it had been decrypted.
//!
//! A Fernet token has no associated data, so `aad` only applies to `mc1:`
//! values; the Fernet keyring is looked up only when a token is met.

use manna_crypt_core::envelope::{self, TEXT_PREFIX};
use manna_crypt_core::fernet::TOKEN_PREFIX;
use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::crypto::{open_token, open_value};
use crate::error::{McError, McResult, OrRaise};
use crate::pg::datum::SecretText;

/// What `decrypt_any` accepts, for the error it raises on anything else.
const ACCEPTS: &str = "an mc1: ciphertext, or a Fernet token when fernet_keyring is given";

fn not_accepted(detail: &str, hint: Option<&str>) -> McError {
    McError::NotCiphertext {
        message: format!("decrypt_any accepts {ACCEPTS}"),
        detail: detail.into(),
        hint: hint.map(Into::into),
    }
}

fn open_any(value: &str, aad: &[u8], fernet_keyring: Option<&str>) -> McResult<Zeroizing<Vec<u8>>> {
    if value.starts_with(TEXT_PREFIX) {
        return open_value(None, &envelope::from_text(value)?, aad);
    }
    if !value.starts_with(TOKEN_PREFIX) {
        return Err(not_accepted(
            "the value is neither (it has no mc1: or Fernet prefix)",
            None,
        ));
    }
    match fernet_keyring {
        Some(keyring) => open_token(value, keyring),
        None => Err(not_accepted(
            "the value starts like a Fernet token, and fernet_keyring is NULL",
            Some("pass the Fernet keyring: decrypt_any(value, aad, 'legacy_fernet')"),
        )),
    }
}

#[pg_extern(stable, parallel_safe)]
fn decrypt_any(
    value: Option<&str>,
    aad: default!(Option<&str>, "NULL"),
    fernet_keyring: default!(Option<&str>, "NULL"),
) -> Option<SecretText> {
    let value = value?;
    let aad = aad.map(str::as_bytes).unwrap_or(b"");
    let plaintext = open_any(value, aad, fernet_keyring).or_raise();
    Some(
        SecretText::from_utf8(plaintext)
            .ok_or(McError::NotUtf8)
            .or_raise(),
    )
}
