//! The `emit_log_hook`: for each line a process is about to write to the
//! server log, decides whether it belongs to a sensitive statement and
//! rewrites its fields ([`super::rules`]).
//!
//! It runs inside PostgreSQL's error reporting, often while an ERROR is
//! being reported: no catalog access, no `ereport`, no allocation that can
//! raise (`MCXT_ALLOC_NO_OOM`), and no panic may unwind into C. If anything
//! goes wrong, the line is not written to the server log at all
//! (`output_to_server = false`): hidden rather than leaked.
//!
//! The `STATEMENT:` line and the csvlog/jsonlog `query` field print
//! `debug_query_string`, which the hook cannot rewrite in place: it points
//! it at a redacted copy this backend owns, for the rest of the statement
//! (PostgreSQL resets it for the next one). Fields the hook rewrites are
//! also what the client receives for the same error (PostgreSQL sends one
//! `ErrorData` to both), so an application sees `"<redacted>"` in place
//! of the value it sent in a sensitive statement's type error.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};

use manna_crypt_core::sqllex::Options;
use pgrx::pg_sys::{self, ErrorData};

use super::rules::{self, Line, FIELD_MARK};
use super::{watch, Mode};
use crate::pg::report;

static mut PREVIOUS: pg_sys::emit_log_hook_type = None;

/// The statement of this backend whose `debug_query_string` now points at
/// `redacted`.
struct Current {
    original: Vec<u8>,
    redacted: CString,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

pub fn install() {
    // SAFETY: _PG_init, single-threaded; the previous hook is chained.
    unsafe {
        PREVIOUS = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(on_emit);
    }
}

/// No `#[pg_guard]`: nothing in here may raise, and a panic is caught
/// below, so neither a longjmp nor an unwind crosses this frame. Redacts
/// first, so a previous hook (a log shipper) sees the redacted line too.
unsafe extern "C-unwind" fn on_emit(edata: *mut ErrorData) {
    if !edata.is_null() && super::mode() != Mode::Off {
        // SAFETY: PostgreSQL's ErrorData for the line being reported.
        let done = report::in_callback(|| unsafe { redact(&mut *edata) });
        if done != Some(true) {
            // SAFETY: as above.
            unsafe { (*edata).output_to_server = false };
        }
    }
    // SAFETY: chaining with PostgreSQL's argument.
    unsafe {
        if let Some(previous) = PREVIOUS {
            previous(edata);
        }
    }
}

/// # Safety: `p` is NULL or NUL-terminated.
unsafe fn bytes<'a>(p: *const c_char) -> Option<&'a [u8]> {
    // SAFETY: as the caller promises.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// Replaces one field with `new`, allocated where PostgreSQL frees it.
/// False if memory ran out (the caller then hides the line).
///
/// # Safety: `field` is a field of `edata`.
unsafe fn replace(edata: &ErrorData, field: &mut *mut c_char, new: &[u8]) -> bool {
    // SAFETY: PostgreSQL's allocator in the line's own context; NO_OOM
    // returns NULL instead of raising, HUGE allows any length we make.
    unsafe {
        let old = bytes(*field);
        if old == Some(new) {
            return true;
        }
        let cxt = if edata.assoc_context.is_null() {
            pg_sys::ErrorContext
        } else {
            edata.assoc_context
        };
        let flags = (pg_sys::MCXT_ALLOC_NO_OOM | pg_sys::MCXT_ALLOC_HUGE) as i32;
        let p = pg_sys::MemoryContextAllocExtended(cxt, new.len() + 1, flags).cast::<u8>();
        if p.is_null() {
            return false;
        }
        std::ptr::copy_nonoverlapping(new.as_ptr(), p, new.len());
        *p.add(new.len()) = 0;
        if !field.is_null() {
            pg_sys::pfree((*field).cast());
        }
        *field = p.cast();
        true
    }
}

/// # Safety: `edata` is PostgreSQL's line being reported.
unsafe fn redact(edata: &mut ErrorData) -> bool {
    // SAFETY: PostgreSQL's globals, read on the backend's thread.
    let (scs, in_postmaster, dqs, worker) = unsafe {
        (
            pg_sys::standard_conforming_strings,
            !pg_sys::IsUnderPostmaster && pg_sys::IsPostmasterEnvironment,
            pg_sys::debug_query_string,
            pg_sys::ParallelWorkerNumber >= 0,
        )
    };
    if in_postmaster {
        // `Failed process was running: ...` after a crash: the postmaster
        // cannot judge the statement, so its literals always go.
        // SAFETY: fields of the line.
        return unsafe {
            rewrite(edata, |f, _| {
                matches!(f, Field::Detail | Field::DetailLog).then(|| f.sql(scs))
            })
        };
    }
    if is_deadlock(edata.sqlerrcode) {
        // The server-only DETAIL of a deadlock quotes the *other* sessions'
        // statements, which this backend cannot judge: always redacted.
        // SAFETY: fields of the line.
        let done = unsafe { rewrite(edata, |f, _| (f == Field::DetailLog).then(|| f.sql(scs))) };
        if !done {
            return false;
        }
    }
    // SAFETY: fields of the line and the global, NUL-terminated or NULL.
    let (line, text) = unsafe {
        let id = bytes(edata.message_id).unwrap_or_default();
        (
            rules::classify(id, bytes(edata.message).unwrap_or_default()),
            bytes(dqs),
        )
    };
    let ours = CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|c| c.redacted.as_ptr() == dqs)
    });
    // A parallel worker never analyzes, so it knows no protected table:
    // every line of the leader's statement is redacted there.
    let all = super::mode() == Mode::All || worker;
    let by_statement = text.map(|t| {
        ours || all || watch::is_marked(t) || watch::text_is_sensitive(t, Options::sql(scs))
    });
    let sensitive = by_statement.unwrap_or(false)
        || match line {
            // A portal's plan is often logged after its statement ended
            // (debug_query_string NULL or already the next statement's):
            // the plan's own text is judged too.
            // SAFETY: the line's message, NUL-terminated or NULL.
            Line::Plan => {
                all || unsafe { bytes(edata.message) }
                    .is_some_and(|m| watch::text_is_sensitive(m, Options::quoting(scs)))
            }
            // A node tree without its statement cannot be judged.
            Line::NodeDump => by_statement.is_none(),
            _ => false,
        };
    if !sensitive {
        return true;
    }
    let Some(text) = text else {
        // SAFETY: fields of the line.
        return unsafe { rewrite_sensitive(edata, line, b"", b"", scs) };
    };
    if !ours {
        let Ok(redacted) = CString::new(rules::sql(text, scs)) else {
            return false;
        };
        let original = text.to_vec();
        CURRENT.with(|c| *c.borrow_mut() = Some(Current { original, redacted }));
    }
    CURRENT.with(|c| {
        let c = c.borrow();
        let Some(cur) = c.as_ref() else { return false };
        // SAFETY: fields of the line; the statement copy lives in CURRENT
        // until the next sensitive statement, and PostgreSQL points
        // debug_query_string elsewhere before then.
        unsafe {
            let done = rewrite_sensitive(edata, line, &cur.original, cur.redacted.as_bytes(), scs);
            pg_sys::debug_query_string = cur.redacted.as_ptr();
            done
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Message,
    Detail,
    /// The server-only DETAIL; the same rules as DETAIL unless named.
    DetailLog,
    Hint,
    Context,
    InternalQuery,
}

impl Field {
    fn sql(self, scs: bool) -> impl FnOnce(&[u8]) -> Vec<u8> {
        move |t| rules::sql(t, scs)
    }
}

type Rule<'a> = Box<dyn FnOnce(&[u8]) -> Vec<u8> + 'a>;

/// Applies `rule(field, message)` to every field it returns a rewrite for.
///
/// # Safety: `edata` is PostgreSQL's line being reported.
unsafe fn rewrite<'a, R, F>(edata: &mut ErrorData, rule: R) -> bool
where
    R: Fn(Field, &[u8]) -> Option<F>,
    F: FnOnce(&[u8]) -> Vec<u8> + 'a,
{
    // SAFETY: the line's own fields, NUL-terminated or NULL.
    unsafe {
        let message = bytes(edata.message).unwrap_or_default().to_vec();
        let fields = [
            (Field::Message, &raw mut edata.message),
            (Field::Detail, &raw mut edata.detail),
            (Field::DetailLog, &raw mut edata.detail_log),
            (Field::Hint, &raw mut edata.hint),
            (Field::Context, &raw mut edata.context),
            (Field::InternalQuery, &raw mut edata.internalquery),
        ];
        for (kind, ptr) in fields {
            let Some(old) = bytes(*ptr) else { continue };
            let Some(f) = rule(kind, &message) else {
                continue;
            };
            let new = f(old);
            if !replace(edata, &mut *ptr, &new) {
                return false;
            }
        }
        true
    }
}

/// # Safety: `edata` is PostgreSQL's line being reported.
unsafe fn rewrite_sensitive(
    edata: &mut ErrorData,
    line: Line,
    original: &[u8],
    redacted: &[u8],
    scs: bool,
) -> bool {
    let class = rules::class(edata.sqlerrcode);
    // manna_crypt's own errors have no source location (pg::report) and
    // never carry a value: they stay as they are. PostgreSQL's do.
    let own = edata.filename.is_null();
    // Data exceptions quote the value; a syntax error quotes the token it
    // stopped at, a literal included. Integrity violations (23) name only
    // objects in their message and show the row or key in DETAIL.
    let quotes_value = !own && (class == *b"22" || is_syntax_error(edata.sqlerrcode));
    let shows_row = !own && class == *b"23";
    let rule = |field: Field, _msg: &[u8]| -> Option<Rule<'_>> {
        let field = if field == Field::DetailLog {
            Field::Detail
        } else {
            field
        };
        Some(match (field, line) {
            (Field::Message, Line::Statement) => {
                Box::new(move |t| rules::statement_line(t, original, redacted, scs))
            }
            (Field::Message, Line::Plan) => Box::new(move |t| rules::plan(t, scs)),
            (Field::Message, _) if quotes_value => Box::new(move |t| rules::values(t, scs)),
            (Field::Detail, Line::NodeDump) => Box::new(|_| FIELD_MARK.as_bytes().to_vec()),
            // `parameters: $1 = '...'`.
            (Field::Detail, Line::Statement) => Box::new(move |t| rules::sql(t, scs)),
            (Field::Detail, _) if shows_row => Box::new(rules::row_detail),
            (Field::Detail | Field::Hint, _) if quotes_value => {
                Box::new(move |t| rules::values(t, scs))
            }
            (Field::Context, _) => Box::new(move |t| rules::context(t, scs)),
            (Field::InternalQuery, _) => Box::new(move |t| rules::sql(t, scs)),
            _ => return None,
        })
    };
    // SAFETY: as the caller promises.
    unsafe { rewrite(edata, rule) }
}

/// SQLSTATE 40P01, packed as PostgreSQL packs it.
fn is_deadlock(code: i32) -> bool {
    code == pgrx::PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED as i32
}

/// SQLSTATE 42601, packed as PostgreSQL packs it.
fn is_syntax_error(code: i32) -> bool {
    code == pgrx::PgSqlErrorCode::ERRCODE_SYNTAX_ERROR as i32
}
