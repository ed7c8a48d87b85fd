//! Shared memory: the parts of manna_crypt that live in PostgreSQL's main
//! shared memory segment, each with its own named LWLock tranche.
//!
//! A part is registered from `_PG_init` while the library is being preloaded
//! ([`preloaded`]); its space and locks are requested in
//! `shmem_request_hook` and it is initialised in `shmem_startup_hook`, which
//! the postmaster runs at start and again after every crash restart (the
//! main segment is re-created then). Backends are forked from the
//! postmaster and inherit the pointers each part keeps.
//!
//! Without preloading there is no shared memory: [`preloaded`] is false and
//! the callers refuse with a HINT instead of touching anything.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// One user of shared memory.
#[derive(Clone, Copy)]
pub struct Part {
    /// Names both the shared memory struct and its LWLock tranche.
    pub name: &'static CStr,
    /// Bytes it needs (computed at request time: may depend on settings).
    pub size: fn() -> usize,
    /// LWLocks in its tranche.
    pub lwlocks: i32,
    /// Called in the postmaster (or a single-user backend) with the struct,
    /// its first LWLock and whether the struct was just created (zeroed).
    pub init: unsafe fn(ptr: *mut u8, locks: *mut pg_sys::LWLockPadded, fresh: bool),
}

static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // Registration happens once, in `_PG_init`, on PostgreSQL's only thread.
    static PARTS: Cell<&'static [Part]> = const { Cell::new(&[]) };
}

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Whether the library was loaded through `shared_preload_libraries`, so
/// that the parts exist.
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Registers the parts and installs the hooks, and says whether it did:
/// only when called from `_PG_init` while `shared_preload_libraries` is
/// being processed (in the postmaster, or a single-user backend).
pub fn install(parts: &'static [Part]) -> bool {
    // SAFETY: a plain read of a flag PostgreSQL sets around preloading.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return false;
    }
    PARTS.with(|p| p.set(parts));
    PRELOADED.store(true, Ordering::Relaxed);
    // SAFETY: hooks are chained as PostgreSQL documents, once, in _PG_init.
    unsafe {
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn on_request() {
    // SAFETY: the previous hook, if any, is another library's valid hook.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
    }
    for part in PARTS.with(Cell::get) {
        // SAFETY: called in shmem_request_hook, where requests are allowed.
        unsafe {
            pg_sys::RequestAddinShmemSpace((part.size)());
            pg_sys::RequestNamedLWLockTranche(part.name.as_ptr(), part.lwlocks);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    // SAFETY: as in on_request.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
    }
    for part in PARTS.with(Cell::get) {
        // SAFETY: ShmemInitStruct under AddinShmemInitLock as PostgreSQL
        // requires; the size is the one requested.
        unsafe {
            let init_lock = addin_shmem_init_lock();
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let ptr = pg_sys::ShmemInitStruct(part.name.as_ptr(), (part.size)(), &mut found);
            let locks = pg_sys::GetNamedLWLockTranche(part.name.as_ptr());
            if !found {
                std::ptr::write_bytes(ptr.cast::<u8>(), 0, (part.size)());
            }
            (part.init)(ptr.cast(), locks, !found);
            pg_sys::LWLockRelease(init_lock);
        }
    }
}

/// `AddinShmemInitLock`, a macro in C: slot 21 of the main LWLock array
/// (lwlocknames.txt; the same in 15 to 18, and what pgrx itself uses).
///
/// # Safety
/// Only once shared memory exists (in shmem_startup_hook or later).
unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: the caller's contract; MainLWLockArray has far more than 22 slots.
    unsafe { &raw mut (*pg_sys::MainLWLockArray.add(21)).lock }
}

/// An LWLock held until dropped (also when a Rust panic unwinds; an ERROR
/// raised by PostgreSQL itself releases every LWLock anyway).
pub struct Held(*mut pg_sys::LWLock);

impl Held {
    /// Waits for `lock` (uninterruptibly: hold it only for short, non-failing work).
    ///
    /// # Safety
    /// `lock` must point to an initialised LWLock in shared memory.
    pub unsafe fn exclusive(lock: *mut pg_sys::LWLock) -> Held {
        // SAFETY: the caller's contract.
        unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
        Held(lock)
    }

    /// As [`Held::exclusive`], in shared mode.
    ///
    /// # Safety
    /// As for [`Held::exclusive`].
    pub unsafe fn shared(lock: *mut pg_sys::LWLock) -> Held {
        // SAFETY: the caller's contract.
        unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED) };
        Held(lock)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: acquired in the constructor; released once. After an
        // ERROR PostgreSQL may have released it already (LWLockReleaseAll),
        // so check first.
        unsafe {
            if pg_sys::LWLockHeldByMe(self.0) {
                pg_sys::LWLockRelease(self.0);
            }
        }
    }
}
