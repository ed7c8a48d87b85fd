//! A page for key material shared by every process of the server.
//!
//! PostgreSQL's main shared memory segment is the wrong place for a key: it
//! is not page-aligned per structure, may use huge pages (no `mlock`, no
//! per-range `madvise`), and is re-created after any backend crash — which
//! would drop a root key in the middle of a KMS outage. So the postmaster
//! maps one anonymous shared mapping of its own in `_PG_init`, before any
//! backend exists: every backend and parallel worker inherits it by fork,
//! and it outlives crash restarts (only the postmaster's exit unmaps it).
//! It is excluded from core dumps (`MADV_DONTDUMP`) and locked in RAM
//! (`mlock`, so it is never written to swap); it is not excluded from
//! children (`MADV_DONTFORK` would defeat its purpose).
//!
//! What remains reachable: anyone who can act as the server's OS user can
//! read the page through `/proc/<pid>/mem` or ptrace, and the key schedules
//! each backend expands from it live in that backend's ordinary memory.

use std::ptr::NonNull;

/// The mapping: `len` bytes, zeroed at creation, shared by every process
/// forked after it.
#[derive(Clone, Copy)]
pub struct SecurePage {
    ptr: NonNull<u8>,
}

// SAFETY: a raw shared mapping; access is coordinated by the caller's locks.
unsafe impl Send for SecurePage {}
unsafe impl Sync for SecurePage {}

/// What could not be done to protect the page (it is still usable).
pub enum Weakness {
    /// `mlock` failed (`RLIMIT_MEMLOCK`): the page may be swapped out.
    NotLocked(std::io::Error),
    /// `madvise(MADV_DONTDUMP)` failed: a core dump may contain it.
    Dumpable(std::io::Error),
}

impl SecurePage {
    /// Maps `len` bytes (rounded up to whole pages). `None` if the mapping
    /// itself fails; otherwise the page, with what could not be applied.
    pub fn map(len: usize) -> Option<(SecurePage, Vec<Weakness>)> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = len.div_ceil(page) * page;
        // SAFETY: an anonymous mapping at an address of the kernel's choice.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let mut weak = Vec::new();
        // SAFETY: ptr/len is the mapping just made.
        unsafe {
            if libc::madvise(ptr, len, libc::MADV_DONTDUMP) != 0 {
                weak.push(Weakness::Dumpable(std::io::Error::last_os_error()));
            }
            if libc::mlock(ptr, len) != 0 {
                weak.push(Weakness::NotLocked(std::io::Error::last_os_error()));
            }
        }
        let ptr = NonNull::new(ptr.cast::<u8>())?;
        Some((SecurePage { ptr }, weak))
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}
