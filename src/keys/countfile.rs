//! The counter files: one per database, `manna_crypt/counters/db_<oid>` in
//! the data directory (beside `manna_crypt/root_keys/`, see
//! [`super::rootstatus`]), in the format of `manna_crypt_core::budget`.
//!
//! A file is replaced durably: written to a temporary file, flushed, renamed
//! over the old one, and the directory flushed, so after a crash it holds
//! either the old or the new counts, never a torn mix. Flushing follows
//! PostgreSQL's `fsync` setting, as PostgreSQL's own files do.
//!
//! The files are per data directory: a standby keeps its own, and a base
//! backup carries the primary's.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use manna_crypt_core::budget::{self, Counts};
use pgrx::pg_sys;

use crate::error::{McError, McResult};

pub fn dir() -> PathBuf {
    // SAFETY: DataDir is set before any extension code runs, in the
    // postmaster too.
    let data = unsafe { CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(data.to_string_lossy().into_owned()).join("manna_crypt/counters")
}

fn path(db: u32) -> PathBuf {
    dir().join(format!("db_{db}"))
}

fn io_error(db: u32, what: &str, e: impl std::fmt::Display) -> McError {
    McError::CounterIo {
        message: format!("could not {what} the usage counters of database {db}"),
        detail: format!("{}: {e}", path(db).display()),
    }
}

/// A database's stored counters; none while it has no file yet. A file that
/// exists but cannot be read or parsed is an error: counting from zero
/// instead would under-count.
pub fn read(db: u32) -> McResult<Counts> {
    match fs::read_to_string(path(db)) {
        Ok(text) => budget::parse(&text).map_err(|e| io_error(db, "parse", e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Counts::new()),
        Err(e) => Err(io_error(db, "read", e)),
    }
}

fn sync_wanted() -> bool {
    // SAFETY: a plain read of the `fsync` setting's variable.
    unsafe { pg_sys::enableFsync }
}

/// Replaces a database's counters durably (see the module comment).
pub fn write(db: u32, counts: &Counts) -> McResult<()> {
    write_io(db, counts).map_err(|e| io_error(db, "write", e))
}

fn write_io(db: u32, counts: &Counts) -> std::io::Result<()> {
    replace_durably(
        &dir(),
        &format!("db_{db}"),
        budget::format(counts).as_bytes(),
    )
}

/// Replaces `dir/name` with `bytes` durably (see the module comment); also
/// the key access statistics' file ([`super::access_file`]).
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync_wanted() {
            f.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))?;
        if sync_wanted() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
