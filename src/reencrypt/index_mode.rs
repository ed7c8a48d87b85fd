//! The blind-index side of the re-encryption engine: the backfill's mode,
//! read from the column's protection, and whether a column's writes are
//! indexed (so a run on it needs the caller's `blind_index` privilege).

use pgrx::pg_sys;

use super::convert::Mode;
use crate::error::{McError, McResult};

/// The keyring and blind-index column of `tbl.col`, if it is protected
/// with a blind index.
pub fn indexed_by(oid: pg_sys::Oid, col: &str) -> McResult<Option<(String, String)>> {
    Ok(crate::protect::config::protection(oid, col)?
        .and_then(|p| p.index.map(|(index_col, _, _)| (p.keyring, index_col))))
}

/// A backfill works from the column's protection: its keyring, AAD column
/// and blind-index column with its normalization and bits.
pub fn blind_index_mode(oid: pg_sys::Oid, col: &str) -> McResult<Mode> {
    let not_indexed = || {
        McError::bad_arg(format!(
            "column \"{col}\" is not a protected column with a blind index"
        ))
    };
    let protection = crate::protect::config::protection(oid, col)?.ok_or_else(not_indexed)?;
    let (index_col, normalize, bits) = protection.index.ok_or_else(not_indexed)?;
    Ok(Mode::BlindIndex {
        keyring: protection.keyring,
        index_sql: pgrx::spi::quote_identifier(&index_col),
        shape: crate::crypto::TermShape::parse(&normalize, bits)?,
    })
}
