//! What a run does with one value: the mode of a run, the keys a batch
//! needs, and [`convert`], which parses each value once and decides.

use std::collections::HashSet;

use manna_crypt_core::classify::{classify, Class};
use manna_crypt_core::envelope::{self, Envelope};
use manna_crypt_core::fernet::{Token, TOKEN_PREFIX};
use zeroize::Zeroizing;

use crate::crypto::{open_parsed_token, open_value_prechecked, seal_verified};
use crate::error::McResult;
use crate::keys::cache::{self, ActiveKey};
use crate::keys::grants::{self, Privilege};
use crate::keys::store;
use crate::pg::datum::is_text;
use crate::pg::security::{run_as, Identity};

/// Which procedure a run serves, with its keyrings.
#[derive(Clone)]
pub enum Mode {
    MigrateFernet { source: String, target: String },
    Rewrap { keyring: String },
    Encrypt { keyring: String },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::MigrateFernet { .. } => "migrate_fernet",
            Mode::Rewrap { .. } => "rewrap_column",
            Mode::Encrypt { .. } => "encrypt_column",
        }
    }

    pub fn target(&self) -> &str {
        match self {
            Mode::MigrateFernet { target, .. } => target,
            Mode::Rewrap { keyring } | Mode::Encrypt { keyring } => keyring,
        }
    }

    pub fn source(&self) -> Option<&str> {
        match self {
            Mode::MigrateFernet { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The caller's keyring privileges, judged before any switch to the
    /// table's owner (the batches then open and seal without a check of
    /// their own): decrypt on the source, encrypt on the target.
    pub fn check_access(&self, role: pgrx::pg_sys::Oid) -> McResult<()> {
        let decrypt_from = match self {
            Mode::MigrateFernet { source, .. } => Some(source.as_str()),
            Mode::Rewrap { keyring } => Some(keyring.as_str()),
            Mode::Encrypt { .. } => None,
        };
        if let Some(source) = decrypt_from {
            grants::require_for(role, source, Privilege::Decrypt)?;
        }
        grants::require_for(role, self.target(), Privilege::Encrypt)
    }

    /// Whether every `mc1:` value is already in target form (so a cheap
    /// prefix test can skip it); for a rewrap only the active key's are.
    pub fn any_mc1_is_done(&self) -> bool {
        !matches!(self, Mode::Rewrap { .. })
    }
}

/// What one batch needs from the key cache, fetched once per batch.
pub struct Keys {
    pub target_id: u32,
    pub target: ActiveKey,
    pub target_ring: String,
    /// Rewrap: every key id of the keyring.
    pub ring_ids: HashSet<u32>,
}

impl Keys {
    pub fn fetch(mode: &Mode) -> McResult<Keys> {
        let target = cache::active_key(mode.target())?;
        // A key that cannot be counted stops the batch here rather than
        // failing every row (not preloaded, or the counters' table full).
        target.tally.attach()?;
        let ring_ids = match mode {
            Mode::Rewrap { keyring } => {
                run_as(Identity::ExtensionOwner, || store::ring_key_ids(keyring))?
                    .into_iter()
                    .collect()
            }
            _ => HashSet::new(),
        };
        Ok(Keys {
            target_id: target.key_id,
            target,
            target_ring: mode.target().to_owned(),
            ring_ids,
        })
    }
}

/// The decision for one value.
pub enum Outcome {
    /// Already in target form: left alone, not counted as converted.
    Already,
    /// Rewrap: a ciphertext of another keyring, left alone.
    OtherKeyring,
    /// The new value, sealed and verified.
    Convert(String),
    /// Cannot be converted: left alone and recorded, with the reason.
    Fail(Class, String),
}

const MALFORMED: &str = "starts like a ciphertext or Fernet token but does not parse";

fn fail(class: Class, reason: &str) -> Outcome {
    Outcome::Fail(class, reason.into())
}

fn seal(keys: &Keys, class: Class, plaintext: McResult<Zeroizing<Vec<u8>>>, aad: &[u8]) -> Outcome {
    match plaintext {
        Ok(pt) if !is_text(&pt) => fail(
            class,
            "plaintext is not UTF-8 text or contains a NUL byte; \
             decrypt_gcm could not return it as text",
        ),
        Ok(pt) => match seal_verified(&keys.target, &keys.target_ring, &pt, aad) {
            Ok(text) => Outcome::Convert(text),
            Err(e) => Outcome::Fail(class, e.message()),
        },
        Err(e) => Outcome::Fail(class, e.message()),
    }
}

/// Decides what to do with one value, parsing it once.
pub fn convert(mode: &Mode, keys: &Keys, value: &str, aad: &[u8]) -> Outcome {
    match mode {
        Mode::MigrateFernet { source, .. } => {
            if value.starts_with(TOKEN_PREFIX) {
                return match Token::parse(value) {
                    Ok(token) => seal(keys, Class::Fernet, open_parsed_token(&token, source), aad),
                    Err(_) => fail(Class::Malformed, MALFORMED),
                };
            }
            match classify(value) {
                Class::Mc1(_) => Outcome::Already,
                Class::Malformed => fail(Class::Malformed, MALFORMED),
                class => fail(class, "not a Fernet token: plaintext or an unknown format"),
            }
        }
        Mode::Encrypt { .. } => match classify(value) {
            Class::Mc1(_) => Outcome::Already,
            Class::Plaintext => seal(
                keys,
                Class::Plaintext,
                Ok(Zeroizing::new(value.as_bytes().to_vec())),
                aad,
            ),
            Class::Fernet => fail(
                Class::Fernet,
                "looks like a Fernet token; use migrate_fernet to convert it",
            ),
            Class::Malformed => fail(Class::Malformed, MALFORMED),
        },
        Mode::Rewrap { .. } => rewrap(keys, value, aad),
    }
}

fn rewrap(keys: &Keys, value: &str, aad: &[u8]) -> Outcome {
    if !value.starts_with(envelope::TEXT_PREFIX) {
        return fail(classify(value), "not a manna_crypt ciphertext");
    }
    let Ok(bytes) = envelope::from_text(value) else {
        return fail(Class::Malformed, MALFORMED);
    };
    let Ok(key_id) = Envelope::parse(&bytes).map(|e| e.key_id) else {
        return fail(Class::Malformed, MALFORMED);
    };
    if key_id == keys.target_id {
        Outcome::Already
    } else if keys.ring_ids.contains(&key_id) {
        seal(
            keys,
            Class::Mc1(key_id),
            open_value_prechecked(&bytes, aad),
            aad,
        )
    } else {
        Outcome::OtherKeyring
    }
}
