//! Root keys shared by every backend of the server: loaded at most once per
//! server for each value of the root-key settings, by the first backend
//! that needs one, and then read by every connection and parallel worker.
//!
//! Two places, for two lifetimes:
//!
//! - the key material sits in a [`SecurePage`] the postmaster maps in
//!   `_PG_init` (locked, never dumped, inherited by every fork). It survives
//!   crash restarts, so a key loaded before a KMS outage keeps serving
//!   after a backend crash during it;
//! - the coordination (who is loading, failures and back-off, the condition
//!   variable) sits in the main shared memory segment, which is re-created
//!   after a crash: it is then rebuilt from the page.
//!
//! Slots are keyed by a digest of the setting's value (`file` or `command`
//! and its text), so per-database and per-role settings each get their own;
//! there are [`SLOTS`] of them, the least recently used idle one is evicted
//! (and wiped) when a new value needs a slot.
//!
//! Loading never holds an LWLock while the source runs (LWLock waits are
//! uninterruptible): the loader marks the slot "loading by pid N" under the
//! lock, runs the source unlocked, and records the outcome under the lock;
//! others wait on the condition variable, interruptibly, re-checking every
//! second whether the loader is still alive. A loader stopped by an error
//! or a cancel clears its mark as its frames unwind; one that exits (a
//! termination is a FATAL, which does not unwind) clears it in a
//! `before_shmem_exit` callback; one killed outright is found dead by the
//! waiters.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use manna_crypt_core::secret::Key32;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{McError, McResult};

mod memory;

use memory::{
    idle_state, key_slots, shared, wipe, Coord, KeySlot, Shared, SlotState, ERROR_MAX, PAGE,
};
pub use memory::{map_page, unavailable, Digest, PART, SLOTS};

/// How long a waiter sleeps before re-checking that the loader lives.
const WAIT_MS: i64 = 1000;
/// Wait event shown in pg_stat_activity while waiting (PG_WAIT_EXTENSION).
const WAIT_EVENT: u32 = 0x0700_0000;

/// A root key copied out of the page, with the slot and generation it came
/// from (see [`is_current`]).
pub struct Obtained {
    pub key: Key32,
    pub slot: usize,
    pub generation: u64,
}

/// How a load runs.
pub struct Opts {
    /// Load even if a key is there or the back-off says wait (`reload_root_key()`).
    pub force: bool,
    /// Remember failures and refuse until the next attempt is due (command
    /// sources); `None`: every call tries again (a file is cheap to read).
    pub backoff_max: Option<Duration>,
    /// A loading mark older than this belongs to a stuck or dead loader.
    pub stale_after: Duration,
    /// The source's version now: a stored key of another version is
    /// replaced (and wiped), as when a key file was replaced.
    pub version: u64,
}

/// Whether the key a backend copied from `slot` at `generation` is still
/// the one stored for `digest` (no lock: checked seqlock-style).
pub fn is_current(digest: &Digest, slot: usize, generation: u64) -> bool {
    let Some(page) = PAGE.get() else { return false };
    // SAFETY: atomics and a digest compare without the lock: the
    // generation read before and after tells whether they were consistent.
    let key = unsafe { &(*key_slots(page))[slot] };
    key.generation.load(Ordering::Acquire) == generation
        && key.valid.load(Ordering::Acquire) == 1
        && key.digest == *digest
        && key.generation.load(Ordering::Acquire) == generation
}

enum Step {
    Have(Obtained),
    Wait,
    Refuse(McError),
    Load(usize),
}

/// The root key for `digest`: from shared memory, or loaded by `load` here
/// (at most one backend loads a digest at a time; the others wait for it).
pub fn obtain(
    digest: &Digest,
    opts: &Opts,
    load: impl FnOnce() -> McResult<Key32>,
) -> McResult<Obtained> {
    let sh = shared()?;
    let mut force = opts.force;
    let mut waited = false;
    let step = loop {
        let step = {
            let _held = sh.hold();
            // SAFETY: under the lock.
            unsafe { decide(sh.coord(), sh.keys(), digest, force, opts) }
        };
        match step {
            Step::Wait => {
                wait(&sh);
                waited = true;
                // A load finished (or failed) while we waited: that was the
                // fresh load a forced reload asked for.
                force = false;
            }
            other => break other,
        }
    };
    if waited {
        // SAFETY: ends the sleep prepared in `wait`.
        unsafe { pg_sys::ConditionVariableCancelSleep() };
    }
    match step {
        Step::Have(o) => Ok(o),
        Step::Refuse(e) => Err(e),
        Step::Load(slot) => run_load(sh, slot, opts, load),
        Step::Wait => unreachable!("the loop breaks on every other step"),
    }
}

fn now() -> pg_sys::TimestampTz {
    // SAFETY: no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn my_pid() -> i32 {
    // SAFETY: set at backend start.
    unsafe { pg_sys::MyProcPid }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Under the lock: what this backend does next.
fn decide(
    coord: &mut Coord,
    keys: &mut [KeySlot; SLOTS],
    digest: &Digest,
    force: bool,
    opts: &Opts,
) -> Step {
    let now = now();
    let slot = match coord
        .slots
        .iter()
        .position(|s| s.in_use && s.digest == *digest)
    {
        Some(i) => i,
        None => match allocate(coord, keys) {
            Some(i) => {
                coord.slots[i] = SlotState {
                    in_use: true,
                    digest: *digest,
                    ..idle_state()
                };
                i
            }
            None => {
                return Step::Refuse(McError::RootKeyIo {
                    message: format!(
                        "more than {SLOTS} different root key settings are being loaded at once"
                    ),
                    detail: None,
                    hint: Some("use fewer distinct root key settings per server".into()),
                })
            }
        },
    };
    let st = &mut coord.slots[slot];
    st.last_used = now;
    if st.loader_pid != 0 {
        let stale = now.saturating_sub(st.loading_since) > micros(opts.stale_after);
        if st.loader_pid != my_pid() && alive(st.loader_pid) && !stale {
            // SAFETY: prepared under the lock, so a broadcast after we
            // release it cannot be missed.
            unsafe { pg_sys::ConditionVariablePrepareToSleep(&raw mut coord.cv) };
            return Step::Wait;
        }
        st.loader_pid = 0;
    }
    let key = &keys[slot];
    if !force && key.valid.load(Ordering::Acquire) == 1 && key.version == opts.version {
        return Step::Have(Obtained {
            key: Key32::from_array(key.key),
            slot,
            generation: key.generation.load(Ordering::Acquire),
        });
    }
    if !force && opts.backoff_max.is_some() && st.failures > 0 && now < st.next_attempt {
        return Step::Refuse(backoff_error(st));
    }
    st.loader_pid = my_pid();
    st.loading_since = now;
    Step::Load(slot)
}

/// A free slot, else the least recently used one nobody is loading (its
/// key wiped).
fn allocate(coord: &mut Coord, keys: &mut [KeySlot; SLOTS]) -> Option<usize> {
    if let Some(i) = coord.slots.iter().position(|s| !s.in_use) {
        wipe(&mut keys[i]);
        return Some(i);
    }
    let i = (0..SLOTS)
        .filter(|&i| coord.slots[i].loader_pid == 0)
        .min_by_key(|&i| coord.slots[i].last_used)?;
    wipe(&mut keys[i]);
    coord.slots[i] = idle_state();
    Some(i)
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Sleeps on the condition variable (prepared in `decide`) for a broadcast
/// or a second; a cancel or statement_timeout interrupts it.
fn wait(sh: &Shared) {
    // SAFETY: the CV lives in shared memory for the server's life.
    unsafe {
        pg_sys::ConditionVariableTimedSleep(&raw mut (*sh.coord).cv, WAIT_MS, WAIT_EVENT);
    }
}

fn broadcast(sh: &Shared) {
    // SAFETY: as in `wait`.
    unsafe { pg_sys::ConditionVariableBroadcast(&raw mut (*sh.coord).cv) };
}

/// Clears this backend's loading mark if an error or a cancel unwinds
/// through the load before its outcome is recorded.
struct LoadingMark<'a> {
    sh: &'a Shared,
    slot: usize,
    armed: bool,
}

impl Drop for LoadingMark<'_> {
    fn drop(&mut self) {
        if self.armed {
            clear_mark(self.sh, self.slot);
        }
    }
}

fn clear_mark(sh: &Shared, slot: usize) {
    {
        let _held = sh.hold();
        // SAFETY: under the lock.
        let st = unsafe { &mut sh.coord().slots[slot] };
        if st.loader_pid == my_pid() {
            st.loader_pid = 0;
        }
    }
    broadcast(sh);
}

fn run_load(
    sh: Shared,
    slot: usize,
    opts: &Opts,
    load: impl FnOnce() -> McResult<Key32>,
) -> McResult<Obtained> {
    register_exit_callback();
    let mut mark = LoadingMark {
        sh: &sh,
        slot,
        armed: true,
    };
    let result = load();
    mark.armed = false;
    let outcome = {
        let _held = sh.hold();
        // SAFETY: under the lock.
        let (st, k) = unsafe { (&mut sh.coord().slots[slot], &mut sh.keys()[slot]) };
        st.loader_pid = 0;
        match result {
            Ok(key) => {
                st.failures = 0;
                st.error_len = 0;
                k.valid.store(0, Ordering::Release);
                k.digest = st.digest;
                k.version = opts.version;
                k.key.copy_from_slice(key.as_bytes());
                k.loaded_at = now();
                let generation = k.generation.fetch_add(1, Ordering::AcqRel) + 1;
                k.valid.store(1, Ordering::Release);
                Ok(Obtained {
                    key,
                    slot,
                    generation,
                })
            }
            // A failed reload while a key is loaded: the key keeps serving,
            // and no back-off starts (nothing waits for a key here).
            Err(e) if k.valid.load(Ordering::Acquire) == 1 => Err(e),
            Err(e) => match opts.backoff_max {
                Some(_) => {
                    record_failure(st, e, opts);
                    Err(backoff_error(st))
                }
                // A file is read again on the next try: nothing to remember.
                None => Err(e),
            },
        }
    };
    broadcast(&sh);
    outcome
}

fn record_failure(st: &mut SlotState, e: McError, opts: &Opts) {
    let now = now();
    st.failures = st.failures.saturating_add(1);
    if st.failures == 1 {
        st.first_failure = now;
    }
    let max = opts.backoff_max.unwrap_or(Duration::ZERO);
    let step = Duration::from_secs(1)
        .checked_mul(1u32 << (st.failures - 1).min(20))
        .unwrap_or(max)
        .min(max);
    st.next_attempt = now.saturating_add(micros(step));
    let text = e.message();
    let mut n = text.len().min(ERROR_MAX);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    st.error[..n].copy_from_slice(&text.as_bytes()[..n]);
    st.error_len = n as u32;
}

fn last_error(st: &SlotState) -> String {
    String::from_utf8_lossy(&st.error[..st.error_len as usize]).into_owned()
}

/// 58030 for a failing command: the last attempt's error, with how many
/// attempts failed since when and when the next one is.
fn backoff_error(st: &SlotState) -> McError {
    let n = st.failures;
    let attempts = if n == 1 { "attempt" } else { "attempts" };
    McError::RootKeyIo {
        message: last_error(st),
        detail: Some(format!(
            "{n} {attempts} to load the root key failed since {}; the next attempt is made at {}",
            timestamp_text(st.first_failure),
            timestamp_text(st.next_attempt)
        )),
        hint: Some(
            "the last line of the command's standard error, if any, is in the server log; \
             manna_crypt.reload_root_key() retries at once"
                .into(),
        ),
    }
}

pub fn timestamp_text(ts: pg_sys::TimestampTz) -> String {
    // SAFETY: returns a pointer to a static buffer holding a C string.
    unsafe { CStr::from_ptr(pg_sys::timestamptz_to_str(ts)) }
        .to_string_lossy()
        .into_owned()
}

/// What shared memory knows about `digest`, for `info()`.
pub enum Status {
    Loaded {
        loaded_at: pg_sys::TimestampTz,
    },
    Loading {
        pid: i32,
    },
    Failing {
        attempts: u32,
        since: pg_sys::TimestampTz,
        next: pg_sys::TimestampTz,
        error: String,
    },
    Unknown,
}

pub fn status(digest: &Digest) -> McResult<Status> {
    let sh = shared()?;
    let _held = sh.hold();
    // SAFETY: under the lock.
    let (coord, keys) = unsafe { (sh.coord(), sh.keys()) };
    let Some(i) = coord
        .slots
        .iter()
        .position(|s| s.in_use && s.digest == *digest)
    else {
        return Ok(Status::Unknown);
    };
    let st = &coord.slots[i];
    let key = &keys[i];
    Ok(if st.loader_pid != 0 && alive(st.loader_pid) {
        Status::Loading { pid: st.loader_pid }
    } else if key.valid.load(Ordering::Acquire) == 1 {
        Status::Loaded {
            loaded_at: key.loaded_at,
        }
    } else if st.failures > 0 {
        Status::Failing {
            attempts: st.failures,
            since: st.first_failure,
            next: st.next_attempt,
            error: last_error(st),
        }
    } else {
        Status::Unknown
    })
}

fn register_exit_callback() {
    static REGISTERED: AtomicU32 = AtomicU32::new(0);
    if REGISTERED.swap(1, Ordering::Relaxed) == 0 {
        // SAFETY: a #[pg_guard] callback for the life of the process.
        unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    }
}

/// A loader that exits (a termination is a FATAL: no unwinding) clears
/// its marks, so the waiters take over at once.
#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    let Ok(sh) = shared() else { return };
    let mine = {
        let _held = sh.hold();
        // SAFETY: under the lock.
        let coord = unsafe { sh.coord() };
        let mut mine = false;
        for st in coord.slots.iter_mut().filter(|s| s.loader_pid == my_pid()) {
            st.loader_pid = 0;
            mine = true;
        }
        mine
    };
    if mine {
        broadcast(&sh);
    }
}
