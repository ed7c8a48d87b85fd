//! Blind indexes (README "Blind indexes", docs/DESIGN.md 7.4): equality
//! search over encrypted columns through a keyed hash column.
//!
//! - `blind_index(value, keyring, normalization, bits)`: the term under the
//!   keyring's active index key, for writing (the protect trigger fills a
//!   blind-index column with it) and for lookups outside a rotation;
//! - `blind_index_all(...)`: the terms under every live index key, for
//!   `WHERE col_bidx = ANY(manna_crypt.blind_index_all(...))`, which keeps
//!   matching every row while a rotation's backfill is under way;
//! - `blind_normalize(value, normalization)`: the normalized value, for the
//!   recheck a truncated index needs.
//!
//! Volatility: STABLE, never IMMUTABLE — a rotation changes the result —
//! so `col = blind_index($1, 'pii')` is an index condition evaluated once
//! per scan, in custom and generic plans. PARALLEL SAFE: each worker has
//! its own key cache. Not STRICT, for the same reason as `encrypt_gcm`: a
//! NULL value gives NULL, a NULL keyring, normalization or truncation is an
//! error.

use pgrx::prelude::*;

use crate::crypto::{index_term, index_terms_all, TermShape};
use crate::error::{not_null, OrRaise};

fn shape(normalization: Option<&str>, bits: Option<i32>) -> TermShape {
    let normalize = not_null(normalization, "normalization");
    let bits = not_null(bits, "bits");
    TermShape::parse(normalize, bits).or_raise()
}

#[pg_extern(stable, parallel_safe)]
fn blind_index(
    value: Option<&str>,
    keyring: Option<&str>,
    normalization: default!(Option<&str>, "'none'"),
    bits: default!(Option<i32>, 256),
) -> Option<Vec<u8>> {
    let keyring = not_null(keyring, "keyring");
    let shape = shape(normalization, bits);
    let value = value?;
    Some(index_term(keyring, shape, value).or_raise())
}

#[pg_extern(stable, parallel_safe)]
fn blind_index_all(
    value: Option<&str>,
    keyring: Option<&str>,
    normalization: default!(Option<&str>, "'none'"),
    bits: default!(Option<i32>, 256),
) -> Option<Vec<Vec<u8>>> {
    let keyring = not_null(keyring, "keyring");
    let shape = shape(normalization, bits);
    let value = value?;
    Some(index_terms_all(keyring, shape, value).or_raise())
}

#[pg_extern(immutable, parallel_safe)]
fn blind_normalize(value: Option<&str>, normalization: Option<&str>) -> Option<String> {
    let shape = shape(normalization, Some(256));
    Some(shape.normalize.apply(value?).into_owned())
}
