//! The key access statistics' file, `manna_crypt/access_stats` in the data
//! directory (beside `manna_crypt/counters/`), in the format of
//! `manna_crypt_core::access`, replaced durably like the counter files.

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;

use manna_crypt_core::access::{self, AccessFile};

use super::countfile;
use crate::error::{McError, McResult};

const NAME: &str = "access_stats";

fn dir() -> PathBuf {
    // The parent of the counters' directory: $PGDATA/manna_crypt.
    let counters = countfile::dir();
    counters
        .parent()
        .map_or(counters.clone(), |p| p.to_path_buf())
}

fn io_error(what: &str, e: impl std::fmt::Display) -> McError {
    McError::CounterIo {
        message: format!("could not {what} the key access statistics"),
        detail: format!("{}: {e}", dir().join(NAME).display()),
    }
}

/// The saved statistics; empty while there is no file.
pub fn read() -> McResult<AccessFile> {
    match fs::read_to_string(dir().join(NAME)) {
        Ok(text) => access::parse(&text).map_err(|e| io_error("parse", e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(AccessFile::default()),
        Err(e) => Err(io_error("read", e)),
    }
}

/// Replaces the file durably.
pub fn write(file: &AccessFile) -> McResult<()> {
    countfile::replace_durably(&dir(), NAME, access::format(file).as_bytes())
        .map_err(|e| io_error("write", e))
}
