//! The root key (key-encryption key): loaded by the server from a file or a
//! command, never stored in a table, never shown.
//!
//! Settings (all superuser-only, hidden from non-superusers in SHOW):
//! `manna_crypt.root_key_file`, `manna_crypt.root_key_command`, their
//! `previous_` twins for root-key rotation, and
//! `manna_crypt.root_key_command_timeout`. A file must hold 64 hex
//! characters, be owned by the server's OS user and have no group or other
//! permissions. A command must print 64 hex characters on standard output
//! and exit 0 within the timeout (see [`super::root_command`] for how it
//! runs); when it fails, the last line of its standard error goes to the
//! server log only, since a KMS CLI may print things there no client should
//! see.
//!
//! A root key is loaded once per server for each value of its setting and
//! kept in shared memory ([`super::rootshared`]); each backend keeps a copy
//! that it checks against shared memory without a lock. A failing command
//! is retried with a back-off (1 s doubling to
//! `manna_crypt.root_key_retry_max`); a file is read again on every try.
//! [`effective_root`] decides which configured root key opens the stored
//! data keys.

use std::cell::RefCell;
use std::ffi::CString;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use manna_crypt_core::keywrap;
use manna_crypt_core::secret::Key32;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

use sha2::{Digest as _, Sha256};

use super::root_source::{read_key_file, run_key_command};
use super::rootshared::{self, Digest, Obtained, Opts};
use super::store::{self, StoredCheck};
use crate::error::{McError, McResult};

pub static ROOT_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ROOT_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_ROOT_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_ROOT_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static ROOT_KEY_COMMAND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static ROOT_KEY_RETRY_MAX: GucSetting<i32> = GucSetting::<i32>::new(60);

pub fn register_settings() {
    let flags = GucFlags::SUPERUSER_ONLY;
    GucRegistry::define_string_guc(
        c"manna_crypt.root_key_file",
        c"File holding the root key as 64 hex characters.",
        c"Must be owned by the server's OS user and not readable by group or others.",
        &ROOT_KEY_FILE,
        GucContext::Suset,
        flags,
    );
    GucRegistry::define_string_guc(
        c"manna_crypt.root_key_command",
        c"Shell command that prints the root key as 64 hex characters.",
        c"The hook for a KMS or Vault CLI. When it fails, the last line of its standard error \
          goes to the server log.",
        &ROOT_KEY_COMMAND,
        GucContext::Suset,
        flags,
    );
    REGISTERING.store(true, Ordering::Relaxed);
    // SAFETY: the hook is a #[pg_guard] function living as long as the library.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"manna_crypt.previous_root_key_file",
            c"During root-key rotation: file holding the previous root key.",
            PREVIOUS_HELP,
            &PREVIOUS_ROOT_KEY_FILE,
            GucContext::Suset,
            flags,
            Some(check_retire),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"manna_crypt.previous_root_key_command",
            c"During root-key rotation: command that prints the previous root key.",
            PREVIOUS_HELP,
            &PREVIOUS_ROOT_KEY_COMMAND,
            GucContext::Suset,
            flags,
            Some(check_retire),
            None,
            None,
        );
    }
    REGISTERING.store(false, Ordering::Relaxed);
    // Settings are never refused at startup (that would stop the server);
    // say in the log what a missing previous root key leaves unreadable.
    let retired = [&PREVIOUS_ROOT_KEY_FILE, &PREVIOUS_ROOT_KEY_COMMAND]
        .iter()
        .all(|s| s.get().is_none_or(|v| v.as_bytes().is_empty()));
    if let Some(reason) = retired.then(super::rootstatus::retire_refusal).flatten() {
        warning!("no previous root key is configured, but {reason}");
    }
    GucRegistry::define_int_guc(
        c"manna_crypt.root_key_command_timeout",
        c"Seconds a root key command may run before its process group is killed.",
        c"Applies to manna_crypt.root_key_command and manna_crypt.previous_root_key_command.",
        &ROOT_KEY_COMMAND_TIMEOUT,
        1,
        3600,
        GucContext::Suset,
        flags | GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"manna_crypt.root_key_retry_max",
        c"Longest wait, in seconds, between attempts to run a failing root key command.",
        c"After a failure the command is not run again for 1 second, doubling after each \
          further failure up to this; manna_crypt.reload_root_key() retries at once.",
        &ROOT_KEY_RETRY_MAX,
        1,
        3600,
        GucContext::Suset,
        flags | GucFlags::UNIT_S,
    );
}

const PREVIOUS_HELP: &std::ffi::CStr =
    c"With it set, manna_crypt.rewrap_keys() re-wraps every data key under the new root key.";

/// True while the settings are being defined: the value they start with
/// (from postgresql.conf at server start) is never refused.
static REGISTERING: AtomicBool = AtomicBool::new(false);

/// Check hook of the previous-root-key settings: clearing one (retiring the
/// previous root key) is refused while any database's data keys are still
/// wrapped under another root key than the current one (see
/// [`super::rootstatus`]). Setting one is always allowed.
#[pg_guard]
unsafe extern "C-unwind" fn check_retire(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    if REGISTERING.load(Ordering::Relaxed) {
        return true;
    }
    // SAFETY: PostgreSQL passes a valid pointer to the new value (itself
    // NULL or a NUL-terminated string).
    let clearing = unsafe { (*newval).is_null() || **newval == 0 };
    let had_one = [&PREVIOUS_ROOT_KEY_FILE, &PREVIOUS_ROOT_KEY_COMMAND]
        .iter()
        .any(|s| s.get().is_some_and(|v| !v.as_bytes().is_empty()));
    if !clearing || !had_one {
        return true;
    }
    match super::rootstatus::retire_refusal() {
        None => true,
        Some(reason) => {
            let detail = CString::new(reason).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string takes a palloc'd string,
            // which pstrdup returns in the current memory context.
            unsafe {
                pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(detail.as_ptr());
            }
            false
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Current,
    Previous,
}

impl Which {
    fn settings(
        self,
    ) -> (
        &'static GucSetting<Option<CString>>,
        &'static GucSetting<Option<CString>>,
        &'static str,
    ) {
        match self {
            Which::Current => (&ROOT_KEY_FILE, &ROOT_KEY_COMMAND, "manna_crypt.root_key"),
            Which::Previous => (
                &PREVIOUS_ROOT_KEY_FILE,
                &PREVIOUS_ROOT_KEY_COMMAND,
                "manna_crypt.previous_root_key",
            ),
        }
    }
}

/// A loaded root key with where it came from and its public fingerprint.
pub struct RootKey {
    pub key: Key32,
    pub source: &'static str,
    pub fingerprint: String,
}

#[derive(Clone, PartialEq, Eq)]
enum Source {
    File(String),
    Command(String),
}

fn configured(which: Which) -> McResult<Option<Source>> {
    let (file, cmd, prefix) = which.settings();
    let get = |s: &GucSetting<Option<CString>>| {
        s.get()
            .map(|c| c.to_string_lossy().into_owned())
            .filter(|v| !v.trim().is_empty())
    };
    match (get(file), get(cmd)) {
        (Some(_), Some(_)) => Err(McError::RootKeyIo {
            message: format!("both {prefix}_file and {prefix}_command are set"),
            detail: None,
            hint: Some("set only one of them".into()),
        }),
        (Some(f), None) => Ok(Some(Source::File(f))),
        (None, Some(c)) => Ok(Some(Source::Command(c))),
        (None, None) => Ok(None),
    }
}

/// This backend's copies of the current and previous root keys: the
/// setting each came from, and the shared slot and generation it was
/// copied at (see [`rootshared::is_current`]).
struct Copy {
    source: Source,
    version: u64,
    digest: Digest,
    slot: usize,
    generation: u64,
    key: Rc<RootKey>,
}

thread_local! {
    static LOADED: RefCell<[Option<Copy>; 2]> = const { RefCell::new([None, None]) };
}

/// The digest that names a setting's value in shared memory.
fn digest_of(source: &Source) -> Digest {
    let (kind, text) = match source {
        Source::File(path) => ("file", path),
        Source::Command(cmd) => ("command", cmd),
    };
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.finalize().into()
}

/// The root key for `which`, or `None` when it is not configured.
pub fn get(which: Which) -> McResult<Option<Rc<RootKey>>> {
    obtain(which, false)
}

/// Loads `which` afresh from its source (`reload_root_key()`), even if
/// shared memory has it or the back-off says wait. On failure the key
/// already loaded keeps serving.
pub fn reload(which: Which) -> McResult<Option<Rc<RootKey>>> {
    obtain(which, true)
}

fn obtain(which: Which, force: bool) -> McResult<Option<Rc<RootKey>>> {
    if let Some(e) = rootshared::unavailable() {
        return Err(e);
    }
    let Some(source) = configured(which)? else {
        return Ok(None);
    };
    let index = which as usize;
    let digest = digest_of(&source);
    let version = version_of(&source);
    if !force {
        let hit = LOADED.with(|l| {
            l.borrow()[index]
                .as_ref()
                .filter(|c| c.source == source && c.version == version)
                .filter(|c| rootshared::is_current(&c.digest, c.slot, c.generation))
                .map(|c| c.key.clone())
        });
        if hit.is_some() {
            return Ok(hit);
        }
    }
    let (_, _, prefix) = which.settings();
    let is_command = matches!(source, Source::Command(_));
    let opts = Opts {
        force,
        backoff_max: is_command.then(|| Duration::from_secs(retry_max())),
        stale_after: command_timeout() + Duration::from_secs(10),
        version,
    };
    let Obtained {
        key,
        slot,
        generation,
    } = rootshared::obtain(&digest, &opts, || load(&source, prefix))?;
    let loaded = Rc::new(RootKey {
        fingerprint: keywrap::fingerprint(&key),
        key,
        source: if is_command { "command" } else { "file" },
    });
    LOADED.with(|l| {
        l.borrow_mut()[index] = Some(Copy {
            source,
            version,
            digest,
            slot,
            generation,
            key: loaded.clone(),
        })
    });
    if which == Which::Current {
        super::rootstatus::note_current(&loaded.fingerprint);
    }
    Ok(Some(loaded))
}

/// A key file's version: its identity, size and modification time, so a
/// replaced or rewritten file is read again (as 0.1.0 did in every new
/// session) and the old key wiped from shared memory. A command's output
/// cannot be versioned: `reload_root_key()` reloads it.
fn version_of(source: &Source) -> u64 {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let Source::File(path) = source else { return 0 };
    let Ok(m) = std::fs::metadata(path) else {
        return 0;
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
        .hash(&mut h);
    h.finish() | 1
}

/// Reads the key from its source (in the backend that loads it for the server).
fn load(source: &Source, prefix: &str) -> McResult<Key32> {
    match source {
        Source::File(path) => parse(&read_key_file(path, prefix)?, prefix, "file"),
        Source::Command(cmd) => run_key_command(cmd, prefix, command_timeout(), |text| {
            parse(text, prefix, "command")
        }),
    }
}

/// What shared memory knows of `which`'s configured source, for `info()`.
pub fn shared_status(which: Which) -> McResult<Option<rootshared::Status>> {
    match configured(which)? {
        None => Ok(None),
        Some(source) => rootshared::status(&digest_of(&source)).map(Some),
    }
}

fn retry_max() -> u64 {
    // The setting's bounds (1 to 3600) keep this positive.
    ROOT_KEY_RETRY_MAX.get().max(1) as u64
}

fn parse(text: &str, prefix: &str, kind: &str) -> McResult<Key32> {
    Key32::from_hex(text).ok_or_else(|| McError::RootKeyIo {
        message: format!("{prefix}_{kind} does not yield a root key"),
        detail: Some(
            "expected exactly 64 hexadecimal characters (32 bytes), optionally followed by a \
             newline"
                .into(),
        ),
        hint: Some("generate one with: openssl rand -hex 32".into()),
    })
}

fn command_timeout() -> Duration {
    // The setting's bounds (1 to 3600) keep this positive.
    Duration::from_secs(ROOT_KEY_COMMAND_TIMEOUT.get().max(1) as u64)
}

/// The current root key; an error when it is not configured.
pub fn current() -> McResult<Rc<RootKey>> {
    get(Which::Current)?.ok_or_else(|| McError::RootKeyMissing {
        message: "root key is not configured".into(),
        hint: Some(
            "set manna_crypt.root_key_file or manna_crypt.root_key_command in postgresql.conf \
             and reload"
                .into(),
        ),
    })
}

/// The root key that opens the stored data keys: the current one if it
/// matches the stored check value, else the previous one if that matches
/// (a root-key rotation in progress), else F0000. With no check value stored
/// yet (no keys created), the current root key. Must run as the extension
/// owner (it reads `root_key_check`).
///
/// Decided afresh on every cache miss (a query and an HMAC; misses are
/// rare), so a reloaded configuration or a finished `rewrap_keys()` is never
/// judged against a stale choice.
pub fn effective_root() -> McResult<Rc<RootKey>> {
    let check = store::stored_check()?;
    super::rootstatus::note_database(check.as_ref().map(|c| c.fingerprint.as_str()));
    root_for_check(check.as_ref())
}

/// The root key that matches `check` (see [`effective_root`]).
pub fn root_for_check(check: Option<&StoredCheck>) -> McResult<Rc<RootKey>> {
    let current = current()?;
    let Some(check) = check else {
        return Ok(current);
    };
    if keywrap::matches_check_value(&current.key, &check.check_value) {
        return Ok(current);
    }
    match get(Which::Previous)? {
        Some(prev) if keywrap::matches_check_value(&prev.key, &check.check_value) => Ok(prev),
        _ => Err(McError::RootKeyMismatch {
            detail: format!(
                "the configured root key has fingerprint {}, but the data keys in this \
                 database are wrapped under the root key with fingerprint {}",
                current.fingerprint, check.fingerprint
            ),
        }),
    }
}
