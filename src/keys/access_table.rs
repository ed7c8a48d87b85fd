//! The key access statistics in shared memory: calls per (database, role,
//! keyring, operation, hour in UTC), one fixed table for the whole server.
//! Backends add their own tallies here at the end of each transaction and
//! at exit ([`super::access_stats`]); nothing here runs per call.
//!
//! - The table holds `manna_crypt.key_access_max_entries` entries (a
//!   server-start setting) in twice as many slots, open addressing. Adding
//!   to an existing entry takes the table's LWLock shared (the count is an
//!   atomic); a new entry takes it exclusively.
//! - Entries older than `manna_crypt.key_access_retention` days are removed
//!   when room is needed, and are never shown or saved.
//! - When the table is full of kept entries, the whole oldest hour is
//!   removed to make room, and its calls are added to `dropped` (shown by
//!   `key_access_stats_status()`, and a LOG line says so); when even that
//!   is the current hour, the new calls themselves are dropped and counted
//!   there. A total is never lost without a trace.
//! - Persistence: the postmaster writes the table to
//!   `$PGDATA/manna_crypt/access_stats` when it exits cleanly (as
//!   pg_stat_statements does) and reads it when it creates the table. A
//!   reset writes the file too. After a crash the table restarts from the
//!   file: the calls since the last clean shutdown or reset are lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use manna_crypt_core::access::{oldest_kept, AccessFile, AccessKey};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::access_file;
use crate::pg::report;
use crate::pg::shmem::{Held, Part};

pub static MAX_ENTRIES: GucSetting<i32> = GucSetting::<i32>::new(20_000);
pub static RETENTION_DAYS: GucSetting<i32> = GucSetting::<i32>::new(35);

/// Defines the two settings; the capacity only while preloading (a
/// server-start setting defined later is a FATAL error in PostgreSQL).
pub fn register_settings() {
    GucRegistry::define_int_guc(
        c"manna_crypt.key_access_retention",
        c"Days the key access statistics keep an hour's counts (0: until reset).",
        c"Older hours are removed when room is needed and never shown.",
        &RETENTION_DAYS,
        0,
        100_000,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    // SAFETY: a plain read of a flag PostgreSQL sets around preloading.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    GucRegistry::define_int_guc(
        c"manna_crypt.key_access_max_entries",
        c"Entries of the key access statistics: (database, role, keyring, operation, hour).",
        c"When full, the oldest hour is dropped and counted as dropped. Needs a restart.",
        &MAX_ENTRIES,
        100,
        10_000_000,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
}

#[repr(C)]
struct Entry {
    /// 0 while free.
    used: AtomicU32,
    key: [AtomicU32; 5],
    calls: AtomicU64,
}

#[repr(C)]
struct Table {
    capacity: u32,
    live: AtomicU32,
    dropped: AtomicU64,
    entries: [Entry; 0],
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());

fn capacity_setting() -> usize {
    MAX_ENTRIES.get().max(100) as usize
}

fn table_size() -> usize {
    std::mem::size_of::<Table>() + 2 * capacity_setting() * std::mem::size_of::<Entry>()
}

/// Our part of shared memory, for `pg::shmem::install`.
pub const PART: Part = Part {
    name: c"manna_crypt key access",
    size: table_size,
    lwlocks: 1,
    init: init_table,
};

unsafe fn init_table(ptr: *mut u8, locks: *mut pg_sys::LWLockPadded, fresh: bool) {
    let table = ptr.cast::<Table>();
    if fresh {
        // SAFETY: a zeroed struct of the requested size, ours alone now.
        unsafe { (*table).capacity = capacity_setting() as u32 };
    }
    TABLE.store(table, Ordering::Release);
    // SAFETY: the first lock of our tranche.
    LOCK.store(unsafe { &raw mut (*locks).lock }, Ordering::Release);
    // SAFETY: plain reads of PostgreSQL globals.
    if fresh && !unsafe { pg_sys::IsUnderPostmaster } {
        // The postmaster (or a single-user backend), with no backend yet:
        // no lock needed. The exit callback is registered again each time
        // the table is created, as shmem_exit clears the list.
        load_file();
        unsafe { pg_sys::before_shmem_exit(Some(on_server_exit), pg_sys::Datum::from(0)) };
    }
}

fn table() -> Option<(&'static Table, &'static [Entry])> {
    let table = TABLE.load(Ordering::Acquire);
    if table.is_null() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the process's lifetime,
    // with 2 * capacity entries after its header, only used through atomics.
    unsafe {
        let n = 2 * (*table).capacity as usize;
        let entries = std::slice::from_raw_parts((&raw const (*table).entries).cast::<Entry>(), n);
        Some((&*table, entries))
    }
}

/// Whether the table exists (the library was preloaded).
pub fn available() -> bool {
    table().is_some()
}

fn lock(exclusive: bool) -> Held {
    let lock = LOCK.load(Ordering::Acquire);
    // SAFETY: set with the table, an LWLock in shared memory.
    unsafe {
        if exclusive {
            Held::exclusive(lock)
        } else {
            Held::shared(lock)
        }
    }
}

fn start(n: usize, key: &AccessKey) -> usize {
    let (a, b, c, d, e) = *key;
    let h = [a, b, c, u32::from(d), e]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, x| {
            (h ^ u64::from(*x)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
    (h >> 32) as usize % n
}

fn key_of(e: &Entry) -> AccessKey {
    let k = |i: usize| e.key[i].load(Ordering::Relaxed);
    (k(0), k(1), k(2), k(3) as u8, k(4))
}

/// The entry of `key`, or the free slot where it would go.
fn probe<'a>(entries: &'a [Entry], key: &AccessKey) -> (&'a Entry, bool) {
    let n = entries.len();
    let first = start(n, key);
    for i in 0..n {
        let e = &entries[(first + i) % n];
        if e.used.load(Ordering::Acquire) == 0 {
            return (e, false);
        }
        if key_of(e) == *key {
            return (e, true);
        }
    }
    unreachable!("the table has twice as many slots as entries")
}

fn fill(e: &Entry, key: &AccessKey, calls: u64) {
    let (a, b, c, d, h) = *key;
    for (slot, v) in e.key.iter().zip([a, b, c, u32::from(d), h]) {
        slot.store(v, Ordering::Relaxed);
    }
    e.calls.store(calls, Ordering::Relaxed);
    e.used.store(1, Ordering::Release);
}

/// Adds `calls` to `key`. Never an error (it runs at commit and at exit);
/// without room, see the module comment.
pub fn add(key: AccessKey, calls: u64) {
    let Some((table, entries)) = table() else {
        return;
    };
    {
        let _held = lock(false);
        if let (e, true) = probe(entries, &key) {
            e.calls.fetch_add(calls, Ordering::Relaxed);
            return;
        }
    }
    let mut evicted = None;
    {
        let _held = lock(true);
        match probe(entries, &key) {
            (e, true) => {
                e.calls.fetch_add(calls, Ordering::Relaxed);
                return;
            }
            _ if table.live.load(Ordering::Relaxed) >= table.capacity => {
                evicted = Some(make_room(table, entries, key.4));
            }
            _ => {}
        }
        if table.live.load(Ordering::Relaxed) < table.capacity {
            let (e, _) = probe(entries, &key);
            fill(e, &key, calls);
            table.live.fetch_add(1, Ordering::Relaxed);
        } else {
            table.dropped.fetch_add(calls, Ordering::Relaxed);
            evicted = Some((key.4, 0, calls));
        }
    }
    if let Some((hour, n, lost)) = evicted.filter(|(_, _, lost)| *lost > 0) {
        report::log_server(format!(
            "manna_crypt.key_access_max_entries is full: {lost} calls of {n} entries \
             of hour {hour} counted as dropped"
        ));
    }
}

/// Under the exclusive lock: removes expired hours, then, if still full,
/// the oldest hour (before `now`). Returns (hour, entries, calls) dropped.
fn make_room(table: &Table, entries: &[Entry], now: u32) -> (u32, u64, u64) {
    let keep_from = oldest_kept(now, RETENTION_DAYS.get().max(0) as u32);
    let mut live: Vec<(AccessKey, u64)> = live_entries(entries)
        .filter(|(k, _)| k.4 >= keep_from)
        .collect();
    let mut dropped = (0, 0, 0);
    if live.len() >= table.capacity as usize {
        let oldest = live.iter().map(|(k, _)| k.4).min().unwrap_or(now);
        if oldest < now {
            let (gone, kept): (Vec<_>, Vec<_>) = live.into_iter().partition(|(k, _)| k.4 == oldest);
            let calls = gone.iter().map(|(_, c)| c).sum::<u64>();
            table.dropped.fetch_add(calls, Ordering::Relaxed);
            dropped = (oldest, gone.len() as u64, calls);
            live = kept;
        }
    }
    rebuild(table, entries, &live);
    dropped
}

fn live_entries(entries: &[Entry]) -> impl Iterator<Item = (AccessKey, u64)> + '_ {
    entries
        .iter()
        .filter(|e| e.used.load(Ordering::Acquire) == 1)
        .map(|e| (key_of(e), e.calls.load(Ordering::Relaxed)))
}

/// Under the exclusive lock (or alone): the table holds exactly `live`.
fn rebuild(table: &Table, entries: &[Entry], live: &[(AccessKey, u64)]) {
    for e in entries {
        e.used.store(0, Ordering::Relaxed);
    }
    for (key, calls) in live {
        let (e, _) = probe(entries, key);
        fill(e, key, *calls);
    }
    table.live.store(live.len() as u32, Ordering::Relaxed);
}

/// Every kept entry of database `db` (all databases with `None`).
pub fn snapshot(db: Option<u32>, now: u32) -> Vec<(AccessKey, u64)> {
    let Some((_, entries)) = table() else {
        return Vec::new();
    };
    let keep_from = oldest_kept(now, RETENTION_DAYS.get().max(0) as u32);
    let _held = lock(false);
    live_entries(entries)
        .filter(|(k, _)| k.4 >= keep_from && db.is_none_or(|d| k.0 == d))
        .collect()
}

/// (capacity, entries in use, calls dropped for lack of room).
pub fn status() -> (u32, u32, u64) {
    table().map_or((0, 0, 0), |(t, _)| {
        (
            t.capacity,
            t.live.load(Ordering::Relaxed),
            t.dropped.load(Ordering::Relaxed),
        )
    })
}

/// Removes every entry of database `db`, then saves the table: the reset
/// survives a crash. Returns (entries, calls) removed.
pub fn reset(db: u32) -> crate::error::McResult<(u64, u64)> {
    let Some((table, entries)) = table() else {
        return Ok((0, 0));
    };
    // The file is written under the lock: two resets (of two databases) at
    // once cannot save their snapshots in the wrong order. Resets are rare.
    let _held = lock(true);
    let (gone, kept): (Vec<_>, Vec<_>) = live_entries(entries).partition(|(k, _)| k.0 == db);
    rebuild(table, entries, &kept);
    let file = AccessFile {
        counts: kept.into_iter().collect(),
        dropped: table.dropped.load(Ordering::Relaxed),
    };
    access_file::write(&file)?;
    Ok((gone.len() as u64, gone.iter().map(|(_, c)| c).sum()))
}

/// In the postmaster at table creation: the counts of the last clean
/// shutdown (or reset). A damaged file is logged and left for inspection.
fn load_file() {
    let Some((table, entries)) = table() else {
        return;
    };
    match access_file::read() {
        Ok(file) => {
            let mut live: Vec<_> = file.counts.into_iter().collect();
            // A smaller capacity than at shutdown keeps the newest hours.
            live.sort_by_key(|(k, _)| std::cmp::Reverse(k.4));
            let cap = table.capacity as usize;
            let lost: u64 = live.iter().skip(cap).map(|(_, c)| c).sum();
            live.truncate(cap);
            table
                .dropped
                .store(file.dropped.saturating_add(lost), Ordering::Relaxed);
            rebuild(table, entries, &live);
        }
        Err(e) => report::log_server(format!("{}; starting empty", e.message())),
    }
}

/// The postmaster's save at a clean exit. No lock: no other process is
/// left. After a crash (code != 0) nothing is written: a backend may have
/// died inside a rebuild, and the file of the last clean shutdown stays.
#[pg_guard]
unsafe extern "C-unwind" fn on_server_exit(code: i32, _arg: pg_sys::Datum) {
    let Some((table, entries)) = table() else {
        return;
    };
    if code != 0 {
        return;
    }
    let counts: BTreeMap<AccessKey, u64> = live_entries(entries).collect();
    let file = AccessFile {
        counts,
        dropped: table.dropped.load(Ordering::Relaxed),
    };
    if let Err(e) = access_file::write(&file) {
        report::log_server(format!("{}; the last saved counts stay", e.message()));
    }
}
