//! The memory of the shared root keys: the key page (inherited from the
//! postmaster, kept across crash restarts), the coordination struct in the
//! main segment, and the setup of both. See [`super`] for how they are used.

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use pgrx::pg_sys;
use zeroize::Zeroize;

use crate::error::{McError, McResult};
use crate::pg::secure_page::{SecurePage, Weakness};
use crate::pg::shmem::{self, Held, Part};

/// Distinct root-key setting values the server keeps loaded at once.
pub const SLOTS: usize = 16;
/// Bytes of a failed load's message kept for later errors and `info()`.
pub const ERROR_MAX: usize = 240;

pub type Digest = [u8; 32];

/// A key slot in the secure page. `valid` is written last on store and
/// first on wipe; `generation` changes on every store and wipe, so a
/// backend's copy can be checked without a lock.
#[repr(C)]
pub struct KeySlot {
    pub valid: AtomicU32,
    pub generation: AtomicU64,
    pub digest: Digest,
    /// Which version of the source the key came from (a key file's
    /// identity and modification time; 0 for a command).
    pub version: u64,
    pub key: [u8; 32],
    pub loaded_at: pg_sys::TimestampTz,
}

/// Coordination for one slot, in main shared memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SlotState {
    pub in_use: bool,
    pub digest: Digest,
    pub loader_pid: i32,
    pub loading_since: pg_sys::TimestampTz,
    pub failures: u32,
    pub first_failure: pg_sys::TimestampTz,
    pub next_attempt: pg_sys::TimestampTz,
    pub last_used: pg_sys::TimestampTz,
    pub error_len: u32,
    pub error: [u8; ERROR_MAX],
}

#[repr(C)]
pub struct Coord {
    pub cv: pg_sys::ConditionVariable,
    pub slots: [SlotState; SLOTS],
}

pub static PAGE: OnceLock<SecurePage> = OnceLock::new();
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
pub fn key_slots(page: &SecurePage) -> *mut [KeySlot; SLOTS] {
    page.as_ptr().cast::<[KeySlot; SLOTS]>()
}

/// The shared state of this process. Its contents are read and written
/// only under `lock`, except the lock-free checks of [`is_current`].
pub struct Shared {
    pub coord: *mut Coord,
    pub keys: *mut [KeySlot; SLOTS],
    pub lock: *mut pg_sys::LWLock,
}

impl Shared {
    /// # Safety
    /// Only while holding `lock`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn coord(&self) -> &mut Coord {
        // SAFETY: set up at startup, valid for the process's life.
        unsafe { &mut *self.coord }
    }

    /// # Safety
    /// Only while holding `lock`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn keys(&self) -> &mut [KeySlot; SLOTS] {
        // SAFETY: as in `coord`.
        unsafe { &mut *self.keys }
    }

    pub fn hold(&self) -> Held {
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

pub fn shared() -> McResult<Shared> {
    if let Some(e) = unavailable() {
        return Err(e);
    }
    Ok(Shared {
        coord: COORD.load(Ordering::Acquire),
        keys: key_slots(PAGE.get().expect("checked")),
        lock: LOCK.load(Ordering::Acquire),
    })
}

pub fn idle_state() -> SlotState {
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

pub fn wipe(key: &mut KeySlot) {
    key.valid.store(0, Ordering::Release);
    key.key.zeroize();
    key.digest = [0; 32];
    key.generation.fetch_add(1, Ordering::AcqRel);
}
