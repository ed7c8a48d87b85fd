//! Who used which key: each backend's tally of encrypt, decrypt and
//! blind-index calls per (role, keyring), handed to the shared table
//! ([`super::access_table`]) at the end of every transaction and at exit.
//!
//! The hot path is [`Access::record`] on a cell the key cache keeps beside
//! the key it just looked up: the caller's role id, a comparison and an
//! increment of a backend-local counter; no shared memory, no lock, no
//! allocation. A call is counted under `pg::security::caller_id()`: the
//! current user, or inside one of manna_crypt's own switches (the
//! re-encryption procedures run as the table's owner) the role that called
//! the procedure. A SECURITY DEFINER function counts under its owner, as
//! PostgreSQL judges its privileges. Parallel workers count for
//! themselves and hand their tallies over when their transaction part ends.
//!
//! Calls are counted in the hour (UTC) of the transaction's end, in the
//! transaction's database, also when it rolls back (the values were read).
//!
//! With `manna_crypt.key_access_log` on, every call also writes a LOG line
//! (role, operation, keyring, key id; never a value).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use manna_crypt_core::access::hour_of;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::access_table;
use crate::pg::report;
use crate::pg::security;

/// What a call did with a keyring's key. The discriminant is stored in
/// shared memory and in the statistics file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AccessOp {
    Encrypt = 0,
    Decrypt = 1,
    BlindIndex = 2,
}

impl AccessOp {
    pub const ALL: [AccessOp; 3] = [AccessOp::Encrypt, AccessOp::Decrypt, AccessOp::BlindIndex];

    pub fn name(self) -> &'static str {
        match self {
            AccessOp::Encrypt => "encrypt",
            AccessOp::Decrypt => "decrypt",
            AccessOp::BlindIndex => "blind_index",
        }
    }

    pub fn from_code(code: u8) -> Option<AccessOp> {
        AccessOp::ALL.get(usize::from(code)).copied()
    }
}

pub static LOG_CALLS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// The setting's value, read directly: `GucSetting::get` checks the thread
/// through a thread-local, too slow for every call.
#[inline]
fn log_calls() -> bool {
    // SAFETY: a bool PostgreSQL's GUC machinery writes on this same thread.
    unsafe { *LOG_CALLS.as_ptr() }
}

pub fn register_settings() {
    GucRegistry::define_bool_guc(
        c"manna_crypt.key_access_log",
        c"Writes a LOG line for every encrypt, decrypt and blind-index call under a keyring.",
        c"Role, operation, keyring and key id; never a value. Costs a log line per call.",
        &LOG_CALLS,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
}

/// One backend's calls on one keyring, for one role at a time.
pub struct Access {
    keyring_id: u32,
    keyring: Box<str>,
    role: Cell<pg_sys::Oid>,
    calls: [Cell<u64>; 3],
}

thread_local! {
    static CELLS: RefCell<HashMap<u32, Rc<Access>>> = RefCell::new(HashMap::new());
    /// Calls of cells whose role changed since the last hand-over:
    /// (role, keyring id, operation) -> calls.
    static SPILLED: RefCell<BTreeMap<(u32, u32, u8), u64>> = const {
        RefCell::new(BTreeMap::new())
    };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
    /// `reset_key_access_stats()` was called: reset when the transaction
    /// commits (with its audit row), not at all if it rolls back.
    static RESET_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

/// Benchmark builds only: recording switched off for this session.
#[cfg(feature = "bench_uncounted")]
static BENCH_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Access {
    /// Counts one call of `op` with key `key_id` of this keyring.
    #[inline]
    pub fn record(&self, op: AccessOp, key_id: u32) {
        #[cfg(feature = "bench_uncounted")]
        if BENCH_OFF.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let role = security::caller_id();
        if role != self.role.get() {
            self.change_role(role);
        }
        let c = &self.calls[op as usize];
        c.set(c.get() + 1);
        if log_calls() {
            self.log_call(role, op, key_id);
        }
    }

    #[cold]
    fn change_role(&self, role: pg_sys::Oid) {
        self.spill();
        self.role.set(role);
    }

    /// Moves this cell's calls to [`SPILLED`] under its current role.
    fn spill(&self) {
        for op in AccessOp::ALL {
            let n = self.calls[op as usize].replace(0);
            if n > 0 {
                let key = (self.role.get().to_u32(), self.keyring_id, op as u8);
                SPILLED.with(|s| *s.borrow_mut().entry(key).or_default() += n);
            }
        }
    }

    #[cold]
    fn log_call(&self, role: pg_sys::Oid, op: AccessOp, key_id: u32) {
        report::log_server_alone(format!(
            "manna_crypt key access: role \"{}\" {} keyring \"{}\" key {key_id}",
            security::role_name(role),
            op.name(),
            self.keyring
        ));
    }
}

/// This backend's cell for keyring `keyring_id` (named `keyring`, for the
/// LOG lines), created on first use. The key cache keeps it beside its keys.
pub fn cell(keyring_id: u32, keyring: &str) -> Rc<Access> {
    register_callbacks();
    CELLS.with(|c| {
        c.borrow_mut()
            .entry(keyring_id)
            .or_insert_with(|| {
                Rc::new(Access {
                    keyring_id,
                    keyring: keyring.into(),
                    role: Cell::new(pg_sys::InvalidOid),
                    calls: Default::default(),
                })
            })
            .clone()
    })
}

/// [`Access::record`] for a caller without the cache's cell at hand (a
/// hash lookup more). The blind-index function of issue 12 is its first
/// user; until it is merged nothing calls it.
#[allow(dead_code)]
pub fn record(keyring_id: u32, keyring: &str, op: AccessOp, key_id: u32) {
    cell(keyring_id, keyring).record(op, key_id);
}

pub fn register_callbacks() {
    if CALLBACKS.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: function pointers that live as long as the library.
    unsafe {
        pg_sys::before_shmem_exit(Some(on_backend_exit), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact_end), std::ptr::null_mut());
    }
}

/// This backend's calls not yet handed over, by (role, keyring, operation).
fn take_local() -> BTreeMap<(u32, u32, u8), u64> {
    CELLS.with(|c| c.borrow().values().for_each(|cell| cell.spill()));
    SPILLED.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

/// The local calls as they would be handed over now, without handing them.
pub fn peek_local() -> BTreeMap<(u32, u32, u8), u64> {
    let mut out = SPILLED.with(|s| s.borrow().clone());
    CELLS.with(|c| {
        for cell in c.borrow().values() {
            for op in AccessOp::ALL {
                let n = cell.calls[op as usize].get();
                if n > 0 {
                    let key = (cell.role.get().to_u32(), cell.keyring_id, op as u8);
                    *out.entry(key).or_default() += n;
                }
            }
        }
    });
    out
}

pub fn my_db() -> u32 {
    // SAFETY: set once the backend is connected to a database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

pub fn current_hour() -> u32 {
    // SAFETY: reads the clock.
    hour_of(unsafe { pg_sys::GetCurrentTimestamp() })
}

/// Hands this backend's calls to shared memory. Never an error.
fn hand_over() {
    let local = take_local();
    if local.is_empty() {
        return;
    }
    let (db, hour) = (my_db(), current_hour());
    for ((role, ring, op), n) in local {
        access_table::add((db, role, ring, op, hour), n);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_backend_exit(_code: i32, _arg: pg_sys::Datum) {
    hand_over();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if crate::pg::xact::is_end(event) {
        hand_over();
        let reset = RESET_AT_COMMIT.with(|r| r.replace(false));
        if reset && event == pg_sys::XactEvent::XACT_EVENT_COMMIT {
            // Never an error here: the transaction has committed.
            if let Err(e) = access_table::reset(my_db()) {
                report::log_server(format!(
                    "{}; the reset holds until the server stops, a crash before that undoes it",
                    e.message()
                ));
            }
        }
    }
}

/// Resets this database's statistics when the transaction commits.
pub fn reset_at_commit() {
    register_callbacks();
    RESET_AT_COMMIT.with(|r| r.set(true));
}

/// Benchmark builds only: switches recording off (or on) for this session.
#[cfg(feature = "bench_uncounted")]
#[pg_extern(volatile, parallel_unsafe)]
fn _bench_record_key_access(on: bool) -> bool {
    BENCH_OFF.store(!on, std::sync::atomic::Ordering::Relaxed);
    on
}

/// Benchmark builds only: nanoseconds per [`Access::record`] call, timed
/// over `n` calls on a cell of its own (never handed over): the hot path's
/// cost without the noise of whole queries.
#[cfg(feature = "bench_uncounted")]
#[pg_extern(volatile, parallel_unsafe)]
fn _bench_record_key_access_ns(n: i32) -> f64 {
    let cell = Access {
        keyring_id: 0,
        keyring: "bench".into(),
        role: Cell::new(pg_sys::InvalidOid),
        calls: Default::default(),
    };
    let n = n.max(1);
    let start = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(&cell).record(AccessOp::Decrypt, 1);
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    std::hint::black_box(cell.calls[1].get());
    ns
}
