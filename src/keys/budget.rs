//! The nonce budget of data keys (docs/DESIGN.md section 7.2): its
//! settings, the count on every encryption under a data key, the WARNING
//! past the warning fraction, and what the `keys` view, `info()` and
//! `rotate_due()` read. The counting itself is [`super::counters`].
//!
//! - `manna_crypt.nonce_budget_log2` (superuser, default 32): a key's
//!   budget is 2^this encryptions (NIST SP 800-38D for random 96-bit
//!   nonces). An exponent, because an integer setting stops at 2^31 - 1.
//! - `manna_crypt.nonce_budget_warn_fraction` (superuser, default 0.5):
//!   past this share of the budget, encrypting raises a WARNING (once per
//!   session and key) and `rotate_due()` rotates the keyring.

use std::cell::RefCell;
use std::collections::HashSet;

use manna_crypt_core::budget::Budget;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

use super::counters::Kind;
use super::tally::{self, Tally};
use crate::error::{McResult, OrRaise};
use crate::pg::report;

pub static BUDGET_LOG2: GucSetting<i32> = GucSetting::<i32>::new(32);
pub static WARN_FRACTION: GucSetting<f64> = GucSetting::<f64>::new(0.5);

pub fn register_settings() {
    let flags = GucFlags::SUPERUSER_ONLY;
    GucRegistry::define_int_guc(
        c"manna_crypt.nonce_budget_log2",
        c"A data key's nonce budget: 2 to this power encryptions.",
        c"NIST SP 800-38D allows 2^32 encryptions under one key with random 96-bit nonces.",
        &BUDGET_LOG2,
        1,
        62,
        GucContext::Suset,
        flags,
    );
    GucRegistry::define_float_guc(
        c"manna_crypt.nonce_budget_warn_fraction",
        c"Share of the nonce budget past which encrypting warns and rotate_due() rotates.",
        c"Each session warns once per key.",
        &WARN_FRACTION,
        0.0,
        1.0,
        GucContext::Suset,
        flags,
    );
}

/// The budget as the settings stand.
pub fn current() -> Budget {
    Budget::new(BUDGET_LOG2.get() as u32, WARN_FRACTION.get())
}

thread_local! {
    /// Keys this session has warned about.
    static WARNED: RefCell<HashSet<u32>> = RefCell::new(HashSet::new());
}

/// Counts one encryption under data key `key_id` of `keyring`. Almost
/// always one decrement of the session's block; the rest is [`refill`].
#[inline]
pub fn count_encryption(tally: &Tally, key_id: u32, keyring: &str) -> McResult<()> {
    if tally.take_one() {
        return Ok(());
    }
    refill(tally, key_id, keyring)
}

#[cold]
fn refill(tally: &Tally, key_id: u32, keyring: &str) -> McResult<()> {
    let budget = current();
    let end = tally.refill(budget.block(), budget.chunk())?;
    if budget.past_warning(end) && WARNED.with(|w| w.borrow_mut().insert(key_id)) {
        report::warning(
            format!(
                "key {key_id} of keyring \"{keyring}\" has used {:.1}% of its nonce budget \
                 ({end} of 2^{} encryptions)",
                budget.fraction(end) * 100.0,
                BUDGET_LOG2.get()
            ),
            format!(
                "rotate the keyring: SELECT manna_crypt.rotate_keyring('{keyring}'), or \
                 SELECT * FROM manna_crypt.rotate_due()"
            ),
        );
    }
    Ok(())
}

/// The encryption count of each key id of this database.
pub fn counts() -> McResult<std::collections::BTreeMap<u32, u64>> {
    Ok(tally::read(Kind::Encryptions)?
        .into_iter()
        .map(|(id, s)| (id, s.count))
        .collect())
}

/// Of `active` (keyring, active key id) pairs, the keyrings whose key is
/// past the warning fraction, with its count.
pub fn past_warning(active: &[(String, i32)]) -> McResult<Vec<(String, u64)>> {
    let budget = current();
    let counts = counts()?;
    Ok(active
        .iter()
        .filter_map(|(ring, id)| {
            let n = counts.get(&(*id as u32)).copied().unwrap_or(0);
            budget.past_warning(n).then(|| (ring.clone(), n))
        })
        .collect())
}

/// Encryptions and last use of every counted key of this database, for
/// the `keys` view. A count includes encryptions other sessions have
/// reserved and not done yet (up to a block each, 1024 by default).
#[pg_extern(volatile, parallel_safe)]
fn _key_usage() -> TableIterator<
    'static,
    (
        name!(key_id, i32),
        name!(encryptions, i64),
        name!(last_used, Option<TimestampWithTimeZone>),
    ),
> {
    let rows = tally::read(Kind::Encryptions)
        .or_raise()
        .into_iter()
        .filter(|(id, _)| *id <= i32::MAX as u32)
        .map(|(id, s)| {
            let last = s
                .last_used
                .and_then(|t| TimestampWithTimeZone::try_from(t).ok());
            (id as i32, i64::try_from(s.count).unwrap_or(i64::MAX), last)
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}
