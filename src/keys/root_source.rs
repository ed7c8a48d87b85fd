//! Where a root key's text comes from: a file with strict ownership and
//! permissions, or a command's standard output. Returns the text only; the
//! caller parses it (see [`super::rootkey`]).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::{McError, McResult};

/// How long a root key command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub fn read_key_file(path: &str, prefix: &str) -> McResult<Zeroizing<String>> {
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

pub fn run_key_command(cmd: &str, prefix: &str) -> McResult<Zeroizing<String>> {
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
