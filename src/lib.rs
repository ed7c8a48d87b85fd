//! manna_crypt: field encryption inside PostgreSQL.
//!
//! This file is the table of contents; docs/ARCHITECTURE.md draws the
//! layers. The pure crypto lives in the `manna_crypt_core` crate (no
//! PostgreSQL in it). Here, from the bottom up — each layer calls only the
//! ones below it:
//!
//! 1. [`error`] and [`pg`]: SQLSTATEs, and PostgreSQL plumbing (SPI,
//!    identity switches, settings) with no SQL-visible function;
//! 2. [`keys`]: the root key, the key tables, the key cache, the lifecycle;
//! 3. [`crypto`]: the seal/open service every SQL surface shares;
//! 4. the SQL surfaces: [`gcm`], [`fernet`], [`any`], [`locking`], [`reencrypt`],
//!    [`protect`]; and [`redact`], which keeps their plaintexts out of the
//!    server log.

use pgrx::prelude::*;

mod any;
mod blind;
mod crypto;
mod error;
mod fernet;
mod gcm;
mod keys;
mod locking;
mod pg;
mod protect;
mod redact;
mod reencrypt;

::pgrx::pg_module_magic!(name, version);

// Schema objects, in dependency order. `bootstrap.sql` creates the tables,
// roles and sequences before any function; `keys.sql` the triggers and the
// view on the key tables; the domain needs its CHECK function; grants and
// the comments on Rust-defined functions come last (`finalize.sql`).
extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/keys.sql",
    name = "keys",
    requires = ["bootstrap", keys::budget::_key_usage]
);
extension_sql_file!(
    "../sql/grants.sql",
    name = "grants",
    requires = ["bootstrap", keys::grants::_invalidate_grants_cache]
);
extension_sql_file!(
    "../sql/domain.sql",
    name = "encrypted_text_domain",
    requires = [gcm::is_encrypted]
);
extension_sql_file!(
    "../sql/locking.sql",
    name = "locking",
    requires = ["version_bump_fn"]
);
extension_sql_file!(
    "../sql/reencrypt.sql",
    name = "reencrypt",
    requires = [
        "bootstrap",
        reencrypt::engine::_reencrypt_start,
        reencrypt::engine::_reencrypt_step,
        reencrypt::engine::_reencrypt_finish,
        reencrypt::report::_reencrypt_result,
        reencrypt::batch::_reencrypt_convert,
        reencrypt::batch::_reencrypt_take,
        reencrypt::classify::value_class
    ]
);
extension_sql_file!(
    "../sql/access_stats.sql",
    name = "access_stats",
    requires = ["bootstrap", keys::access_sql::_key_access]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // First: no message of ours carries a Rust backtrace or location.
    pg::report::install();
    keys::rootkey::register_settings();
    // Every setting is defined before the prefix is reserved: reserving
    // drops the server file's values of names not defined yet.
    keys::budget::register_settings();
    keys::counters::register_settings();
    keys::access_table::register_settings();
    keys::access_stats::register_settings();
    redact::register_settings();
    // A typo in a setting name (manna_crypt.root_key_flie) is an error, not
    // a silently accepted placeholder.
    // SAFETY: a NUL-terminated prefix; PostgreSQL copies it.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"manna_crypt".as_ptr()) };
    keys::cache::register_callback();
    keys::grants::register_callbacks();
    // Log redaction: installed in the postmaster, so inherited by every
    // backend, parallel worker and the postmaster's own crash report.
    redact::install();
    // Shared memory exists only when preloaded; without it, root-key
    // operations refuse with a HINT (see keys::rootshared).
    let parts = &[
        keys::rootshared::PART,
        keys::counters::PART,
        keys::access_table::PART,
    ];
    if pg::shmem::install(parts) {
        keys::rootshared::map_page();
    }
}

// The backend tests live in src/tests.rs; `#[pg_schema]` needs an inline
// module, so the file is included into one.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // A fixed, test-only root key from a command: the pgrx test cluster
        // is created by cargo-pgrx, so a key file with the right owner and
        // mode cannot be put in place beforehand.
        vec![
            concat!(
                "manna_crypt.root_key_command = ",
                "'echo 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'"
            ),
            // Root keys and the encryption counters live in shared memory.
            "shared_preload_libraries = 'manna_crypt'",
        ]
    }
}
