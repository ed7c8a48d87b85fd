//! Function-local settings: what a function's `SET` clause does, from Rust.

use std::ffi::CStr;

use pgrx::pg_sys;

/// A GUC nest level: settings made with [`GucNest::set`] last until the
/// guard is dropped, like a function's `SET` clause (allowed in parallel
/// mode too). On an ERROR the (sub)transaction abort pops the level itself,
/// so the guard then does nothing.
pub struct GucNest {
    level: i32,
}

impl GucNest {
    pub fn new() -> Self {
        // SAFETY: pushes a nest level; popped in Drop or by abort.
        GucNest {
            level: unsafe { pg_sys::NewGUCNestLevel() },
        }
    }

    /// Sets `name` to `value` until this level is popped.
    pub fn set(&self, name: &CStr, value: &CStr) {
        // SAFETY: both pointers are valid NUL-terminated strings for the
        // call; GUC_ACTION_SAVE ties the value to the current nest level.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
    }
}

impl Drop for GucNest {
    fn drop(&mut self) {
        // Mid-unwind from an ERROR, abort processing restores the settings;
        // touching GUC state then is not allowed.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: pops the level pushed in `new`, in the same transaction.
        unsafe { pg_sys::AtEOXact_GUC(true, self.level) };
    }
}
