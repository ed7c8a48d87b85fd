//! The pure crypto core of manna_crypt.
//!
//! Nothing in this crate knows about PostgreSQL: it is plain Rust, unit-tested
//! with `cargo test -p manna_crypt_core`. The extension's pgrx layer converts
//! SQL arguments, finds keys and turns the errors defined here into SQLSTATEs.
//!
//! - [`access`]: hour buckets and the file format of the key access statistics;
//! - [`envelope`]: the version-1 ciphertext format (binary and `mc1:` text form);
//! - [`aead`]: AES-256-GCM seal/open with the envelope header bound into the AAD;
//! - [`blind`]: blind index terms (keyed HMAC-SHA256 of normalized values);
//! - [`budget`]: the nonce budget of a data key, blocks and durable marks
//!   for counting encryptions, and the counter file format;
//! - [`nonce`]: per-process CSPRNG for 96-bit nonces, safe across `fork()`;
//! - [`keywrap`]: data keys wrapped under the root key, and the key check value;
//! - [`fernet`]: reading (and, for tests, writing) legacy Fernet tokens;
//! - [`secret`]: a 32-byte key type that is wiped when dropped;
//! - [`names`]: the rule for keyring names;
//! - [`classify`]: what a stored text value is (ciphertext, token, plaintext);
//! - [`sqllex`]: a lexer that cannot fail, to redact literals in logged SQL.

pub mod access;
pub mod aead;
pub mod blind;
pub mod budget;
pub mod classify;
pub mod envelope;
pub mod fernet;
pub mod keywrap;
pub mod names;
pub mod nonce;
pub mod secret;
pub mod sqllex;
