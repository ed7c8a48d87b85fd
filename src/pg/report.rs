//! How messages leave the extension: never with a Rust backtrace or a Rust
//! source location, and PostgreSQL's own errors with every field they had.
//!
//! What pgrx 0.18 does by itself:
//!
//! - When PostgreSQL loads the library, pgrx installs a panic hook that
//!   records the panic's location and `Backtrace::capture()`, a full
//!   backtrace whenever the server's environment has RUST_BACKTRACE set.
//! - Every `pg_sys` call runs under `sigsetjmp`. A PostgreSQL ERROR inside
//!   one (an SPI statement's lock timeout, cancel, constraint violation,
//!   permission check) is copied down to its SQLSTATE, message, DETAIL,
//!   HINT and C source location, the original is flushed, and the ERROR
//!   goes on as a Rust panic that unwinds our frames. At the SQL function's
//!   boundary pgrx reports it anew: the backtrace appended to DETAIL, the
//!   statement's CONTEXT lines and the schema, table, column, data type and
//!   constraint names gone.
//! - An error raised from Rust (`ErrorReport`, so `McError::raise`) and a
//!   `notice!` carry their Rust file and line, which PostgreSQL sends to
//!   every client (the F/L/R fields) and logs as LOCATION.
//!
//! What this module does instead:
//!
//! 1. [`install`] (from `_PG_init`) replaces the panic hook: it records no
//!    location or backtrace, and arms the *replay* of the panic's error.
//! 2. [`Capture`] wraps each SPI statement in an error-context callback,
//!    which PostgreSQL calls while it reports an ERROR in the statement,
//!    before pgrx copies and flushes it: it keeps a full copy.
//! 3. The replay callback sits on top of PostgreSQL's error-context stack
//!    while the panic unwinds. When pgrx reports the error at the function
//!    boundary, PostgreSQL's `errfinish` calls it first, and it throws the
//!    kept error instead (`ThrowErrorData`): PostgreSQL's original with all
//!    its fields, or ours with no source location. PostgreSQL handles an
//!    error thrown from a context callback as a recursive error: it reaches
//!    the handler pgrx's report would have reached, and the outer context
//!    callbacks (PL/pgSQL lines, an outer SQL statement) still add theirs.
//! 4. [`notice`] sends NOTICEs with no source location.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe, PanicHookInfo};
use std::ptr;

use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
use pgrx::pg_sys::{self, AsPgCStr, ErrorContextCallback, ErrorData};
use pgrx::PgSqlErrorCode;

const ERROR: i32 = pg_sys::PGERROR as i32;
const NOTICE: i32 = pg_sys::NOTICE as i32;
const WARNING: i32 = pg_sys::WARNING as i32;
const LOG_SERVER_ONLY: i32 = pg_sys::LOG_SERVER_ONLY as i32;

unsafe extern "C-unwind" {
    /// PostgreSQL's `ThrowErrorData`, not through pgrx's binding: that one
    /// would catch the longjmp it ends in and make it a Rust panic inside a
    /// C callback.
    #[link_name = "ThrowErrorData"]
    fn throw_error_data(edata: *mut ErrorData);
}

thread_local! {
    /// The last ERROR PostgreSQL reported inside our current SPI statement.
    static CAPTURED: RefCell<Option<Report>> = const { RefCell::new(None) };
    /// What the replay callback throws: set by every panic.
    static ARMED: RefCell<Option<Report>> = const { RefCell::new(None) };
    /// The replay callback's entry of the error-context stack. It has a
    /// fixed address, so it can stay linked while the frames that linked it
    /// unwind, and can never dangle if an error is handled in Rust.
    static REPLAY: UnsafeCell<ErrorContextCallback> = const {
        UnsafeCell::new(ErrorContextCallback {
            previous: ptr::null_mut(),
            callback: Some(replay),
            arg: ptr::null_mut(),
        })
    };
    /// Set while one of our context callbacks runs.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
    /// The backend's own thread, the only one that may touch PostgreSQL.
    static MAIN: Cell<bool> = const { Cell::new(false) };
    static INTERNED: RefCell<HashMap<String, &'static CStr>> = RefCell::new(HashMap::new());
}

/// A message as PostgreSQL's `ErrorData` holds it, in Rust strings.
#[derive(Default)]
struct Report {
    elevel: i32,
    code: i32,
    message: String,
    detail: Option<String>,
    detail_log: Option<String>,
    hint: Option<String>,
    context: Option<String>,
    /// PostgreSQL's own backtrace (`backtrace_functions`), C frames.
    backtrace: Option<String>,
    /// Schema, table, column, data type and constraint names.
    names: [Option<String>; 5],
    internal_query: Option<String>,
    internal_pos: i32,
    cursor_pos: i32,
    /// The C source location (file, line, function) of PostgreSQL's
    /// original; never a Rust one.
    location: Option<(String, i32, Option<String>)>,
}

/// # Safety: `p` is NULL or a NUL-terminated string.
unsafe fn owned(p: *const c_char) -> Option<String> {
    // SAFETY: as the caller promises.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl Report {
    /// A Rust panic, as pgrx reports it: XX000 with the panic's message.
    fn panic(message: &str) -> Self {
        Report {
            elevel: ERROR,
            code: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR as i32,
            message: message.into(),
            ..Default::default()
        }
    }

    /// An error raised from Rust (`McError::raise`, pgrx's `ereport!`),
    /// without the call site pgrx recorded.
    fn from_pgrx(e: &ErrorReportWithLevel) -> Self {
        Report {
            elevel: ERROR,
            code: e.sql_error_code() as i32,
            message: e.message().into(),
            detail: e.detail().map(Into::into),
            hint: e.hint().map(Into::into),
            ..Default::default()
        }
    }

    /// # Safety: `e` is a valid `ErrorData`.
    unsafe fn from_error_data(e: &ErrorData) -> Self {
        // SAFETY: every string field of a valid ErrorData is NULL or a C string.
        unsafe {
            // An error another pgrx extension raised has a Rust location.
            let location = owned(e.filename)
                .filter(|file| !file.ends_with(".rs"))
                .map(|file| (file, e.lineno, owned(e.funcname)));
            Report {
                elevel: e.elevel,
                code: e.sqlerrcode,
                message: owned(e.message).unwrap_or_default(),
                detail: owned(e.detail),
                detail_log: owned(e.detail_log),
                hint: owned(e.hint),
                context: owned(e.context),
                backtrace: owned(e.backtrace),
                names: [
                    owned(e.schema_name),
                    owned(e.table_name),
                    owned(e.column_name),
                    owned(e.datatype_name),
                    owned(e.constraint_name),
                ],
                internal_query: owned(e.internalquery),
                internal_pos: e.internalpos,
                cursor_pos: e.cursorpos,
                location,
            }
        }
    }

    /// The message PostgreSQL is reporting right now (in a context
    /// callback), or None outside a transaction.
    fn current() -> Option<Self> {
        // SAFETY: CopyErrorData copies the error being reported into the
        // transaction's memory (not ErrorContext, as it requires); the copy
        // is read and freed at once. If it fails, the callback restores the
        // memory context.
        unsafe {
            let memory = transaction_memory()?;
            let old = pg_sys::MemoryContextSwitchTo(memory);
            let edata = pg_sys::CopyErrorData();
            let report = Report::from_error_data(&*edata);
            pg_sys::FreeErrorData(edata);
            pg_sys::MemoryContextSwitchTo(old);
            Some(report)
        }
    }

    /// Whether `other` reports the same ERROR (as pgrx copies it: SQLSTATE
    /// and message).
    fn is_same(&self, other: &Report) -> bool {
        self.elevel == ERROR
            && other.elevel == ERROR
            && self.code == other.code
            && self.message == other.message
    }

    /// The report as an `ErrorData` palloc'd in the current memory context,
    /// for `ThrowErrorData`, which copies its strings but keeps the location
    /// as pointers (interned here, so they outlive any copy of the error).
    fn to_error_data(&self) -> *mut ErrorData {
        // SAFETY: a zeroed ErrorData is a valid empty one; every string is
        // palloc'd in the current memory context.
        unsafe {
            let e = pg_sys::palloc0(std::mem::size_of::<ErrorData>()).cast::<ErrorData>();
            let d = &mut *e;
            d.elevel = self.elevel;
            d.sqlerrcode = self.code;
            d.message = self.message.as_str().as_pg_cstr();
            d.detail = self.detail.as_pg_cstr();
            d.detail_log = self.detail_log.as_pg_cstr();
            d.hint = self.hint.as_pg_cstr();
            d.context = self.context.as_pg_cstr();
            d.backtrace = self.backtrace.as_pg_cstr();
            let [schema, table, column, datatype, constraint] = &self.names;
            d.schema_name = schema.as_pg_cstr();
            d.table_name = table.as_pg_cstr();
            d.column_name = column.as_pg_cstr();
            d.datatype_name = datatype.as_pg_cstr();
            d.constraint_name = constraint.as_pg_cstr();
            d.internalquery = self.internal_query.as_pg_cstr();
            d.internalpos = self.internal_pos;
            d.cursorpos = self.cursor_pos;
            if let Some((file, line, func)) = &self.location {
                d.filename = intern(file);
                d.lineno = *line;
                d.funcname = func.as_deref().map_or(ptr::null(), intern);
            }
            e
        }
    }
}

/// A C string that lives as long as the process: PostgreSQL never copies a
/// location's file and function names (they are `__FILE__` and `__func__`
/// in C). One copy per distinct name that ever reached us.
fn intern(s: &str) -> *const c_char {
    INTERNED.with(|m| {
        let mut m = m.borrow_mut();
        let c = m.entry(s.to_owned()).or_insert_with(|| {
            let c = CString::new(s.replace('\0', "")).unwrap_or_default();
            Box::leak(c.into_boxed_c_str())
        });
        c.as_ptr()
    })
}

/// Replaces pgrx's panic hook; from `_PG_init`, on the backend's thread.
pub fn install() {
    MAIN.with(|m| m.set(true));
    std::panic::set_hook(Box::new(on_panic));
}

/// Records nothing of where the panic happened (pgrx's report then has no
/// backtrace, and its location is replaced by the replay), and arms the
/// replay with the report the panic carries. A panic on any other thread
/// (manna_crypt starts none) is silent: pgrx printed it with its location.
fn on_panic(info: &PanicHookInfo<'_>) {
    if IN_CALLBACK.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let payload = info.payload();
    if let Some(caught) = payload.downcast_ref::<CaughtError>() {
        // pgrx caught a PostgreSQL ERROR in a pg_sys call. Only [`Capture`]
        // has all of it; its guard links the replay once the call is left.
        let kept = CAPTURED.try_with(|c| c.take()).ok().flatten();
        let report = match caught {
            CaughtError::PostgresError(e) => kept.filter(|k| k.is_same(&Report::from_pgrx(e))),
            _ => None,
        };
        arm(report);
        return;
    }
    let report = if let Some(e) = payload.downcast_ref::<ErrorReportWithLevel>() {
        Report::from_pgrx(e)
    } else if let Some(message) = payload.downcast_ref::<&str>() {
        Report::panic(message)
    } else if let Some(message) = payload.downcast_ref::<String>() {
        Report::panic(message)
    } else {
        Report::panic("Box<Any>") // pgrx's message for any other payload
    };
    arm(Some(report));
    link();
}

fn arm(report: Option<Report>) {
    let _ = ARMED.try_with(|a| a.replace(report));
}

/// Puts the replay callback on top of PostgreSQL's error-context stack,
/// unless it is on the stack already (linked twice, the stack would be a
/// cycle).
fn link() {
    if !MAIN.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    let entry = REPLAY.with(UnsafeCell::get);
    // SAFETY: PostgreSQL's error-context stack, on its own thread; `entry`
    // is a thread-local with a fixed address.
    unsafe {
        let mut e = pg_sys::error_context_stack;
        while !e.is_null() {
            if e == entry {
                return;
            }
            e = (*e).previous;
        }
        (*entry).previous = pg_sys::error_context_stack;
        pg_sys::error_context_stack = entry;
    }
}

/// Takes `entry` off PostgreSQL's error-context stack, wherever it is.
/// # Safety: on the backend's thread; `entry` is valid.
unsafe fn unlink(entry: *mut ErrorContextCallback) {
    // SAFETY: walks and edits the stack's own entries.
    unsafe {
        if pg_sys::error_context_stack == entry {
            pg_sys::error_context_stack = (*entry).previous;
            return;
        }
        let mut e = pg_sys::error_context_stack;
        while !e.is_null() {
            if (*e).previous == entry {
                (*e).previous = (*entry).previous;
                return;
            }
            e = (*e).previous;
        }
    }
}

/// Runs `f` in a context callback: PostgreSQL is in the middle of a report,
/// so nothing may unwind into it, and the panic hook must stay out (also
/// used by the log redaction's `emit_log_hook`).
pub fn in_callback<T>(f: impl FnOnce() -> T) -> Option<T> {
    IN_CALLBACK.with(|c| c.set(true));
    let result = catch_unwind(AssertUnwindSafe(f)).ok();
    IN_CALLBACK.with(|c| c.set(false));
    result
}

/// The replay callback (see the module comment).
unsafe extern "C-unwind" fn replay(_arg: *mut c_void) {
    // SAFETY: called by errfinish on the backend's thread.
    let memory = unsafe { pg_sys::CurrentMemoryContext };
    let edata = in_callback(replacement).flatten();
    // SAFETY: restores errfinish's memory context (ErrorContext).
    unsafe { pg_sys::CurrentMemoryContext = memory };
    if let Some(edata) = edata {
        // Nothing of ours lives on this frame: the longjmp ThrowErrorData
        // ends in skips no destructor.
        // SAFETY: a complete ErrorData; the error goes to the handler that
        // errfinish would have passed pgrx's report to.
        unsafe { throw_error_data(edata) }
    }
}

/// The error to throw in place of the one being reported, if it is the one
/// the replay is armed with.
fn replacement() -> Option<*mut ErrorData> {
    let current = Report::current()?;
    if current.elevel != ERROR {
        return None; // a NOTICE or WARNING meanwhile: not ours to replace
    }
    // Disarmed whatever it is. Where manna_crypt catches an error and goes
    // on, it calls [`handled`] (advisory.rs turns a lock timeout into its
    // own 55P03, which arms anew), so the first ERROR reported after a
    // panic is the panic's; if it ever is not, the replay stands aside.
    let armed = ARMED.with(|a| a.take())?;
    if !armed.is_same(&current) {
        return None;
    }
    // SAFETY: our own entry; the thrown error's errfinish then runs only
    // the callbacks below it. ThrowErrorData copies the strings out of the
    // (sub)transaction's memory before anything can free them; `replay`
    // restores the memory context.
    unsafe {
        unlink(REPLAY.with(UnsafeCell::get));
        pg_sys::MemoryContextSwitchTo(transaction_memory()?);
    }
    Some(armed.to_error_data())
}

/// The current (sub)transaction's memory, where a callback may allocate:
/// not ErrorContext, which a recursive error resets.
fn transaction_memory() -> Option<pg_sys::MemoryContext> {
    // SAFETY: reads a PostgreSQL global on its own thread.
    let memory = unsafe { pg_sys::CurTransactionContext };
    (!memory.is_null()).then_some(memory)
}

/// Keeps a full copy of an ERROR that PostgreSQL reports while the guard
/// lives: start it right before an SPI call, drop it right after.
pub struct Capture {
    entry: Box<ErrorContextCallback>,
}

impl Capture {
    pub fn start() -> Self {
        CAPTURED.with(|c| c.take());
        let mut entry = Box::new(ErrorContextCallback {
            // SAFETY: reads PostgreSQL's stack on its own thread.
            previous: unsafe { pg_sys::error_context_stack },
            callback: Some(capture),
            arg: ptr::null_mut(),
        });
        // SAFETY: boxed, the entry does not move while linked; Drop unlinks.
        unsafe { pg_sys::error_context_stack = &mut *entry };
        Capture { entry }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: our own entry, linked in `start`.
        unsafe { unlink(&mut *self.entry) };
        if std::thread::panicking() {
            // The statement failed; if the hook armed the replay with our
            // copy, the function boundary's report must meet it.
            if ARMED.with(|a| a.borrow().is_some()) {
                link();
            }
        } else {
            CAPTURED.with(|c| c.take());
        }
    }
}

unsafe extern "C-unwind" fn capture(_arg: *mut c_void) {
    // SAFETY: called by errfinish on the backend's thread.
    let memory = unsafe { pg_sys::CurrentMemoryContext };
    in_callback(|| {
        if let Some(report) = Report::current().filter(|r| r.elevel == ERROR) {
            CAPTURED.with(|c| c.replace(Some(report)));
        }
    });
    // SAFETY: restores errfinish's memory context.
    unsafe { pg_sys::CurrentMemoryContext = memory };
}

/// Says that an error was handled in Rust and the work goes on (a row that
/// could not be written, in a subtransaction that was rolled back): it is
/// never to be replayed. Without this, the armed copy would wait for the
/// next ERROR with the same SQLSTATE and message — another row's, or a
/// later statement's — and stand in for it with its own DETAIL.
pub fn handled() {
    CAPTURED.with(|c| c.take());
    ARMED.with(|a| a.take());
    // SAFETY: our own fixed entry, taken off the stack if it is there.
    unsafe { unlink(REPLAY.with(UnsafeCell::get)) };
}

/// Sends a NOTICE (to the client, and to the log as configured) without a
/// source location. Through pgrx's binding of `ThrowErrorData`, so a cancel
/// PostgreSQL notices while sending it unwinds as an ordinary ERROR.
pub fn notice(message: impl Into<String>) {
    send(NOTICE, message.into(), None);
}

/// As [`notice`], a WARNING with a HINT.
pub fn warning(message: impl Into<String>, hint: impl Into<String>) {
    send(WARNING, message.into(), Some(hint.into()));
}

/// As [`notice`], a LOG line for the server log only (also usable in the
/// postmaster).
pub fn log_server(message: impl Into<String>) {
    send(LOG_SERVER_ONLY, message.into(), None);
}

/// As [`log_server`], without the statement and without the context lines
/// (COPY's context quotes the raw input line): for a LOG line written while
/// a statement that may carry plaintexts runs.
pub fn log_server_alone(message: impl Into<String>) {
    let report = Report {
        elevel: LOG_SERVER_ONLY,
        message: message.into(),
        ..Default::default()
    };
    let edata = report.to_error_data();
    // SAFETY: as in `send`. ThrowErrorData copies no hide_stmt flag, so
    // the statement (the STATEMENT line, csvlog/jsonlog's query field) and
    // the context stack are taken away only for this call (a LOG returns
    // normally) and put back.
    unsafe {
        let (query, stack) = (pg_sys::debug_query_string, pg_sys::error_context_stack);
        pg_sys::debug_query_string = ptr::null();
        pg_sys::error_context_stack = ptr::null_mut();
        pg_sys::ThrowErrorData(edata);
        pg_sys::debug_query_string = query;
        pg_sys::error_context_stack = stack;
        pg_sys::FreeErrorData(edata);
    }
}

fn send(elevel: i32, message: String, hint: Option<String>) {
    let code = match elevel {
        WARNING => PgSqlErrorCode::ERRCODE_WARNING as i32,
        _ => 0,
    };
    let report = Report {
        elevel,
        code,
        message,
        hint,
        ..Default::default()
    };
    let edata = report.to_error_data();
    // SAFETY: a complete ErrorData of ours, freed after PostgreSQL copied it.
    unsafe {
        pg_sys::ThrowErrorData(edata);
        pg_sys::FreeErrorData(edata);
    }
}
