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
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use manna_crypt_core::secret::Key32;
use pgrx::pg_sys;
use pgrx::prelude::*;
use zeroize::Zeroize;

use crate::error::{McError, McResult};
use crate::pg::secure_page::{SecurePage, Weakness};
use crate::pg::shmem::{self, Held, Part};

/// Distinct root-key setting values the server keeps loaded at once.
pub const SLOTS: usize = 16;
/// Bytes of a failed load's message kept for later errors and `info()`.
const ERROR_MAX: usize = 240;
/// How long a waiter sleeps before re-checking that the loader lives.
const WAIT_MS: i64 = 1000;
/// Wait event shown in pg_stat_activity while waiting (PG_WAIT_EXTENSION).
const WAIT_EVENT: u32 = 0x0700_0000;

pub type Digest = [u8; 32];

/// A key slot in the secure page. `valid` is written last on store and
/// first on wipe; `generation` changes on every store and wipe, so a
/// backend's copy can be checked without a lock.
#[repr(C)]
struct KeySlot {
    valid: AtomicU32,
    generation: AtomicU64,
    digest: Digest,
    /// Which version of the source the key came from (a key file's
    /// identity and modification time; 0 for a command).
    version: u64,
    key: [u8; 32],
    loaded_at: pg_sys::TimestampTz,
}

/// Coordination for one slot, in main shared memory.
#[repr(C)]
#[derive(Clone, Copy)]
struct SlotState {
    in_use: bool,
    digest: Digest,
    loader_pid: i32,
    loading_since: pg_sys::TimestampTz,
    failures: u32,
    first_failure: pg_sys::TimestampTz,
    next_attempt: pg_sys::TimestampTz,
    last_used: pg_sys::TimestampTz,
    error_len: u32,
    error: [u8; ERROR_MAX],
}

#[repr(C)]
struct Coord {
    cv: pg_sys::ConditionVariable,
    slots: [SlotState; SLOTS],
}

static PAGE: OnceLock<SecurePage> = OnceLock::new();
static COORD: AtomicPtr<Coord> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());

pub const PART: Part = Part {
    name: c"manna_crypt root keys",
    size: || size_of::<Coord>(),
    lwlocks: 1,
    init,
};

/// In the postmaster's `_PG_init`, when preloading: maps the key page.
pub fn map_page() {
    match SecurePage::map(size_of::<[KeySlot; SLOTS]>()) {
        None => log_startup("could not map the root key page: root keys cannot be loaded".into()),
        Some((page, weak)) => {
            for w in weak {
                log_startup(match w {
                    Weakness::NotLocked(e) => format!(
                        "could not lock the root key page in memory ({e}); it may be swapped \
                         out (raise the server's RLIMIT_MEMLOCK)"
                    ),
                    Weakness::Dumpable(e) => {
                        format!("could not exclude the root key page from core dumps ({e})")
                    }
                });
            }
            let _ = PAGE.set(page);
        }
    }
}

fn log_startup(message: String) {
    crate::pg::report::log_server(message);
}

/// shmem_startup_hook: in the postmaster at start and after every crash
/// restart. Rebuilds the coordination from the keys still in the page.
unsafe fn init(ptr: *mut u8, locks: *mut pg_sys::LWLockPadded, fresh: bool) {
    let coord = ptr.cast::<Coord>();
    COORD.store(coord, Ordering::Release);
    // SAFETY: the tranche has one lock, at `locks`.
    LOCK.store(unsafe { &raw mut (*locks).lock }, Ordering::Release);
    if !fresh {
        return;
    }
    // SAFETY: the struct was just allocated (zeroed) for us alone.
    unsafe {
        pg_sys::ConditionVariableInit(&raw mut (*coord).cv);
        if let Some(page) = PAGE.get() {
            let now = pg_sys::GetCurrentTimestamp();
            for (i, key) in (*key_slots(page)).iter().enumerate() {
                if key.valid.load(Ordering::Acquire) == 1 {
                    let st = &mut (*coord).slots[i];
                    st.in_use = true;
                    st.digest = key.digest;
                    st.last_used = now;
                }
            }
        }
    }
}

/// The page as key slots: at least this large, zeroed at creation (a valid
/// array of empty slots), mapped for the life of the process.
fn key_slots(page: &SecurePage) -> *mut [KeySlot; SLOTS] {
    page.as_ptr().cast::<[KeySlot; SLOTS]>()
}

/// The shared state of this process. Its contents are read and written
/// only under `lock`, except the lock-free checks of [`is_current`].
struct Shared {
    coord: *mut Coord,
    keys: *mut [KeySlot; SLOTS],
    lock: *mut pg_sys::LWLock,
}

impl Shared {
    /// # Safety
    /// Only while holding `lock`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn coord(&self) -> &mut Coord {
        // SAFETY: set up at startup, valid for the process's life.
        unsafe { &mut *self.coord }
    }

    /// # Safety
    /// Only while holding `lock`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn keys(&self) -> &mut [KeySlot; SLOTS] {
        // SAFETY: as in `coord`.
        unsafe { &mut *self.keys }
    }

    fn hold(&self) -> Held {
        // SAFETY: our tranche's lock, initialised at startup.
        unsafe { Held::exclusive(self.lock) }
    }
}

/// Why shared root keys are unavailable, as the error every key operation gets.
pub fn unavailable() -> Option<McError> {
    if !shmem::preloaded() {
        return Some(McError::WrongState {
            message: "manna_crypt is not loaded through shared_preload_libraries".into(),
            detail: Some(
                "the root key is kept in shared memory, which exists only when the library is \
                 preloaded at server start"
                    .into(),
            ),
            hint: Some(
                "add manna_crypt to shared_preload_libraries in postgresql.conf and restart the \
                 server"
                    .into(),
            ),
        });
    }
    if PAGE.get().is_none() || COORD.load(Ordering::Acquire).is_null() {
        return Some(McError::RootKeyIo {
            message: "the shared root key page could not be set up".into(),
            detail: None,
            hint: Some("see the server log from server start".into()),
        });
    }
    None
}

fn shared() -> McResult<Shared> {
    if let Some(e) = unavailable() {
        return Err(e);
    }
    Ok(Shared {
        coord: COORD.load(Ordering::Acquire),
        keys: key_slots(PAGE.get().expect("checked")),
        lock: LOCK.load(Ordering::Acquire),
    })
}

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

fn idle_state() -> SlotState {
    SlotState {
        in_use: false,
        digest: [0; 32],
        loader_pid: 0,
        loading_since: 0,
        failures: 0,
        first_failure: 0,
        next_attempt: 0,
        last_used: 0,
        error_len: 0,
        error: [0; ERROR_MAX],
    }
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

fn wipe(key: &mut KeySlot) {
    key.valid.store(0, Ordering::Release);
    key.key.zeroize();
    key.digest = [0; 32];
    key.generation.fetch_add(1, Ordering::AcqRel);
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
    Ok(if st.loader_pid != 0 {
        Status::Loading { pid: st.loader_pid }
    } else if st.failures > 0 {
        Status::Failing {
            attempts: st.failures,
            since: st.first_failure,
            next: st.next_attempt,
            error: last_error(st),
        }
    } else if key.valid.load(Ordering::Acquire) == 1 {
        Status::Loaded {
            loaded_at: key.loaded_at,
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
