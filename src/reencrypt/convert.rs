//! What a run does with one value: the mode of a run, the keys a batch
//! needs, and [`convert`], which parses each value once and decides.

use std::collections::HashSet;

use manna_crypt_core::classify::{classify, Class};
use manna_crypt_core::envelope::{self, Envelope};
use manna_crypt_core::fernet::{Token, TOKEN_PREFIX};
use zeroize::Zeroizing;

use std::rc::Rc;

use manna_crypt_core::blind;

use crate::crypto::{
    engine_term, index_term, open_parsed_token, open_value_prechecked, seal_verified, TermShape,
};
use crate::error::{McError, McResult};
use crate::keys::access_stats::AccessOp;
use crate::keys::cache::{self, ActiveKey, IndexRing};
use crate::keys::grants::{self, Privilege};
use crate::keys::store;
use crate::pg::datum::is_text;
use crate::pg::security::{run_as, Identity};

/// Which procedure a run serves, with its keyrings.
#[derive(Clone)]
pub enum Mode {
    MigrateFernet {
        source: String,
        target: String,
    },
    Rewrap {
        keyring: String,
    },
    Encrypt {
        keyring: String,
    },
    /// Fill a protected column's blind-index column (quoted in
    /// `index_sql`) with terms under the keyring's active index key.
    BlindIndex {
        keyring: String,
        index_sql: String,
        shape: TermShape,
    },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::MigrateFernet { .. } => "migrate_fernet",
            Mode::Rewrap { .. } => "rewrap_column",
            Mode::Encrypt { .. } => "encrypt_column",
            Mode::BlindIndex { .. } => "backfill_blind_index",
        }
    }

    pub fn target(&self) -> &str {
        match self {
            Mode::MigrateFernet { target, .. } => target,
            Mode::Rewrap { keyring }
            | Mode::Encrypt { keyring }
            | Mode::BlindIndex { keyring, .. } => keyring,
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
    /// their own): decrypt on the source, encrypt on the target; a
    /// backfill decrypts and computes terms.
    pub fn check_access(&self, role: pgrx::pg_sys::Oid) -> McResult<()> {
        let decrypt_from = match self {
            Mode::MigrateFernet { source, .. } => Some(source.as_str()),
            Mode::Rewrap { keyring } => Some(keyring.as_str()),
            Mode::Encrypt { .. } => None,
            Mode::BlindIndex { keyring, .. } => {
                grants::require_for(role, keyring, Privilege::Decrypt)?;
                return grants::require_for(role, keyring, Privilege::BlindIndex);
            }
        };
        if let Some(source) = decrypt_from {
            grants::require_for(role, source, Privilege::Decrypt)?;
        }
        grants::require_for(role, self.target(), Privilege::Encrypt)
    }

    /// Whether every `mc1:` value is already in target form (so a cheap
    /// prefix test can skip it); for a rewrap only the active key's are.
    pub fn any_mc1_is_done(&self) -> bool {
        !matches!(self, Mode::Rewrap { .. } | Mode::BlindIndex { .. })
    }
}

/// What one batch needs from the key cache, fetched once per batch.
pub struct Keys {
    /// The active data key's id (for a backfill: the active index key's).
    pub target_id: u32,
    /// The active data key; `None` for a backfill, which encrypts nothing.
    pub target: Option<ActiveKey>,
    /// A backfill's index keys.
    pub index: Option<Rc<IndexRing>>,
    pub target_ring: String,
    /// Rewrap: every key id of the keyring.
    pub ring_ids: HashSet<u32>,
}

impl Keys {
    pub fn fetch(mode: &Mode) -> McResult<Keys> {
        if let Mode::BlindIndex { keyring, shape, .. } = mode {
            let ring = cache::index_ring(keyring)?;
            let target_id = match ring.live.first() {
                Some(key) if ring.has_active => key.key_id(),
                // Fails here, before any row: the keyring's error for it.
                _ => {
                    return Err(index_term(keyring, *shape, "")
                        .err()
                        .unwrap_or_else(|| McError::Internal("no active index key".into())))
                }
            };
            return Ok(Keys {
                target_id,
                target: None,
                index: Some(ring),
                target_ring: keyring.clone(),
                ring_ids: HashSet::new(),
            });
        }
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
            target: Some(target),
            index: None,
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
        Ok(pt) => {
            let Some(target) = &keys.target else {
                return fail(class, "internal: no target key for this run");
            };
            match seal_verified(target, &keys.target_ring, &pt, aad) {
                Ok(text) => Outcome::Convert(text),
                Err(e) => Outcome::Fail(class, e.message()),
            }
        }
        Err(e) => Outcome::Fail(class, e.message()),
    }
}

/// Decides what to do with one value, parsing it once. `current` is the
/// row's blind-index term (a backfill only).
pub fn convert(
    mode: &Mode,
    keys: &Keys,
    value: &str,
    aad: &[u8],
    current: Option<&[u8]>,
) -> Outcome {
    match mode {
        Mode::BlindIndex { shape, .. } => index(keys, *shape, value, aad, current),
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

/// A backfill's decision: a term under the active index key, of the
/// column's normalization and truncation, is done; otherwise the
/// ciphertext is opened under the row's AAD and its term computed, as hex
/// for the batch's SET (`decode(.., 'hex')`).
fn index(
    keys: &Keys,
    shape: TermShape,
    value: &str,
    aad: &[u8],
    current: Option<&[u8]>,
) -> Outcome {
    let done = current
        .is_some_and(|t| blind::term_is_current(t, keys.target_id, shape.normalize, shape.mac_len));
    if done {
        return Outcome::Already;
    }
    if !value.starts_with(envelope::TEXT_PREFIX) {
        return fail(
            classify(value),
            "not a manna_crypt ciphertext: encrypt the column first (encrypt_column)",
        );
    }
    let Ok(bytes) = envelope::from_text(value) else {
        return fail(Class::Malformed, MALFORMED);
    };
    let class = Envelope::parse(&bytes).map_or(Class::Malformed, |e| Class::Mc1(e.key_id));
    let plaintext = match open_value_prechecked(&bytes, aad) {
        Ok(p) => p,
        Err(e) => return Outcome::Fail(class, e.message()),
    };
    let Ok(text) = std::str::from_utf8(&plaintext) else {
        return fail(class, "plaintext is not UTF-8 text");
    };
    let Some((ring, key)) = keys.index.as_ref().and_then(|r| Some((r, r.live.first()?))) else {
        return fail(class, "internal: no index key for this run");
    };
    ring.access.record(AccessOp::BlindIndex, key.key_id());
    Outcome::Convert(hex::encode(engine_term(key, shape, text)))
}
