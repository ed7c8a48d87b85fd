//! `value_class()`: what a stored value is, by shape alone (see
//! `manna_crypt_core::classify`); `column_status()` counts a column by it.

use manna_crypt_core::classify::classify;
use pgrx::prelude::*;

/// The class of a value: 'mc1', 'fernet', 'malformed' or 'plaintext'.
#[pg_extern(immutable, strict, parallel_safe)]
fn value_class(value: &str) -> &'static str {
    classify(value).name()
}
