//! Whose rights a piece of work runs with.
//!
//! Three identities, one switch ([`run_as`]):
//!
//! - [`Identity::ExtensionOwner`]: the key tables belong to the extension's
//!   owner and callers cannot read them. A key cache miss or a lifecycle
//!   function switches to the owner the way a SECURITY DEFINER function
//!   would, so the hot path needs no SECURITY DEFINER wrapper and pays
//!   nothing per row.
//! - [`Identity::TableOwner`]: maintenance of a user's table (re-encryption)
//!   runs as that table's owner inside a *security-restricted operation*,
//!   PostgreSQL's own rule for VACUUM, ANALYZE, CLUSTER and REINDEX since
//!   CVE-2022-1552: the owner's triggers, CHECKs and index expressions then
//!   run with the owner's rights, never the caller's, and cannot change the
//!   session (SET ROLE, temp objects, ...).
//! - [`Identity::Caller`]: the role that called into the extension, also
//!   from inside one of the switches above — for work that must be judged
//!   by the caller's own privileges (reading a user's table).
//!
//! Every switch also fixes `search_path = pg_catalog, pg_temp`, so no object
//! of another role is found by an unqualified name, and `row_security = off`,
//! so a query that row-level security would filter fails instead of silently
//! seeing fewer rows (a superuser bypasses RLS anyway, and no policy function
//! runs); it is undone when the closure returns. On an ERROR the
//! (sub)transaction abort restores the user and settings itself, exactly as
//! for a SECURITY DEFINER function.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::pg_sys;

use super::guc::GucNest;
use super::spi::{self, Mode};
use crate::error::{McError, McResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    ExtensionOwner,
    /// The owner of this table, in a security-restricted operation.
    TableOwner(pg_sys::Oid),
    Caller,
}

thread_local! {
    static OWNER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// The user id before the outermost switch: who called us (0 outside any
/// switch). A process-wide static rather than a thread-local: the key
/// access statistics read it on every encrypt and decrypt, and a
/// thread-local in a loaded library costs a `__tls_get_addr` call per read.
/// PostgreSQL runs one thread per process.
static CALLER: AtomicU32 = AtomicU32::new(0);

const EXTENSION_OWNER: &str =
    "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'manna_crypt'";
const TABLE_OWNER: &str = "SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1";

fn extension_owner() -> McResult<pg_sys::Oid> {
    let cached = OWNER.with(Cell::get);
    if cached != pg_sys::InvalidOid {
        return Ok(cached);
    }
    let owner = spi::one::<pg_sys::Oid>(Mode::Read, EXTENSION_OWNER, &[])?.ok_or_else(|| {
        McError::WrongState {
            message: "extension \"manna_crypt\" is not installed in this database".into(),
            detail: None,
            hint: Some("CREATE EXTENSION manna_crypt".into()),
        }
    })?;
    OWNER.with(|c| c.set(owner));
    Ok(owner)
}

/// Forgets the cached extension owner (after DROP/CREATE EXTENSION).
pub fn forget_owner() {
    OWNER.with(|c| c.set(pg_sys::InvalidOid));
}

fn current() -> (pg_sys::Oid, i32) {
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: writes two out-parameters, nothing else.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context) };
    (user, sec_context)
}

// pgrx wraps every function of pg_sys in a sigsetjmp guard (so that an
// ERROR becomes a Rust panic), some 20 ns a call: too much for a call on
// every encrypt and decrypt. GetUserId only returns a static variable and
// cannot raise an ERROR, so it is declared here without the guard.
unsafe extern "C" {
    #[link_name = "GetUserId"]
    fn get_user_id_unguarded() -> pg_sys::Oid;
}

/// The role that called into the extension: the current user outside any
/// switch, the saved one inside. Cheap enough for every call.
#[inline]
pub fn caller_id() -> pg_sys::Oid {
    match CALLER.load(Ordering::Relaxed) {
        // SAFETY: reads the current user id; never raises an ERROR.
        0 => unsafe { get_user_id_unguarded() },
        oid => pg_sys::Oid::from(oid),
    }
}

/// The caller's role name, for audit rows.
pub fn caller_name() -> String {
    role_name(caller_id())
}

/// A role's name, `?` for a dropped role.
pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: with noerr = true this returns NULL or a palloc'd C string.
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, true);
        if name.is_null() {
            "?".into()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// Restores the user, security context and caller mark on the way out.
struct Restore {
    user: pg_sys::Oid,
    sec_context: i32,
    outer_caller: pg_sys::Oid,
    // Dropped after the user is restored: declared last.
    _settings: GucNest,
}

impl Drop for Restore {
    fn drop(&mut self) {
        CALLER.store(self.outer_caller.to_u32(), Ordering::Relaxed);
        // Mid-unwind from an ERROR, abort processing restores the user.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: restores what `run_as` saved, in the same transaction.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

/// Runs `f` with the rights of `who`, `search_path = pg_catalog, pg_temp`
/// and `row_security = off`.
pub fn run_as<T>(who: Identity, f: impl FnOnce() -> McResult<T>) -> McResult<T> {
    let (user, sec_context) = current();
    let (target, context) = match who {
        Identity::ExtensionOwner => (
            extension_owner()?,
            sec_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        ),
        Identity::TableOwner(table) => (
            spi::one::<pg_sys::Oid>(Mode::Read, TABLE_OWNER, &[table.into()])?
                .ok_or_else(|| McError::Internal("the table vanished".into()))?,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        ),
        Identity::Caller => (caller_id(), sec_context),
    };
    let outer_caller = pg_sys::Oid::from(CALLER.swap(caller_id().to_u32(), Ordering::Relaxed));
    let restore = Restore {
        user,
        sec_context,
        outer_caller,
        _settings: GucNest::new(),
    };
    // SAFETY: the switch mirrors fmgr_security_definer(); `restore` undoes it.
    unsafe { pg_sys::SetUserIdAndSecContext(target, context) };
    restore
        ._settings
        .set(c"search_path", c"pg_catalog, pg_temp");
    restore._settings.set(c"row_security", c"off");
    let result = f();
    drop(restore);
    result
}
