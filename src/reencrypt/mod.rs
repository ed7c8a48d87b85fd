//! In-place re-encryption of columns (DESIGN.md section 4).
//!
//! - [`registry`]: the columns manna_crypt knows hold ciphertexts, so that a
//!   key still in use cannot be revoked or destroyed by accident.

pub mod registry;
