//! `decrypt_fernet(token, keyring)`: read a legacy Fernet token with the keys
//! imported into a Fernet keyring, tried newest first like `MultiFernet`.

use pgrx::prelude::*;

use crate::crypto::open_token;
use crate::error::{not_null, McError, OrRaise};
use crate::pg::datum::SecretText;

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
