//! The nonce budget of a data key, and the arithmetic of counting against it.
//!
//! A data key encrypts with random 96-bit nonces, so NIST SP 800-38D limits
//! it to 2^32 encryptions. The extension counts every key's encryptions in
//! shared memory, reserved ahead in two steps so that a crash can only
//! over-count:
//!
//! - a backend takes a *block* of encryptions at once and counts inside it
//!   with no shared access at all;
//! - before a block is handed out, the *durable mark* (the count written to
//!   disk) must cover it; when it does not, the mark moves ahead by a
//!   *chunk*, and the new mark is on disk before the block is used.
//!
//! After a crash the count restarts from the durable mark: at most a chunk
//! too high, never too low. This module holds the numbers (sizes, the
//! warning threshold) and the per-database file format; the extension holds
//! the shared memory and the files.

use std::collections::BTreeMap;

/// The default budget: 2^32 encryptions per key (NIST SP 800-38D, random
/// 96-bit nonces).
pub const DEFAULT_LOG2: u32 = 32;
/// The largest block a backend takes at once.
pub const MAX_BLOCK: u64 = 1024;
/// The largest step of the durable mark (the most a crash can over-count).
pub const MAX_CHUNK: u64 = 1 << 20;

/// How many encryptions a key may do, and from which count on its use
/// raises a warning and makes its keyring due for rotation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub limit: u64,
    pub warn_at: u64,
}

impl Budget {
    /// A budget of 2^`log2` encryptions (`log2` is clamped to 1..=62),
    /// warning past `warn_fraction` of it (clamped to 0..=1).
    pub fn new(log2: u32, warn_fraction: f64) -> Budget {
        let limit = 1u64 << log2.clamp(1, 62);
        let fraction = if warn_fraction.is_nan() {
            1.0
        } else {
            warn_fraction.clamp(0.0, 1.0)
        };
        // f64 holds 2^62 exactly; the product is at most the limit.
        let warn_at = ((limit as f64) * fraction).floor() as u64;
        Budget {
            limit,
            warn_at: warn_at.min(limit),
        }
    }

    /// Encryptions a backend reserves at once: 1/2^22 of the budget, 1024
    /// for the default one, at least 1. A small budget (in tests) gets small
    /// blocks, so its warning comes on time.
    pub fn block(&self) -> u64 {
        (self.limit >> 22).clamp(1, MAX_BLOCK)
    }

    /// How far the durable mark moves at once: 1/4096 of the budget, 2^20
    /// for the default one, never less than a block.
    pub fn chunk(&self) -> u64 {
        (self.limit >> 12).clamp(self.block(), MAX_CHUNK)
    }

    /// Whether a count of `count` encryptions is past the warning fraction.
    pub fn past_warning(&self, count: u64) -> bool {
        count > self.warn_at
    }

    /// The share of the budget `count` encryptions use (may exceed 1).
    pub fn fraction(&self, count: u64) -> f64 {
        count as f64 / self.limit as f64
    }
}

/// The durable mark to write before handing out blocks up to `handed`:
/// `durable` itself when it already covers them, otherwise a chunk past them.
pub fn next_durable(durable: u64, handed: u64, chunk: u64) -> u64 {
    if handed <= durable {
        durable
    } else {
        handed.saturating_add(chunk.max(1))
    }
}

/// What a counter file keeps per (counter kind, id): the count and when it
/// last changed (PostgreSQL microseconds since 2000-01-01, if ever).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Stored {
    pub count: u64,
    pub last_used: Option<i64>,
}

/// A database's counters: (kind, id) to what is stored.
pub type Counts = BTreeMap<(u8, u32), Stored>;

const HEADER: &str = "manna_crypt counters 1";

/// The text of a counter file: a header line, then `kind id count
/// last_used` per counter (`-` for a counter never used).
pub fn format(counts: &Counts) -> String {
    let mut out = String::from(HEADER);
    out.push('\n');
    for ((kind, id), s) in counts {
        let last = s.last_used.map_or("-".to_owned(), |t| t.to_string());
        out.push_str(&format!("{kind} {id} {} {last}\n", s.count));
    }
    out
}

/// Parses a counter file; any deviation is an error (a count that cannot
/// be read must not silently restart at zero).
pub fn parse(text: &str) -> Result<Counts, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("the first line is not the counter file header".into());
    }
    let mut counts = Counts::new();
    for (n, line) in lines.enumerate() {
        let bad = || format!("line {} is malformed", n + 2);
        let f: Vec<&str> = line.split(' ').collect();
        let [kind, id, count, last] = f[..] else {
            return Err(bad());
        };
        let last_used = match last {
            "-" => None,
            t => Some(t.parse::<i64>().map_err(|_| bad())?),
        };
        let key = (
            kind.parse().map_err(|_| bad())?,
            id.parse().map_err(|_| bad())?,
        );
        let stored = Stored {
            count: count.parse().map_err(|_| bad())?,
            last_used,
        };
        if counts.insert(key, stored).is_some() {
            return Err(format!("line {} repeats a counter", n + 2));
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_budget_sizes() {
        let b = Budget::new(DEFAULT_LOG2, 0.5);
        assert_eq!(b.limit, 1 << 32);
        assert_eq!(b.warn_at, 1 << 31);
        assert_eq!(b.block(), 1024);
        assert_eq!(b.chunk(), 1 << 20);
    }

    #[test]
    fn tiny_budget_counts_one_by_one() {
        let b = Budget::new(10, 0.5);
        assert_eq!(
            (b.limit, b.warn_at, b.block(), b.chunk()),
            (1024, 512, 1, 1)
        );
        assert!(!b.past_warning(512));
        assert!(b.past_warning(513));
        assert_eq!(b.fraction(256), 0.25);
    }

    #[test]
    fn budget_clamps() {
        assert_eq!(Budget::new(0, 0.5).limit, 2);
        assert_eq!(Budget::new(99, 0.5).limit, 1 << 62);
        assert_eq!(Budget::new(32, 2.0).warn_at, 1 << 32);
        assert_eq!(Budget::new(32, -1.0).warn_at, 0);
        assert_eq!(Budget::new(32, f64::NAN).warn_at, 1 << 32);
        assert_eq!(Budget::new(62, 1.0).warn_at, 1 << 62);
    }

    #[test]
    fn durable_mark_moves_only_when_needed() {
        assert_eq!(next_durable(100, 100, 10), 100);
        assert_eq!(next_durable(100, 50, 10), 100);
        assert_eq!(next_durable(100, 101, 10), 111);
        assert_eq!(next_durable(0, 1024, 1 << 20), 1024 + (1 << 20));
        assert_eq!(next_durable(0, u64::MAX, 5), u64::MAX);
        assert_eq!(next_durable(0, 3, 0), 4);
    }

    #[test]
    fn file_round_trip() {
        let mut c = Counts::new();
        c.insert(
            (0, 7),
            Stored {
                count: 5,
                last_used: Some(-3),
            },
        );
        c.insert(
            (0, 2),
            Stored {
                count: u64::MAX,
                last_used: None,
            },
        );
        c.insert((1, 2), Stored::default());
        let text = format(&c);
        assert_eq!(
            text,
            "manna_crypt counters 1\n0 2 18446744073709551615 -\n0 7 5 -3\n1 2 0 -\n"
        );
        assert_eq!(parse(&text).unwrap(), c);
        assert_eq!(parse("manna_crypt counters 1\n").unwrap(), Counts::new());
    }

    #[test]
    fn file_damage_is_an_error() {
        for bad in [
            "",
            "manna_crypt counters 2\n",
            "manna_crypt counters 1\n0 1 2\n",
            "manna_crypt counters 1\n0 1 x -\n",
            "manna_crypt counters 1\n0 1 2 -\n0 1 3 -\n",
            "manna_crypt counters 1\n0 1 -2 -\n",
            "manna_crypt counters 1\n0 1 2 -\n\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
