//! One backend's side of the usage counters ([`super::counters`]): a
//! [`Tally`] per (kind, id) holds the rest of the backend's current block
//! and counts it down with no shared access; the cache keeps it beside the
//! active key's cipher. At the end of a transaction that counted, the
//! slot's `last_used` is set; at exit (`before_shmem_exit`) the unused rest
//! of every block goes back to shared memory, so the counts are exact once
//! every backend is gone.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use manna_crypt_core::budget::Stored;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::counters::{self, Kind, Slot};
use crate::error::McResult;

/// One backend's counting for one (kind, id) of its database: the rest of
/// its current block, counted down without any shared access.
pub struct Tally {
    kind: Kind,
    id: u32,
    slot: Cell<Option<&'static Slot>>,
    left: Cell<u64>,
    /// Counted since the last transaction end (for `last_used`).
    dirty: Cell<bool>,
}

impl Tally {
    /// Counts one from the current block; false when the block is used up.
    #[inline]
    pub fn take_one(&self) -> bool {
        let left = self.left.get();
        if left == 0 {
            return false;
        }
        self.left.set(left - 1);
        self.dirty.set(true);
        true
    }

    /// Takes a new block of `block` (counting one from it), after moving the
    /// durable mark by `chunk` if needed. Returns the count at the block's
    /// end: a bound on this key's count once the block is used up.
    pub fn refill(&self, block: u64, chunk: u64) -> McResult<u64> {
        let block = block.max(1);
        let end = self.slot()?.take_block(block, chunk)?;
        self.left.set(block - 1);
        self.dirty.set(true);
        Ok(end)
    }

    /// This counter's slot in shared memory, found or filled on first use:
    /// an error when there is no shared memory or the table is full.
    pub fn attach(&self) -> McResult<()> {
        self.slot().map(|_| ())
    }

    fn slot(&self) -> McResult<&'static Slot> {
        if let Some(s) = self.slot.get() {
            return Ok(s);
        }
        let s = counters::find_or_insert(self.kind, self.id)?;
        register_backend_callbacks();
        self.slot.set(Some(s));
        Ok(s)
    }

    /// Gives the rest of the block back (at exit).
    fn give_back(&self) {
        if let Some(slot) = self.slot.get() {
            slot.give_back(self.left.replace(0));
        }
    }

    /// `last_used` of a counter that counted since the last call.
    fn stamp(&self) {
        if let (true, Some(slot)) = (self.dirty.replace(false), self.slot.get()) {
            slot.stamp();
        }
    }
}

thread_local! {
    static TALLIES: RefCell<HashMap<(Kind, u32), Rc<Tally>>> = RefCell::new(HashMap::new());
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// This backend's tally of (kind, id) in its database. Cheap and never an
/// error: shared memory is reached at the first [`Tally::refill`].
pub fn tally(kind: Kind, id: u32) -> Rc<Tally> {
    TALLIES.with(|t| {
        t.borrow_mut()
            .entry((kind, id))
            .or_insert_with(|| {
                Rc::new(Tally {
                    kind,
                    id,
                    slot: Cell::new(None),
                    left: Cell::new(0),
                    dirty: Cell::new(false),
                })
            })
            .clone()
    })
}

fn each_tally(mut f: impl FnMut(&Tally)) {
    TALLIES.with(|t| t.borrow().values().for_each(|tally| f(tally)));
}

fn register_backend_callbacks() {
    if CALLBACKS.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: function pointers that live as long as the library.
    unsafe {
        pg_sys::before_shmem_exit(Some(on_backend_exit), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact_end), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_backend_exit(_code: i32, _arg: pg_sys::Datum) {
    each_tally(|t| {
        t.stamp();
        t.give_back();
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if crate::pg::xact::is_end(event) {
        each_tally(Tally::stamp);
    }
}

/// [`counters::read`] for this database, without this backend's own unused
/// blocks: a session sees its own count exactly.
pub fn read(kind: Kind) -> McResult<BTreeMap<u32, Stored>> {
    let mut out = counters::read(kind)?;
    each_tally(|t| {
        if let (true, Some(s)) = (t.kind == kind, out.get_mut(&t.id)) {
            if t.slot.get().is_some() {
                s.count = s.count.saturating_sub(t.left.get());
            }
        }
    });
    Ok(out)
}
