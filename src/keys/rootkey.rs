//! The root key (key-encryption key): loaded by the server from a file or a
//! command, never stored in a table, never shown.
//!
//! Settings (all superuser-only, hidden from non-superusers in SHOW):
//! `manna_crypt.root_key_file`, `manna_crypt.root_key_command`, and their
//! `previous_` twins for root-key rotation. A file must hold 64 hex
//! characters, be owned by the server's OS user and have no group or other
//! permissions. A command must print 64 hex characters on standard output and
//! exit 0 within [`COMMAND_TIMEOUT`]; its standard error is discarded, never
//! logged, since a KMS CLI may echo tokens there.
//!
//! A loaded key is kept per backend and reloaded when its setting changes.

use std::cell::RefCell;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use manna_crypt_core::keywrap;
use manna_crypt_core::secret::Key32;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use zeroize::Zeroizing;

use crate::error::{McError, McResult};

pub static ROOT_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ROOT_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_ROOT_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_ROOT_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

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
        c"The hook for a KMS or Vault CLI. Standard error is discarded.",
        &ROOT_KEY_COMMAND,
        GucContext::Suset,
        flags,
    );
    GucRegistry::define_string_guc(
        c"manna_crypt.previous_root_key_file",
        c"During root-key rotation: file holding the previous root key.",
        c"With it set, manna_crypt.rewrap_keys() re-wraps every data key under the new root key.",
        &PREVIOUS_ROOT_KEY_FILE,
        GucContext::Suset,
        flags,
    );
    GucRegistry::define_string_guc(
        c"manna_crypt.previous_root_key_command",
        c"During root-key rotation: command that prints the previous root key.",
        c"With it set, manna_crypt.rewrap_keys() re-wraps every data key under the new root key.",
        &PREVIOUS_ROOT_KEY_COMMAND,
        GucContext::Suset,
        flags,
    );
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

/// The loaded current and previous root keys, with the setting each came from.
type Loaded = [Option<(Source, Rc<RootKey>)>; 2];

thread_local! {
    static LOADED: RefCell<Loaded> = const { RefCell::new([None, None]) };
}

/// The root key for `which`, or `None` when it is not configured.
pub fn get(which: Which) -> McResult<Option<Rc<RootKey>>> {
    let Some(source) = configured(which)? else {
        return Ok(None);
    };
    let slot = which as usize;
    if let Some(hit) = LOADED.with(|l| {
        l.borrow()[slot]
            .as_ref()
            .filter(|(s, _)| *s == source)
            .map(|(_, k)| k.clone())
    }) {
        return Ok(Some(hit));
    }
    let (_, _, prefix) = which.settings();
    let (text, kind) = match &source {
        Source::File(path) => (read_key_file(path, prefix)?, "file"),
        Source::Command(cmd) => (run_key_command(cmd, prefix)?, "command"),
    };
    let key = Key32::from_hex(&text).ok_or_else(|| McError::RootKeyIo {
        message: format!("{prefix}_{kind} does not yield a root key"),
        detail: Some("expected exactly 64 hexadecimal characters (32 bytes), optionally followed by a newline".into()),
        hint: Some("generate one with: openssl rand -hex 32".into()),
    })?;
    let loaded = Rc::new(RootKey {
        fingerprint: keywrap::fingerprint(&key),
        key,
        source: kind,
    });
    LOADED.with(|l| l.borrow_mut()[slot] = Some((source, loaded.clone())));
    Ok(Some(loaded))
}

/// The current root key; an error when it is not configured.
pub fn current() -> McResult<Rc<RootKey>> {
    get(Which::Current)?.ok_or_else(|| McError::RootKeyMissing {
        message: "root key is not configured".into(),
        hint: Some(
            "set manna_crypt.root_key_file or manna_crypt.root_key_command in postgresql.conf and reload".into(),
        ),
    })
}

fn read_key_file(path: &str, prefix: &str) -> McResult<Zeroizing<String>> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => McError::RootKeyMissing {
            message: format!("root key file \"{path}\" does not exist"),
            hint: Some(format!("check {prefix}_file")),
        },
        _ => McError::RootKeyIo {
            message: format!("could not access root key file \"{path}\": {e}"),
            detail: None,
            hint: None,
        },
    })?;
    // SAFETY: geteuid() has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_file() {
        return Err(McError::RootKeyIo {
            message: format!("root key file \"{path}\" is not a regular file"),
            detail: None,
            hint: None,
        });
    }
    if meta.uid() != euid {
        return Err(McError::RootKeyIo {
            message: format!(
                "root key file \"{path}\" is not owned by the database server's OS user"
            ),
            detail: Some(format!(
                "file owner uid {}, server uid {}",
                meta.uid(),
                euid
            )),
            hint: Some("chown it to the user the server runs as".into()),
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(McError::RootKeyIo {
            message: format!("root key file \"{path}\" has group or world access"),
            detail: Some(format!("permissions are {:04o}", meta.mode() & 0o7777)),
            hint: Some("chmod 0600 the file".into()),
        });
    }
    let mut text = Zeroizing::new(String::new());
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| McError::RootKeyIo {
            message: format!("could not read root key file \"{path}\": {e}"),
            detail: None,
            hint: None,
        })?;
    Ok(text)
}

fn run_key_command(cmd: &str, prefix: &str) -> McResult<Zeroizing<String>> {
    let fail = |message: String| McError::RootKeyIo {
        message,
        detail: None,
        hint: Some(format!("check {prefix}_command")),
    };
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("could not run the root key command: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("root key command has no standard output".into()))?;
    // Read on a helper thread so a command that never exits cannot hang the
    // backend: after the timeout the child is killed and its pipe closes.
    let reader = std::thread::spawn(move || {
        let mut out = Zeroizing::new(Vec::new());
        // Cap what we read: a key is 64 characters.
        let _ = (&mut stdout).take(4096).read_to_end(&mut out);
        out
    });
    let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "root key command did not finish within {} seconds",
                    COMMAND_TIMEOUT.as_secs()
                )));
            }
            Err(e) => {
                return Err(fail(format!(
                    "could not wait for the root key command: {e}"
                )))
            }
        }
    };
    let out = reader
        .join()
        .map_err(|_| fail("could not read the root key command's output".into()))?;
    if !status.success() {
        return Err(fail(format!("root key command failed ({status})")));
    }
    let text = std::str::from_utf8(&out)
        .map_err(|_| fail("root key command printed something other than hex text".into()))?;
    Ok(Zeroizing::new(text.to_owned()))
}
