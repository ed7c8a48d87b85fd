//! Root-key rotation across the cluster.
//!
//! The root-key settings belong to the server; the data keys they wrap live
//! in each database. A rotation is done only when every database has run
//! `rewrap_keys()`, and retiring the previous root key any earlier leaves
//! the other databases' keys unreadable (F0000) — gone for good once the
//! old key is deleted. A backend cannot read other databases, and a
//! setting's check hook cannot read catalogs, so each database leaves a
//! note in the data directory, `manna_crypt/root_keys/db_<oid>`: the
//! fingerprint of the root key its data keys are wrapped under (`none`
//! while it has none), written at commit of the transaction that changed
//! it, or whenever a backend finds the file stale. `current` records the
//! fingerprint of the root key most recently loaded as the current one.
//!
//! - `root_key_status()` lists every database with its note: `current`,
//!   `needs previous root key`, `another root key`, `no keys`, or `unknown`
//!   (no note yet: the extension is not installed there, or no session has
//!   opened its keys since 0.2.0 — run `rewrap_keys()` there).
//! - Clearing `previous_root_key_file`/`_command` (a reload, `ALTER
//!   SYSTEM`, `SET`) is refused while a note names a root key other than the
//!   current one: the setting keeps its value and the reason is logged.
//!
//! The notes are per data directory: a standby keeps its own, written by
//! its own backends, and a base backup carries the primary's.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::ffi::CStr;
use std::path::PathBuf;

use pgrx::pg_sys;
use pgrx::prelude::*;

thread_local! {
    /// This database's note, to be written when the transaction commits.
    static PENDING: RefCell<Option<String>> = const { RefCell::new(None) };
    /// The note this backend last wrote or found (spares rewriting it).
    static WRITTEN: RefCell<Option<String>> = const { RefCell::new(None) };
    static CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// The note of a database without data keys.
pub const NO_KEYS: &str = "none";

pub fn dir() -> PathBuf {
    // SAFETY: DataDir is set before any extension code runs in a backend.
    let data = unsafe { CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(data.to_string_lossy().into_owned()).join("manna_crypt/root_keys")
}

/// Replaces a note atomically (write, then rename). Best effort: a note
/// that cannot be written only makes `root_key_status()` less complete.
fn write_note(name: &str, value: &str) {
    let dir = dir();
    let _ = std::fs::create_dir_all(&dir);
    let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
    if std::fs::write(&tmp, value).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(name));
    }
}

fn read_note(name: &str) -> Option<String> {
    std::fs::read_to_string(dir().join(name))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn my_note_name() -> String {
    // SAFETY: MyDatabaseId is set once the backend has connected.
    format!("db_{}", unsafe { pg_sys::MyDatabaseId }.to_u32())
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let pending = match event {
        XACT_EVENT_COMMIT => PENDING.with(|p| p.borrow_mut().take()),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT => {
            PENDING.with(|p| p.borrow_mut().take());
            None
        }
        _ => None,
    };
    if let Some(value) = pending {
        write_note(&my_note_name(), &value);
        WRITTEN.with(|w| *w.borrow_mut() = Some(value));
    }
}

/// Notes, for this transaction's commit, the root key this database's data
/// keys are wrapped under (`None`: it has none yet).
pub fn note_database(fingerprint: Option<&str>) {
    let value = fingerprint.unwrap_or(NO_KEYS).to_owned();
    if WRITTEN.with(|w| w.borrow().as_deref() == Some(value.as_str())) {
        return;
    }
    if !CALLBACK.with(|c| c.replace(true)) {
        // SAFETY: a function pointer that lives as long as the library.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut()) };
    }
    if read_note(&my_note_name()).as_deref() == Some(value.as_str()) {
        WRITTEN.with(|w| *w.borrow_mut() = Some(value));
        return;
    }
    PENDING.with(|p| *p.borrow_mut() = Some(value));
}

/// Notes the fingerprint of the root key just loaded as the current one.
pub fn note_current(fingerprint: &str) {
    if read_note("current").as_deref() != Some(fingerprint) {
        write_note("current", fingerprint);
    }
}

/// Every database's note: (database OID, fingerprint or "none").
pub fn database_notes() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut notes: Vec<(u32, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let oid = name.strip_prefix("db_")?.parse::<u32>().ok()?;
            Some((oid, read_note(&name)?))
        })
        .collect();
    notes.sort();
    notes
}

/// Why the previous root key may not be retired now, if it may not.
pub fn retire_refusal() -> Option<String> {
    let under: BTreeSet<String> = database_notes()
        .into_iter()
        .map(|(_, fp)| fp)
        .filter(|fp| fp != NO_KEYS)
        .collect();
    let current = read_note("current");
    let stale: Vec<&String> = under
        .iter()
        .filter(|fp| Some(fp.as_str()) != current.as_deref())
        .collect();
    if stale.is_empty() {
        return None;
    }
    Some(format!(
        "databases still have data keys wrapped under root key {}; run SELECT \
         manna_crypt.rewrap_keys() in each (see manna_crypt.root_key_status())",
        stale
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}
