//! Reading a secret from a file on the database server: a regular file,
//! owned by the server's OS user, with no group or other permissions —
//! what PostgreSQL itself demands of its SSL key file. Used for the root key
//! file and for key imports that must not pass the key through SQL text.

use std::io::Read;
use std::os::unix::fs::MetadataExt;

use zeroize::Zeroizing;

/// Why a secret file was refused.
pub enum FileProblem {
    Missing,
    Unreadable(String),
    NotRegular,
    WrongOwner { file_uid: u32, server_uid: u32 },
    GroupOrWorld { mode: u32 },
}

impl FileProblem {
    /// (message, detail, hint) about `what` ("key file \"/p\"").
    pub fn describe(&self, what: &str) -> (String, Option<String>, Option<String>) {
        match self {
            FileProblem::Missing => (format!("{what} does not exist"), None, None),
            FileProblem::Unreadable(e) => (format!("could not read {what}: {e}"), None, None),
            FileProblem::NotRegular => (format!("{what} is not a regular file"), None, None),
            FileProblem::WrongOwner {
                file_uid,
                server_uid,
            } => (
                format!("{what} is not owned by the database server's OS user"),
                Some(format!(
                    "file owner uid {file_uid}, server uid {server_uid}"
                )),
                Some("chown it to the user the server runs as".into()),
            ),
            FileProblem::GroupOrWorld { mode } => (
                format!("{what} has group or world access"),
                Some(format!("permissions are {mode:04o}")),
                Some("chmod 0600 the file".into()),
            ),
        }
    }
}

/// At most this much is read: key files are small.
const MAX_BYTES: u64 = 64 * 1024;

/// The file's text, in a buffer wiped on drop.
pub fn read_secret_file(path: &str) -> Result<Zeroizing<String>, FileProblem> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FileProblem::Missing,
        _ => FileProblem::Unreadable(e.to_string()),
    })?;
    if !meta.is_file() {
        return Err(FileProblem::NotRegular);
    }
    // SAFETY: geteuid() has no preconditions and cannot fail.
    let server_uid = unsafe { libc::geteuid() };
    if meta.uid() != server_uid {
        return Err(FileProblem::WrongOwner {
            file_uid: meta.uid(),
            server_uid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(FileProblem::GroupOrWorld {
            mode: meta.mode() & 0o7777,
        });
    }
    let mut text = Zeroizing::new(String::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BYTES).read_to_string(&mut text))
        .map_err(|e| FileProblem::Unreadable(e.to_string()))?;
    Ok(text)
}
