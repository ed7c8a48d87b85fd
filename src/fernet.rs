//! `decrypt_fernet(token, keyring)`: read a legacy Fernet token with the keys
//! imported into a Fernet keyring, tried newest first like `MultiFernet`.

use manna_crypt_core::fernet::Token;
use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::datum::SecretText;
use crate::error::{McError, McResult, OrRaise};
use crate::keys::cache;

/// Decrypts a token with the keyring's keys. The plaintext is wiped on drop.
pub fn open_token(token: &str, keyring: &str) -> McResult<Zeroizing<Vec<u8>>> {
    let keys = cache::fernet_keys(keyring)?;
    let parsed = Token::parse(token)?;
    let (_, plaintext) = parsed.decrypt(keys.iter().map(|(_, k)| k))?;
    Ok(plaintext)
}

#[pg_extern(stable, parallel_safe)]
fn decrypt_fernet(token: Option<&str>, keyring: Option<&str>) -> Option<SecretText> {
    let keyring = keyring
        .ok_or_else(|| McError::bad_arg("keyring must not be null"))
        .or_raise();
    let token = token?;
    let plaintext = open_token(token, keyring).or_raise();
    Some(
        SecretText::from_utf8(plaintext)
            .ok_or(McError::NotUtf8)
            .or_raise(),
    )
}
