//! The one way this extension runs SQL: [`rows`], [`one`], [`run`] and
//! [`count`].
//!
//! Reads go through their own path. pgrx 0.18's `Spi::get_one*` and
//! `SpiClient::update` call `GetCurrentTransactionId()`, which assigns a
//! transaction id to a transaction that only read (`BEGIN; SELECT
//! manna_crypt.lock_holder('x')` took one); and its `select` runs read-write
//! whenever the transaction has one, so SPI increments the command counter —
//! an error in a parallel worker, whose leader's statement writes ("cannot
//! start commands during a parallel operation"). So [`Mode::Read`] calls
//! `SPI_execute_with_args` itself and never assigns a transaction id:
//!
//! - read-only (`read_only = true`: no command counter increment, the
//!   calling statement's snapshot) in parallel mode — in a worker and in its
//!   leader — and whenever the transaction has written nothing yet, which
//!   covers every read on a standby and in a read-only transaction;
//! - otherwise read-write, so that a read sees what this transaction wrote
//!   earlier in the same statement (`SELECT create_keyring('k'),
//!   encrypt_gcm('x', 'k')`), as reads always did.
//!
//! [`Mode::Write`] is for statements that write or lock rows.
//!
//! Every statement runs with `search_path = pg_catalog, pg_temp`, whoever
//! calls: an unqualified operator or function in our SQL (`extname =
//! 'manna_crypt'` is `name = unknown`) would otherwise resolve through the
//! caller's path, where a user's exact-type operator in `public` beats
//! pg_catalog's and runs with the caller's rights. Tables are named
//! schema-qualified.
//!
//! Results are copied into owned Rust values before the SPI connection
//! closes: nothing returned here points into SPI's memory.

use std::ffi::CString;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::guc::GucNest;
use super::report::Capture;
use crate::error::{McError, McResult};

/// An argument of a statement: `value.into()` for any SQL-convertible value.
pub type Arg<'a> = DatumWithOid<'a>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A read: never assigns a transaction id; read-only in parallel mode
    /// and while the transaction has written nothing.
    Read,
    /// Writes and row locks.
    Write,
}

impl Mode {
    /// The `read_only` argument SPI gets (see the module comment).
    fn spi_read_only(self) -> bool {
        // SAFETY: both read the current transaction's state, nothing else.
        self == Mode::Read
            && unsafe {
                pg_sys::IsInParallelMode()
                    || pg_sys::GetCurrentTransactionIdIfAny() == pg_sys::InvalidTransactionId
            }
    }
}

/// One row of a result, valid only inside the callback it is passed to.
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    /// Column `n` (1-based), NULL as `None`. The Rust type must match the
    /// column's SQL type (an internal error otherwise: the SQL is ours).
    pub fn get<T: FromDatum + IntoDatum>(&self, n: usize) -> McResult<Option<T>> {
        let col = i32::try_from(n).map_err(|_| internal("column number out of range"))?;
        // SAFETY: `tuple` and `desc` come from SPI_tuptable of the statement
        // just executed and stay valid until the connection closes, which
        // happens only after the row callback returns.
        unsafe {
            if col < 1 || col > (*self.desc).natts {
                return Err(internal("column number out of range"));
            }
            let typoid = pg_sys::SPI_gettypeid(self.desc, col);
            if !T::is_compatible_with(typoid) {
                return Err(internal("result column of an unexpected type"));
            }
            let mut isnull = false;
            let datum = pg_sys::SPI_getbinval(self.tuple, self.desc, col, &mut isnull);
            Ok(T::from_polymorphic_datum(datum, isnull, typoid))
        }
    }

    /// Column `n`, with NULL an internal error (for NOT NULL columns).
    pub fn req<T: FromDatum + IntoDatum>(&self, n: usize) -> McResult<T> {
        self.get(n)?
            .ok_or_else(|| internal("unexpected NULL in a NOT NULL result column"))
    }
}

fn internal(what: &str) -> McError {
    McError::Internal(format!("internal SPI error: {what}"))
}

/// Runs one statement and maps every row through `each`.
pub fn rows<T>(
    mode: Mode,
    sql: &str,
    args: &[Arg<'_>],
    each: impl FnMut(&Row) -> McResult<T>,
) -> McResult<Vec<T>> {
    Ok(execute(mode, sql, args, each)?.1)
}

/// Runs one statement: the number of rows it processed, and `each` of every
/// row it returned.
fn execute<T>(
    mode: Mode,
    sql: &str,
    args: &[Arg<'_>],
    mut each: impl FnMut(&Row) -> McResult<T>,
) -> McResult<(u64, Vec<T>)> {
    let sql = CString::new(sql).map_err(|_| internal("statement contains a NUL byte"))?;
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    let mut values: Vec<pg_sys::Datum> = args
        .iter()
        .map(|a| {
            a.datum()
                .map_or(pg_sys::Datum::from(0usize), |d| d.sans_lifetime())
        })
        .collect();
    let nulls: Vec<std::ffi::c_char> = args
        .iter()
        .map(|a| if a.datum().is_some() { b' ' } else { b'n' } as std::ffi::c_char)
        .collect();
    let settings = GucNest::new();
    settings.set(c"search_path", c"pg_catalog, pg_temp");
    // pgrx's connection guard: SPI_connect now, SPI_finish when the closure
    // returns (on an ERROR, transaction abort cleans up SPI as always).
    let result = Spi::connect(|_client| {
        // SAFETY: the argument arrays have `args.len()` elements and outlive
        // the call; SPI_tuptable is read right after the statement that set
        // it, on this connection.
        unsafe {
            pg_sys::SPI_tuptable = std::ptr::null_mut();
            let status = {
                // An ERROR in the statement keeps all its fields (report.rs).
                let _capture = Capture::start();
                pg_sys::SPI_execute_with_args(
                    sql.as_ptr(),
                    args.len() as i32,
                    types.as_mut_ptr(),
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
                    mode.spi_read_only(),
                    0,
                )
            };
            if status < 0 {
                return Err(internal(&format!("statement failed with status {status}")));
            }
            // Read before SPI_finish, which restores the caller's values.
            let processed = pg_sys::SPI_processed;
            let table = pg_sys::SPI_tuptable;
            if table.is_null() {
                return Ok((processed, Vec::new()));
            }
            let n = (*table).numvals as usize;
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let row = Row {
                    tuple: *(*table).vals.add(i),
                    desc: (*table).tupdesc,
                };
                out.push(each(&row)?);
            }
            Ok((processed, out))
        }
    });
    drop(settings);
    result
}

/// The first column of the first row, `None` when there is no row or it is NULL.
pub fn one<T: FromDatum + IntoDatum>(
    mode: Mode,
    sql: &str,
    args: &[Arg<'_>],
) -> McResult<Option<T>> {
    Ok(rows(mode, sql, args, |r| r.get::<T>(1))?
        .into_iter()
        .next()
        .flatten())
}

/// Runs a writing statement whose result rows are not needed.
pub fn run(sql: &str, args: &[Arg<'_>]) -> McResult<()> {
    rows(Mode::Write, sql, args, |_| Ok(()))?;
    Ok(())
}

/// Runs a writing statement and returns how many rows it affected.
pub fn count(sql: &str, args: &[Arg<'_>]) -> McResult<u64> {
    Ok(execute(Mode::Write, sql, args, |_| Ok(()))?.0)
}
