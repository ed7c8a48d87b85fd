//! Running catalog work as the extension's owner.
//!
//! Callers hold only EXECUTE on the SQL functions; the key tables are not
//! readable by them. The few places that read or write those tables (a key
//! cache miss, the lifecycle functions) switch to the extension owner the way
//! a SECURITY DEFINER function would, including a safe `search_path`, so the
//! hot path needs no SECURITY DEFINER wrapper and pays nothing per row.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{McError, McResult};

thread_local! {
    static OWNER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

fn extension_owner() -> McResult<pg_sys::Oid> {
    let cached = OWNER.with(Cell::get);
    if cached != pg_sys::InvalidOid {
        return Ok(cached);
    }
    let owner = read_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'manna_crypt'",
    )?
    .ok_or_else(|| McError::WrongState {
        message: "extension \"manna_crypt\" is not installed in this database".into(),
        detail: None,
        hint: Some("CREATE EXTENSION manna_crypt".into()),
    })?;
    OWNER.with(|c| c.set(owner));
    Ok(owner)
}

/// The first column of the first row of a read-only query (`None` when there
/// is no row). Unlike `Spi::get_one`, which runs through `SpiClient::update`
/// and so assigns a transaction id, this works on a hot standby and in a
/// parallel worker, where assigning one is an error.
pub fn read_one<T: FromDatum + IntoDatum>(query: &str) -> McResult<Option<T>> {
    Spi::connect(|client| {
        let rows = client.select(query, Some(1), &[])?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(rows.first().get_one::<T>()?)
    })
}

/// Forgets the cached owner (after DROP/CREATE EXTENSION).
pub fn forget() {
    OWNER.with(|c| c.set(pg_sys::InvalidOid));
}

struct Restore {
    user: pg_sys::Oid,
    sec_context: i32,
    guc_nest: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // On an error the transaction (or subtransaction) abort restores the
        // user id and the GUC nest level itself, exactly as it does for a
        // SECURITY DEFINER function; touching them mid-unwind is not allowed.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: plain backend calls restoring what `as_owner` saved, in the
        // same transaction and nesting level.
        unsafe {
            pg_sys::AtEOXact_GUC(true, self.guc_nest);
            pg_sys::SetUserIdAndSecContext(self.user, self.sec_context);
        }
    }
}

/// Sets a setting for the current GUC nest level only, as a function's
/// `SET` clause does (allowed in parallel mode too).
///
/// # Safety
/// The caller must have pushed a level with `NewGUCNestLevel()` and pop it
/// with `AtEOXact_GUC()` (or leave that to transaction abort on error).
pub unsafe fn set_local(name: &CStr, value: &CStr) {
    // SAFETY: both pointers are valid NUL-terminated strings for the call.
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

/// Runs `f` as the extension owner with `search_path = pg_catalog, pg_temp`.
pub fn as_owner<T>(f: impl FnOnce() -> McResult<T>) -> McResult<T> {
    let owner = extension_owner()?;
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: GetUserIdAndSecContext writes two out-parameters; the switch
    // mirrors fmgr_security_definer() and is undone by `Restore`.
    let _restore = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        let guc_nest = pg_sys::NewGUCNestLevel();
        let restore = Restore {
            user,
            sec_context,
            guc_nest,
        };
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        set_local(c"search_path", c"pg_catalog, pg_temp");
        restore
    };
    f()
}

/// The role calling the current function (before any switch).
pub fn caller() -> String {
    // SAFETY: GetUserNameFromId with noerr=true returns NULL or a palloc'd C string.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true);
        if name.is_null() {
            "?".into()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}
