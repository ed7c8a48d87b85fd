//! `manna_crypt.redact_log`: no plaintext of a statement that uses
//! manna_crypt in the server log (README "Keeping plaintext out of the
//! server log").
//!
//! - [`watch`]: what makes a statement sensitive, known in every backend
//!   without a catalog lookup at report time: the manna_crypt functions and
//!   the protected tables (kept current through invalidation), and the
//!   texts parse analysis found touching them;
//! - [`analyze`]: the `post_parse_analyze_hook` that refreshes the list and
//!   marks statements from their parse trees;
//! - [`rules`]: what each field of a log line becomes (pure text work on
//!   `manna_crypt_core::sqllex`);
//! - [`hook`]: the `emit_log_hook` that decides per line and rewrites, and
//!   never lets an error or a panic out.

mod analyze;
mod hook;
mod rules;
mod watch;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    #[name = c"off"]
    Off,
    #[name = c"on"]
    On,
    #[name = c"all"]
    All,
}

pub static REDACT_LOG: GucSetting<Mode> = GucSetting::<Mode>::new(Mode::On);

/// The setting as it stands in this process.
pub fn mode() -> Mode {
    REDACT_LOG.get()
}

/// Defines the setting; called from `_PG_init` before the prefix is
/// reserved.
pub fn register_settings() {
    GucRegistry::define_enum_guc(
        c"manna_crypt.redact_log",
        c"Replaces literals and bind values in log lines of statements that use manna_crypt.",
        c"on: statements that call a manna_crypt function or write a protected table; \
all: every statement; off: log statements as PostgreSQL does.",
        &REDACT_LOG,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
}

/// Installs the hooks and the invalidation callbacks; called from
/// `_PG_init` (in the postmaster too, so every backend, parallel worker and
/// the postmaster's own crash report inherit them).
pub fn install() {
    watch::register_callbacks();
    analyze::install();
    hook::install();
}
