//! What makes a statement sensitive, known without a catalog lookup while
//! an error is being reported: the manna_crypt functions (OIDs and names),
//! the protected tables (tables carrying the protect trigger: OIDs and
//! names), and the statement texts parse analysis found touching them.
//!
//! The list is read from the catalogs in parse analysis (where lookups are
//! safe) whenever an invalidation may have changed it: any relcache
//! invalidation (CREATE/DROP TRIGGER, a rename, a dropped table) or a
//! change of `pg_proc`. Until it is read again it is *stale*, and a
//! statement whose text could write a table is judged sensitive: a table
//! may have been protected since (over-redaction, never a leak). A new
//! backend starts stale, as does a parallel worker (which never analyzes).

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

use manna_crypt_core::sqllex;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

use crate::protect::trigger::TRIGGER_NAME;

/// Functions that take plaintexts, keys or tokens, known before the
/// catalog has been read (a new backend's first statement is logged before
/// it is analyzed). The catalog's list is added when read.
const STATIC_FUNCTIONS: &[&str] = &[
    "encrypt_gcm",
    "decrypt_gcm",
    "aes_gcm_decrypt",
    "decrypt_fernet",
    "decrypt_any",
    "import_fernet_key",
    "import_fernet_key_file",
    "blind_index",
    "blind_index_all",
];

/// How many analyzed texts are remembered; past it the set starts over
/// (the lexical rule still judges those texts when they are logged).
const MARKED_MAX: usize = 4096;

#[derive(Default)]
pub struct WatchList {
    pub functions: HashSet<Oid>,
    function_names: HashSet<Vec<u8>>,
    pub tables: HashSet<Oid>,
    table_names: HashSet<Vec<u8>>,
}

thread_local! {
    static LIST: RefCell<WatchList> = RefCell::new(WatchList::default());
    static MARKED: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Set by the invalidation callbacks, cleared by [`refresh`]. Starts set.
static STALE: AtomicBool = AtomicBool::new(true);

pub fn is_stale() -> bool {
    STALE.load(Ordering::Relaxed)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, _relid: Oid) {
    STALE.store(true, Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_syscache(_arg: pg_sys::Datum, _id: i32, _hash: u32) {
    STALE.store(true, Ordering::Relaxed);
}

pub fn register_callbacks() {
    if REGISTERED.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: function pointers that live as long as the library, which is
    // never unloaded.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            Some(on_syscache),
            pg_sys::Datum::from(0),
        );
    }
}

/// Reads the list from the catalogs if it may have changed. Only where
/// catalog access is allowed: inside a transaction that is not aborted.
pub fn refresh() {
    // SAFETY: a plain check of the transaction state.
    if !is_stale() || !unsafe { pg_sys::IsTransactionState() } {
        return;
    }
    // Cleared first: an invalidation that arrives while reading sets it
    // again, and the next analysis reads once more.
    STALE.store(false, Ordering::Relaxed);
    // If a scan raises (the statement then fails), the list stays stale.
    struct Unfinished;
    impl Drop for Unfinished {
        fn drop(&mut self) {
            STALE.store(true, Ordering::Relaxed);
        }
    }
    let unfinished = Unfinished;
    let mut list = WatchList::default();
    // SAFETY: catalog scans inside a transaction (checked above).
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"manna_crypt".as_ptr(), true);
        if nsp != pg_sys::InvalidOid {
            scan_functions(nsp, &mut list);
        }
        scan_protected(&mut list);
    }
    LIST.with(|l| *l.borrow_mut() = list);
    std::mem::forget(unfinished);
}

/// # Safety: inside a transaction.
unsafe fn scan_functions(nsp: Oid, list: &mut WatchList) {
    unsafe {
        let rel = pg_sys::table_open(pg_sys::ProcedureRelationId, pg_sys::AccessShareLock as i32);
        let mut key = pg_sys::ScanKeyData::default();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_proc_pronamespace as i16,
            pg_sys::BTEqualStrategyNumber as u16,
            pg_sys::Oid::from(pg_sys::F_OIDEQ),
            pg_sys::Datum::from(nsp),
        );
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::InvalidOid,
            false,
            std::ptr::null_mut(),
            1,
            &mut key,
        );
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple);
            list.functions.insert(form.oid);
            let name = pg_sys::name_data_to_str(&form.proname);
            list.function_names
                .insert(name.as_bytes().to_ascii_lowercase());
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    }
}

/// # Safety: inside a transaction.
unsafe fn scan_protected(list: &mut WatchList) {
    unsafe {
        let rel = pg_sys::table_open(pg_sys::TriggerRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::InvalidOid,
            false,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        let mut relids = Vec::new();
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_trigger>(tuple);
            if pg_sys::name_data_to_str(&form.tgname) == TRIGGER_NAME {
                relids.push(form.tgrelid);
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        for relid in relids {
            list.tables.insert(relid);
            let name = pg_sys::get_rel_name(relid);
            if !name.is_null() {
                let name = std::ffi::CStr::from_ptr(name)
                    .to_bytes()
                    .to_ascii_lowercase();
                list.table_names.insert(name);
            }
        }
    }
}

/// Runs `f` on the list as it stands (possibly stale).
pub fn with_list<T>(f: impl FnOnce(&WatchList) -> T) -> T {
    LIST.with(|l| f(&l.borrow()))
}

fn digest(text: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Remembers that parse analysis found `text` (the statement being
/// logged, `debug_query_string`) touching manna_crypt.
pub fn mark(text: &[u8]) {
    let d = digest(text);
    MARKED.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= MARKED_MAX {
            m.clear();
        }
        m.insert(d);
    });
}

pub fn is_marked(text: &[u8]) -> bool {
    let d = digest(text);
    MARKED.with(|m| m.borrow().contains(&d))
}

/// Key words of the statements that can write a table (directly, in a CTE,
/// or as COPY FROM).
const WRITES: &[&[u8]] = &[b"insert", b"update", b"merge", b"copy"];

/// The lexical rule, for text no analysis has judged (the `statement:`
/// line is logged before analysis; a syntax error is never analyzed):
/// sensitive if it names `manna_crypt`, calls a manna_crypt function by
/// name, names a protected table, or — while the list is stale — could
/// write a table at all. Names compare case-insensitively (more, never
/// less, than PostgreSQL's folding matches).
pub fn text_is_sensitive(text: &[u8], opts: sqllex::Options) -> bool {
    let stale = is_stale();
    with_list(|list| {
        sqllex::mentions_in(text, opts, |name, called| {
            let name = name.to_ascii_lowercase();
            name == b"manna_crypt"
                || list.table_names.contains(&name)
                || (called
                    && (list.function_names.contains(&name)
                        || STATIC_FUNCTIONS.iter().any(|f| f.as_bytes() == name)))
                || (stale && WRITES.contains(&name.as_slice()))
        })
    })
}
