//! In-place re-encryption of columns (DESIGN.md section 4).
//!
//! - [`classify`]: what a stored value is (ciphertext, Fernet, plaintext, malformed);
//! - [`engine`]: the batch engine behind the three procedures;
//! - [`registry`]: the columns manna_crypt knows hold ciphertexts, so that a
//!   key still in use cannot be revoked or destroyed by accident.

pub mod classify;
pub mod engine;
pub mod registry;
