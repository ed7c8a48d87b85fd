//! Key access statistics, the pure part: the hour buckets and the file that
//! carries the counts across a clean restart.
//!
//! A bucket is an hour in UTC, numbered from PostgreSQL's epoch
//! (2000-01-01 00:00 UTC), computed from a PostgreSQL timestamp
//! (microseconds since that epoch, always UTC inside the server).

use std::collections::BTreeMap;

const HEADER: &str = "manna_crypt access statistics v1";
pub const USECS_PER_HOUR: i64 = 3_600_000_000;

/// The hour bucket holding PostgreSQL timestamp `ts` (UTC). Timestamps
/// before 2000 (a wrong clock) fall into bucket 0.
pub fn hour_of(ts: i64) -> u32 {
    u32::try_from(ts.max(0) / USECS_PER_HOUR).unwrap_or(u32::MAX)
}

/// The PostgreSQL timestamp at which bucket `hour` starts.
pub fn hour_start(hour: u32) -> i64 {
    i64::from(hour) * USECS_PER_HOUR
}

/// The oldest bucket kept with a retention of `days` at bucket `now`
/// (`days` = 0 keeps everything).
pub fn oldest_kept(now: u32, days: u32) -> u32 {
    match days {
        0 => 0,
        d => now.saturating_sub(d.saturating_mul(24)),
    }
}

/// What one count is about: (database, role, keyring id, operation, hour).
pub type AccessKey = (u32, u32, u32, u8, u32);

/// Counts by key, with the calls dropped for lack of room so far.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct AccessFile {
    pub counts: BTreeMap<AccessKey, u64>,
    pub dropped: u64,
}

pub fn format(file: &AccessFile) -> String {
    let mut out = format!("{HEADER}\ndropped {}\n", file.dropped);
    for ((db, role, ring, op, hour), n) in &file.counts {
        out.push_str(&format!("{db} {role} {ring} {op} {hour} {n}\n"));
    }
    out
}

/// Parses a statistics file; any deviation is an error (the caller logs it
/// and starts empty rather than trusting half a file).
pub fn parse(text: &str) -> Result<AccessFile, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("the first line is not the access statistics header".into());
    }
    let dropped = lines
        .next()
        .and_then(|l| l.strip_prefix("dropped "))
        .and_then(|n| n.parse().ok())
        .ok_or("the second line is not the dropped count")?;
    let mut counts = BTreeMap::new();
    for (n, line) in lines.enumerate() {
        let bad = || format!("line {} is malformed", n + 3);
        let f: Vec<u64> = line
            .split(' ')
            .map(|x| x.parse::<u64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let [db, role, ring, op, hour, calls] = f[..] else {
            return Err(bad());
        };
        let narrow = |x: u64| u32::try_from(x).map_err(|_| bad());
        let op = u8::try_from(op).map_err(|_| bad())?;
        let key = (narrow(db)?, narrow(role)?, narrow(ring)?, op, narrow(hour)?);
        if counts.insert(key, calls).is_some() {
            return Err(format!("line {} repeats a count", n + 3));
        }
    }
    Ok(AccessFile { counts, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut f = AccessFile {
            dropped: 7,
            ..Default::default()
        };
        f.counts.insert((5, 10, 1, 0, 237_000), 3);
        f.counts.insert((5, 10, 1, 1, 237_001), u64::MAX);
        assert_eq!(parse(&format(&f)).unwrap(), f);
    }

    #[test]
    fn refuses_damage() {
        let good = format(&AccessFile::default());
        assert!(parse("").is_err());
        assert!(parse(&format!("{good}1 2 3\n")).is_err());
        assert!(parse(&format!("{good}1 2 3 4 5 x\n")).is_err());
        assert!(parse(&format!("{good}1 2 3 300 5 6\n")).is_err());
        assert!(parse(&format!("{good}1 2 3 1 5 6\n1 2 3 1 5 7\n")).is_err());
        assert!(parse(&good.replace("dropped 0", "dropped")).is_err());
    }

    #[test]
    fn buckets() {
        assert_eq!(hour_of(-5), 0);
        assert_eq!(hour_of(USECS_PER_HOUR - 1), 0);
        assert_eq!(hour_of(USECS_PER_HOUR), 1);
        assert_eq!(hour_start(3), 3 * USECS_PER_HOUR);
        assert_eq!(oldest_kept(1000, 0), 0);
        assert_eq!(oldest_kept(1000, 1), 976);
        assert_eq!(oldest_kept(10, 1), 0);
    }
}
