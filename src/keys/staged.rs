//! Key material for manna_crypt's own statements, without it ever being
//! statement text or a parameter.
//!
//! `auto_explain` with `log_nested_statements` and `log_verbose` prints a
//! one-shot plan's constants (parameters are folded into them), and on 16+
//! its `Query Parameters:` too. So a wrapped key or a check value is staged
//! in backend memory and the statement reads it with
//! `manna_crypt._staged_secret()`, a volatile function that is never folded
//! into a plan: the log shows the call, never the value.

use std::cell::RefCell;

use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::error::{McError, McResult};
use crate::pg::spi::{self, Arg, Mode};

thread_local! {
    static STAGED: RefCell<Option<Zeroizing<Vec<u8>>>> = const { RefCell::new(None) };
}

const STAGING: &str = "\
    SELECT pg_catalog.to_regprocedure('manna_crypt._staged_secret()') IS NOT NULL";

const STAGED_CALL: &str = "manna_crypt._staged_secret()";

/// Runs `sql`, which reads `secret` through `_staged_secret()`, with `args`
/// (built by `args`, given the secret as a parameter when it must be one).
///
/// Between a library upgrade and `ALTER EXTENSION manna_crypt UPDATE`, a
/// 0.1.0 catalog has no `_staged_secret()`: key changes then work as in
/// 0.1.0, the secret a statement parameter (which auto_explain can log),
/// until the update.
pub fn run_with_secret<'a>(
    sql: &str,
    secret: &'a [u8],
    args: impl Fn(Option<&'a [u8]>) -> Vec<Arg<'a>>,
) -> McResult<()> {
    if spi::one::<bool>(Mode::Read, STAGING, &[])?.unwrap_or(false) {
        return with_staged(secret, || spi::run(sql, &args(None)));
    }
    let args = args(Some(secret));
    let sql = sql.replace(STAGED_CALL, &format!("${}", args.len()));
    spi::run(&sql, &args)
}

/// Runs `f` with `secret` staged for `_staged_secret()`; the stage is empty
/// again afterwards, whatever happened.
fn with_staged<T>(secret: &[u8], f: impl FnOnce() -> McResult<T>) -> McResult<T> {
    struct Unstage;
    impl Drop for Unstage {
        fn drop(&mut self) {
            STAGED.with(|s| s.borrow_mut().take());
        }
    }
    STAGED.with(|s| *s.borrow_mut() = Some(Zeroizing::new(secret.to_vec())));
    let _unstage = Unstage;
    f()
}

/// The value staged for the statement being run (taken: a second read in
/// the same statement, or a call from anywhere else, is refused).
#[pg_extern(volatile, parallel_unsafe)]
fn _staged_secret() -> Vec<u8> {
    match STAGED.with(|s| s.borrow_mut().take()) {
        Some(v) => v.to_vec(),
        None => McError::PermissionDenied {
            message: "manna_crypt._staged_secret() is internal to manna_crypt".into(),
            hint: "it serves manna_crypt's own statements on its key tables".into(),
        }
        .raise(),
    }
}

/// `args`, then the secret when it is a parameter (the last one).
pub fn with_last<'a>(mut args: Vec<Arg<'a>>, secret: Option<&'a [u8]>) -> Vec<Arg<'a>> {
    if let Some(secret) = secret {
        args.push(secret.into());
    }
    args
}
