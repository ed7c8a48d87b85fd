//! `import_fernet_key_file()`: legacy Fernet keys imported from a file on
//! the database server, so the key never passes through SQL text — which
//! `log_statement`, `log_min_duration_statement`, `log_min_error_statement`
//! (on any failed import), `auto_explain` and `pg_stat_statements` record.
//!
//! The file holds one key per line (blank lines and `#` comments are
//! skipped) in MultiFernet order: the primary key first. Fernet keyrings
//! try their keys newest first, so the lines are imported last to first and
//! the primary ends up tried first. Reading a server file by path is a
//! superuser's power (`pg_read_server_files`), checked for the caller; the
//! file must be the server OS user's, mode 0600, like the root key file.

use manna_crypt_core::fernet::FernetKey;
use manna_crypt_core::names::check_keyring_name;
use pgrx::prelude::*;

use super::lifecycle::{import_fernet, key_change};
use super::secret_file::{read_secret_file, FileProblem};
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::spi::{self, Mode};

const MAY_READ_FILES: &str = "\
    SELECT r.rolsuper OR pg_catalog.pg_has_role(r.oid, 'pg_read_server_files', 'MEMBER') \
      FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER";

fn file_error(path: &str, problem: FileProblem) -> McError {
    let (message, detail, hint) = problem.describe(&format!("key file \"{path}\""));
    match problem {
        FileProblem::Missing => McError::RootKeyMissing { message, hint },
        _ => McError::RootKeyIo {
            message,
            detail,
            hint,
        },
    }
}

/// The keys of the file, in file order. A line that is not a key is 22023
/// naming its number, never its content.
fn parse_keys(text: &str) -> McResult<Vec<(i32, FernetKey)>> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = FernetKey::parse(line).ok_or_else(|| McError::BadArgument {
            message: format!("line {} of the key file is not a Fernet key", n + 1),
            detail: Some("a Fernet key is 32 bytes in URL-safe base64 (44 characters)".into()),
            hint: None,
        })?;
        keys.push((n as i32 + 1, key));
    }
    if keys.is_empty() {
        return Err(McError::bad_arg("the key file holds no Fernet key"));
    }
    Ok(keys)
}

/// Imports every Fernet key of a server file into a Fernet keyring (created
/// if needed); returns each line's key id (an existing id for a key the
/// keyring already has).
#[pg_extern(volatile, parallel_unsafe)]
fn import_fernet_key_file(
    keyring: Option<&str>,
    path: Option<&str>,
) -> TableIterator<'static, (name!(line, i32), name!(key_id, i32))> {
    let keyring = not_null(keyring, "keyring");
    let path = not_null(path, "path");
    check_keyring_name(keyring).or_raise();
    let allowed = spi::one::<bool>(Mode::Read, MAY_READ_FILES, &[]).or_raise();
    if allowed != Some(true) {
        McError::PermissionDenied {
            message: "permission denied to read a key file on the server".into(),
            hint: "only superusers and members of pg_read_server_files may; \
                   grant pg_read_server_files to the importing role"
                .into(),
        }
        .raise();
    }
    let text = read_secret_file(path)
        .map_err(|p| file_error(path, p))
        .or_raise();
    let keys = parse_keys(&text).or_raise();
    let mut imported = key_change(c"manna_crypt.import_fernet_key_file()", |role| {
        keys.iter()
            .rev()
            .map(|(line, key)| Ok((*line, import_fernet(keyring, key, role)?)))
            .collect::<McResult<Vec<_>>>()
    });
    imported.reverse();
    TableIterator::new(imported)
}
