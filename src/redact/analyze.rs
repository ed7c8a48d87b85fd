//! The `post_parse_analyze_hook`: where catalog lookups are still safe, it
//! refreshes the watch list and marks the statement being run
//! (`debug_query_string`) when its parse tree calls a manna_crypt function
//! or writes a protected table. A statement inside a function (PL/pgSQL,
//! SQL functions) is analyzed while the outer statement runs, so the outer
//! statement's later lines (its error, its duration) are redacted too.
//!
//! Cost: nothing but the previous hook while `redact_log` is off; else one
//! walk of the parse tree with a hash-set probe per function call, and one
//! hash of the statement text when it is marked. `scripts/bench.sh`
//! (section `redact`) measures it.

use std::ffi::{c_void, CStr};

use pgrx::pg_sys::{self, Node, NodeTag, Query};
use pgrx::prelude::*;

use super::watch::{self, WatchList};
use super::Mode;

static mut PREVIOUS: pg_sys::post_parse_analyze_hook_type = None;

pub fn install() {
    // SAFETY: _PG_init, single-threaded; the previous hook is chained.
    unsafe {
        PREVIOUS = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(on_analyze);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_analyze(
    pstate: *mut pg_sys::ParseState,
    query: *mut Query,
    jstate: *mut pg_sys::JumbleState,
) {
    // SAFETY: PostgreSQL's arguments, passed on unchanged.
    unsafe {
        if let Some(previous) = PREVIOUS {
            previous(pstate, query, jstate);
        }
    }
    if super::mode() != Mode::On || query.is_null() {
        return;
    }
    watch::refresh();
    // A database without the extension has nothing to find: no walk.
    // SAFETY: a valid Query tree of the current statement.
    let touches = watch::with_list(|list| {
        (!list.functions.is_empty() || !list.tables.is_empty())
            && unsafe { walk(query.cast(), list) }
    });
    // SAFETY: PostgreSQL's global; NUL-terminated or NULL.
    let text = unsafe { pg_sys::debug_query_string };
    if touches && !text.is_null() {
        // SAFETY: checked non-NULL above.
        watch::mark(unsafe { CStr::from_ptr(text) }.to_bytes());
    }
}

/// # Safety: `node` is NULL or a valid parse-tree node.
unsafe fn walk(node: *mut Node, list: &WatchList) -> bool {
    let ctx = list as *const WatchList as *mut c_void;
    // SAFETY: as the caller promises; `ctx` outlives the walk.
    unsafe { walker(node, ctx) }
}

unsafe extern "C-unwind" fn walker(node: *mut Node, ctx: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `ctx` is the WatchList `walk` passed; nodes come from
    // PostgreSQL's walkers over a valid tree.
    unsafe {
        let list = &*(ctx as *const WatchList);
        match (*node).type_ {
            NodeTag::T_Query => {
                let q = node.cast::<Query>();
                if query_touches(q, list) {
                    return true;
                }
                return pg_sys::query_tree_walker(q, Some(walker), ctx, 0);
            }
            NodeTag::T_FuncExpr
                if list
                    .functions
                    .contains(&(*node.cast::<pg_sys::FuncExpr>()).funcid) =>
            {
                return true;
            }
            _ => {}
        }
        pg_sys::expression_tree_walker(node, Some(walker), ctx)
    }
}

/// The query's own target (INSERT, UPDATE, MERGE) or a CALL of a
/// manna_crypt procedure. (COPY names its table in its text, which the
/// lexical rule reads.)
///
/// # Safety: `q` is a valid Query.
unsafe fn query_touches(q: *mut Query, list: &WatchList) -> bool {
    // SAFETY: fields of a valid Query.
    unsafe {
        let q = &*q;
        if q.resultRelation > 0 {
            let rte =
                pg_sys::list_nth(q.rtable, q.resultRelation - 1).cast::<pg_sys::RangeTblEntry>();
            if !rte.is_null() && list.tables.contains(&(*rte).relid) {
                return true;
            }
        }
        let utility = q.utilityStmt;
        if utility.is_null() {
            return false;
        }
        match (*utility).type_ {
            NodeTag::T_CallStmt => {
                let call = &*utility.cast::<pg_sys::CallStmt>();
                !call.funcexpr.is_null() && list.functions.contains(&(*call.funcexpr).funcid)
            }
            _ => false,
        }
    }
}
