//! Where a root key's text comes from: a file with strict ownership and
//! permissions, or a command's standard output. The caller parses the text
//! (see [`super::rootkey`]).
//!
//! A command runs through [`super::root_command`]; here its outcome becomes
//! an error (58030, or PostgreSQL's own 57014 / 57P01 when it was stopped by
//! a cancel, statement_timeout or termination), and on failure the last
//! line of its standard error goes to the server log, never to the client.

use std::time::Duration;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use zeroize::Zeroizing;

use super::root_command::{self, exit_text, Failure, MAX_OUTPUT};
use super::secret_file::{read_secret_file, FileProblem};
use crate::error::{McError, McResult};
use crate::pg::interrupt;

/// How much of the last line of a failed command's standard error is logged.
const STDERR_LINE_MAX: usize = 200;

/// The root key file's text: a regular file of the server's OS user with no
/// group or other permissions (see [`super::secret_file`]).
pub fn read_key_file(path: &str, prefix: &str) -> McResult<Zeroizing<String>> {
    read_secret_file(path).map_err(|problem| {
        let (message, detail, hint) = problem.describe(&format!("root key file \"{path}\""));
        match problem {
            FileProblem::Missing => McError::RootKeyMissing {
                message,
                hint: Some(format!("check {prefix}_file")),
            },
            _ => McError::RootKeyIo {
                message,
                detail,
                hint,
            },
        }
    })
}

/// Runs the root key command `cmd` (at most `timeout`) and hands its
/// standard output to `parse`. `prefix` names the settings
/// (`manna_crypt.root_key` or `manna_crypt.previous_root_key`).
///
/// A cancel, statement_timeout or termination while it runs kills the
/// command's process group and raises PostgreSQL's own error. Any other
/// failure, a rejected output included, is 58030 for the client, and the
/// last line of the command's standard error goes to the server log only.
pub fn run_key_command<T>(
    cmd: &str,
    prefix: &str,
    timeout: Duration,
    parse: impl FnOnce(&str) -> McResult<T>,
) -> McResult<T> {
    let fail = |message: String| McError::RootKeyIo {
        message,
        detail: None,
        hint: Some(format!(
            "check {prefix}_command; the last line of its standard error, if any, is in the \
             server log"
        )),
    };
    let outcome = root_command::run(cmd, timeout, interrupt::ends_statement);
    let error = match outcome.result {
        Ok(out) => match std::str::from_utf8(&out) {
            Ok(text) => match parse(text) {
                Ok(value) => return Ok(value),
                Err(e) => e,
            },
            Err(_) => fail("root key command printed something other than hex text".into()),
        },
        Err(Failure::Stopped) => {
            // The command is gone; now PostgreSQL raises its own error.
            interrupt::check();
            fail("root key command was interrupted".into())
        }
        Err(Failure::Spawn(e)) => fail(format!("could not run the root key command: {e}")),
        Err(Failure::Io(e)) => fail(format!("could not read the root key command's output: {e}")),
        Err(Failure::Exit(status)) => {
            fail(format!("root key command failed ({})", exit_text(status)))
        }
        Err(Failure::TimedOut) => {
            let secs = timeout.as_secs();
            let unit = if secs == 1 { "second" } else { "seconds" };
            fail(format!(
                "root key command did not finish within {secs} {unit}"
            ))
        }
        Err(Failure::TooMuchOutput) => fail(format!(
            "root key command printed more than {MAX_OUTPUT} bytes"
        )),
    };
    if let Some(line) = outcome.stderr.last_line(STDERR_LINE_MAX) {
        log_stderr(prefix, &line);
    }
    Err(error)
}

/// The last line of a failed command's standard error, to the server log
/// only: a client must not see what a KMS tool printed.
fn log_stderr(prefix: &str, line: &str) {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_IO_ERROR,
        format!("{prefix}_command failed; last line of its standard error: {line}"),
        "manna_crypt",
    )
    .report(PgLogLevel::LOG_SERVER_ONLY);
}
