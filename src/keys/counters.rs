//! Counters per (database, kind, id) in shared memory, reserved ahead and
//! flushed to disk so that a crash can over-count but never under-count
//! (the arithmetic is in `manna_crypt_core::budget`). The encryptions of
//! each data key are the first kind; later statistics reuse the table.
//!
//! Shared memory holds a fixed table of `manna_crypt.max_counted_keys`
//! slots. A slot has `handed` (counts handed out to backends in blocks,
//! less what they gave back), `durable` (the mark written to the
//! database's counter file, see [`super::countfile`]) and `last_used`.
//!
//! - A backend counts inside a block of its own (`super::tally`): no
//!   shared access per count. For a new block it adds to `handed`; when `handed`
//!   passes `durable`, it first moves `durable` a chunk ahead and writes the
//!   file (under the table's LWLock), and only then uses the block.
//! - At exit (`before_shmem_exit`) a backend gives back what is left of its
//!   blocks, so once every backend is gone `handed` is the exact count.
//! - The postmaster writes every slot's `handed` to the files when it exits,
//!   and again when it resets shared memory after a crash (then the
//!   largest of `handed`, `durable` and the file's count). PostgreSQL
//!   runs `shmem_exit` at both (postmaster.c: `ExitPostmaster` and the
//!   reinitialisation after a crash, in 15 to 18) and clears the callback
//!   list each time: the callback is registered again whenever the table
//!   is created. An immediate shutdown exits with 0 too: the backends it
//!   killed gave nothing back, so `handed` is then an over-count, as wanted.
//! - A SIGKILL of the postmaster writes nothing: the files keep the durable
//!   marks, at most a chunk above the true counts.
//! - `last_used` is set when a block is taken and at the end of every
//!   transaction that counted; it reaches the file with the counts.
//!
//! Slots are filled on first use and stay until the server stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use manna_crypt_core::budget::{next_durable, Counts, Stored};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::countfile;
use crate::error::{McError, McResult};
use crate::pg::report;
use crate::pg::shmem::{self, Held, Part};

/// What is counted. The discriminant is written in the counter files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    /// Encryptions under a data key (the nonce budget).
    Encryptions = 0,
}

pub static MAX_COUNTED_KEYS: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// Defines `manna_crypt.max_counted_keys`; only while preloading, since a
/// server-start setting defined later is a FATAL error in PostgreSQL.
pub fn register_settings() {
    // SAFETY: a plain read of a flag PostgreSQL sets around preloading.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    GucRegistry::define_int_guc(
        c"manna_crypt.max_counted_keys",
        c"Number of (database, data key) pairs whose encryptions can be counted.",
        c"Shared memory for the usage counters; a key beyond it cannot encrypt. Needs a restart.",
        &MAX_COUNTED_KEYS,
        16,
        1 << 20,
        GucContext::Postmaster,
        // Hidden from non-superusers like every manna_crypt setting.
        GucFlags::SUPERUSER_ONLY,
    );
}

#[repr(C)]
pub struct Slot {
    /// 0 while free; set to 1 (release) once the fields below are valid.
    used: AtomicU32,
    db: AtomicU32,
    kind: AtomicU32,
    id: AtomicU32,
    handed: AtomicU64,
    durable: AtomicU64,
    /// PostgreSQL timestamp; `NEVER` while unused.
    last_used: AtomicI64,
}

const NEVER: i64 = i64::MIN;

#[repr(C)]
struct Table {
    capacity: u32,
    slots: [Slot; 0],
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());

fn capacity_setting() -> usize {
    MAX_COUNTED_KEYS.get().max(16) as usize
}

fn table_size() -> usize {
    std::mem::size_of::<Table>() + capacity_setting() * std::mem::size_of::<Slot>()
}

/// Our part of shared memory, for `pg::shmem::install`.
pub const PART: Part = Part {
    name: c"manna_crypt counters",
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
        // The postmaster (or a single-user backend): flush at exit and at
        // the reset after a crash. shmem_exit has just cleared the list.
        unsafe { pg_sys::before_shmem_exit(Some(on_server_exit), pg_sys::Datum::from(0)) };
    }
}

fn slots() -> Option<&'static [Slot]> {
    let table = TABLE.load(Ordering::Acquire);
    if table.is_null() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the process's lifetime,
    // with `capacity` slots after its header; slots are only accessed
    // through atomics.
    unsafe {
        let cap = (*table).capacity as usize;
        Some(std::slice::from_raw_parts(
            (&raw const (*table).slots).cast::<Slot>(),
            cap,
        ))
    }
}

fn lock() -> Held {
    // SAFETY: set with the table, an LWLock in shared memory.
    unsafe { Held::exclusive(LOCK.load(Ordering::Acquire)) }
}

fn my_db() -> u32 {
    // SAFETY: set once the backend is connected to a database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn is(slot: &Slot, db: u32, kind: Kind, id: u32) -> bool {
    slot.db.load(Ordering::Relaxed) == db
        && slot.kind.load(Ordering::Relaxed) == kind as u32
        && slot.id.load(Ordering::Relaxed) == id
}

fn start(cap: usize, db: u32, kind: Kind, id: u32) -> usize {
    let h = (u64::from(db) << 32 | u64::from(id)) ^ (kind as u64) << 61;
    (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % cap
}

/// The slot of (this database, kind, id), filled from the counter file if
/// it is not in the table yet: an error without shared memory (55000) or
/// with the table full (53400).
pub fn find_or_insert(kind: Kind, id: u32) -> McResult<&'static Slot> {
    let Some(slots) = slots() else {
        return Err(not_preloaded());
    };
    let db = my_db();
    let _held = lock();
    let cap = slots.len();
    let first = start(cap, db, kind, id);
    for i in 0..cap {
        let slot = &slots[(first + i) % cap];
        if slot.used.load(Ordering::Acquire) == 0 {
            let stored = countfile::read(db)?
                .get(&(kind as u8, id))
                .copied()
                .unwrap_or_default();
            slot.db.store(db, Ordering::Relaxed);
            slot.kind.store(kind as u32, Ordering::Relaxed);
            slot.id.store(id, Ordering::Relaxed);
            slot.handed.store(stored.count, Ordering::Relaxed);
            slot.durable.store(stored.count, Ordering::Relaxed);
            slot.last_used
                .store(stored.last_used.unwrap_or(NEVER), Ordering::Relaxed);
            slot.used.store(1, Ordering::Release);
            return Ok(slot);
        }
        if is(slot, db, kind, id) {
            return Ok(slot);
        }
    }
    Err(McError::LimitExceeded {
        message: "too many data keys to count their encryptions".into(),
        detail: format!("all {cap} slots of manna_crypt.max_counted_keys are in use"),
        hint: "raise manna_crypt.max_counted_keys and restart the server".into(),
    })
}

fn not_preloaded() -> McError {
    McError::WrongState {
        message: "manna_crypt is not loaded through shared_preload_libraries".into(),
        detail: Some(
            "every encryption under a data key is counted in shared memory (the nonce budget)"
                .into(),
        ),
        hint: Some("add manna_crypt to shared_preload_libraries and restart the server".into()),
    }
}

fn stored(slot: &Slot, count: u64) -> Stored {
    let last = slot.last_used.load(Ordering::Relaxed);
    Stored {
        count,
        last_used: (last != NEVER).then_some(last),
    }
}

/// Moves `slot`'s durable mark past `end` and writes it to the file first.
fn reserve(slot: &Slot, end: u64, chunk: u64) -> McResult<()> {
    let _held = lock();
    let durable = slot.durable.load(Ordering::Acquire);
    if end <= durable {
        return Ok(()); // another backend moved it meanwhile
    }
    let handed = slot.handed.load(Ordering::Acquire).max(end);
    let mark = next_durable(durable, handed, chunk);
    let db = slot.db.load(Ordering::Relaxed);
    let mut counts = countfile::read(db)?;
    for s in slots().unwrap_or(&[]) {
        if s.used.load(Ordering::Acquire) == 1 && s.db.load(Ordering::Relaxed) == db {
            let count = if std::ptr::eq(s, slot) {
                mark
            } else {
                s.durable.load(Ordering::Acquire)
            };
            let key = (
                s.kind.load(Ordering::Relaxed) as u8,
                s.id.load(Ordering::Relaxed),
            );
            counts.insert(key, stored(s, count));
        }
    }
    countfile::write(db, &counts)?;
    slot.durable.store(mark, Ordering::Release);
    Ok(())
}

impl Slot {
    /// Adds a block of `block` to `handed`, after moving the durable mark by
    /// `chunk` if needed (on disk first). Returns `handed` after the add: a
    /// bound on the count once the block is used up.
    pub fn take_block(&self, block: u64, chunk: u64) -> McResult<u64> {
        self.last_used.store(now(), Ordering::Relaxed);
        let end = self.handed.fetch_add(block, Ordering::AcqRel) + block;
        if end > self.durable.load(Ordering::Acquire) {
            if let Err(e) = reserve(self, end, chunk) {
                self.handed.fetch_sub(block, Ordering::AcqRel);
                return Err(e);
            }
        }
        Ok(end)
    }

    /// Gives back `n` counts of a block that were never used.
    pub fn give_back(&self, n: u64) {
        self.handed.fetch_sub(n, Ordering::AcqRel);
    }

    /// Sets `last_used` to now.
    pub fn stamp(&self) {
        self.last_used.store(now(), Ordering::Relaxed);
    }
}

/// The postmaster's flush of every slot to the files (see the module
/// comment): exact after a clean shutdown, never below the durable marks
/// otherwise. No LWLock: no other process is left.
#[pg_guard]
unsafe extern "C-unwind" fn on_server_exit(code: i32, _arg: pg_sys::Datum) {
    let mut by_db: BTreeMap<u32, Vec<&Slot>> = BTreeMap::new();
    for s in slots().unwrap_or(&[]) {
        if s.used.load(Ordering::Acquire) == 1 {
            by_db
                .entry(s.db.load(Ordering::Relaxed))
                .or_default()
                .push(s);
        }
    }
    for (db, list) in by_db {
        let result = countfile::read(db).and_then(|mut counts: Counts| {
            for s in list {
                let handed = s.handed.load(Ordering::Acquire);
                let key = (
                    s.kind.load(Ordering::Relaxed) as u8,
                    s.id.load(Ordering::Relaxed),
                );
                // After a crash, shared memory is not trusted to be lower
                // than what is on disk.
                let count = match code {
                    0 => handed,
                    _ => handed
                        .max(s.durable.load(Ordering::Acquire))
                        .max(counts.get(&key).map_or(0, |c| c.count)),
                };
                counts.insert(key, stored(s, count));
            }
            countfile::write(db, &counts)
        });
        if let Err(e) = result {
            report::log_server(format!("{}; the durable marks stay", e.message()));
        }
    }
}

/// This database's counters of `kind` by id: the file, overlaid by the
/// table. A count in the table includes the blocks backends still hold (up
/// to one block each; see `tally::read` for this backend's own).
pub fn read(kind: Kind) -> McResult<BTreeMap<u32, Stored>> {
    let db = my_db();
    let mut out: BTreeMap<u32, Stored> = countfile::read(db)?
        .into_iter()
        .filter(|((k, _), _)| *k == kind as u8)
        .map(|((_, id), s)| (id, s))
        .collect();
    for s in slots().unwrap_or(&[]) {
        if s.used.load(Ordering::Acquire) == 1
            && s.db.load(Ordering::Relaxed) == db
            && s.kind.load(Ordering::Relaxed) == kind as u32
        {
            let id = s.id.load(Ordering::Relaxed);
            out.insert(id, stored(s, s.handed.load(Ordering::Acquire)));
        }
    }
    Ok(out)
}

/// Whether the counters live in shared memory (the library was preloaded).
pub fn available() -> bool {
    shmem::preloaded() && slots().is_some()
}
