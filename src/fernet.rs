//! `decrypt_fernet(token, keyring)`: read a legacy Fernet token with the keys
//! imported into a Fernet keyring, tried newest first like `MultiFernet`.

use manna_crypt_core::fernet::Token;
use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::datum::SecretText;
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::keys::cache;

/// Decrypts a token with the keyring's keys. The plaintext is wiped on drop.
pub fn open_token(token: &str, keyring: &str) -> McResult<Zeroizing<Vec<u8>>> {
    open_parsed(&Token::parse(token)?, keyring)
}

/// Decrypts an already parsed token with the keyring's keys.
pub fn open_parsed(token: &Token, keyring: &str) -> McResult<Zeroizing<Vec<u8>>> {
    let keys = cache::fernet_keys(keyring)?;
    let (_, plaintext) = token.decrypt(keys.iter().map(|(_, k)| k))?;
    Ok(plaintext)
}

#[pg_extern(stable, parallel_safe)]
fn decrypt_fernet(token: Option<&str>, keyring: Option<&str>) -> Option<SecretText> {
    let keyring = not_null(keyring, "keyring");
    let token = token?;
    let plaintext = open_token(token, keyring).or_raise();
    Some(
        SecretText::from_utf8(plaintext)
            .ok_or(McError::NotUtf8)
            .or_raise(),
    )
}
