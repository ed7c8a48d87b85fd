//! Unwrapped data keys, per backend.
//!
//! The hot path — one encrypt or decrypt per row — is a hash lookup here and
//! nothing else: no SPI, no catalog access, no privilege switch. A miss reads
//! the key tables once (as the extension owner, through the read-only SPI
//! path, so a miss in a parallel worker or on a standby works), unwraps the data key under
//! the root key and keeps the expanded AES key schedule. Negative answers
//! (unknown, revoked, destroyed) are cached too, so a bad row costs no query.
//!
//! Invalidation: every change to the key tables fires a statement trigger
//! that queues a relcache invalidation for `manna_crypt.data_keys`. PostgreSQL
//! delivers it to every backend (and, through the WAL, to hot standbys) at
//! commit; a backend processes it no later than the start of its next
//! transaction, and our callback then drops the whole cache. So a revocation
//! takes effect everywhere by the next transaction, and a statement already
//! running keeps a consistent view.
//!
//! Key material lives in [`Key32`] / AES key schedules that are wiped on drop.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use manna_crypt_core::aead::Cipher;
use manna_crypt_core::blind::BlindKey;
use manna_crypt_core::fernet::FernetKey;
use manna_crypt_core::keywrap::{self, KeyKind, Slot};
use manna_crypt_core::names::check_keyring_name;
use manna_crypt_core::secret::Key32;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::access_stats::{self, Access};
use super::counters::Kind;
use super::rootkey;
use super::store::{self, Purpose, Status};
use super::tally::{self, Tally};
use crate::error::{McError, McResult};
use crate::pg::security::{self, run_as, Identity};

enum KeyEntry {
    Usable(DecryptKey),
    Unusable { keyring: String, status: Status },
    Fernet { keyring: String },
    Index { keyring: String },
    Missing,
}

/// A GCM keyring's active key: what encrypting needs, with the session's
/// tally of its encryptions right beside the cipher (no second lookup).
#[derive(Clone)]
pub struct ActiveKey {
    pub key_id: u32,
    pub cipher: Rc<Cipher>,
    pub tally: Rc<Tally>,
    /// The session's access statistics of the keyring.
    pub access: Rc<Access>,
}

/// A key that decrypts, with its keyring's access statistics cell.
#[derive(Clone)]
pub struct DecryptKey {
    pub cipher: Rc<Cipher>,
    pub access: Rc<Access>,
    /// The keyring's name, for the grant check of a decryption.
    pub keyring: Rc<str>,
}

/// A Fernet keyring's usable keys, newest first, with its statistics cell.
pub type FernetRing = (Rc<Vec<(u32, FernetKey)>>, Rc<Access>);

enum RingEntry {
    Gcm(ActiveKey),
    NoActive,
    Fernet(FernetRing),
    Missing,
}

/// A keyring's blind-index keys that lookups match, newest first; the
/// first is the active one (which computes new terms) when `has_active`.
pub struct IndexRing {
    pub live: Vec<BlindKey>,
    pub has_active: bool,
    /// The keyring's access counts (blind-index calls).
    pub access: Rc<Access>,
}

enum IndexEntry {
    Keys(Rc<IndexRing>),
    NoKeys,
    Fernet,
    Missing,
}

#[derive(Default)]
struct State {
    by_id: HashMap<u32, KeyEntry>,
    rings: HashMap<String, RingEntry>,
    index_rings: HashMap<String, IndexEntry>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Set by the relcache callback; checked (and cleared) on every lookup.
static STALE: AtomicBool = AtomicBool::new(false);
/// Also set by the relcache callback, and turned into [`STALE`] when the
/// transaction ends. A key reloaded after an invalidation but still inside
/// the transaction that processed it was read under that transaction's
/// snapshot (REPEATABLE READ, or a statement snapshot older than the change),
/// which may predate the change: without this, such a stale entry (a revoked
/// key still `Usable`) would outlive the transaction indefinitely.
static STALE_AT_XACT_END: AtomicBool = AtomicBool::new(false);
/// OID of manna_crypt.data_keys in this database, 0 until first resolved.
static DATA_KEYS_OID: AtomicU32 = AtomicU32::new(0);

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = DATA_KEYS_OID.load(Ordering::Relaxed);
    if relid == pg_sys::InvalidOid || ours == 0 || relid.to_u32() == ours {
        STALE.store(true, Ordering::Relaxed);
        STALE_AT_XACT_END.store(true, Ordering::Relaxed);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if crate::pg::xact::is_end(event) && STALE_AT_XACT_END.swap(false, Ordering::Relaxed) {
        STALE.store(true, Ordering::Relaxed);
    }
}

/// Registers the invalidation callbacks; called from `_PG_init`.
pub fn register_callback() {
    if CALLBACK_REGISTERED.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: registering a callback function pointer that lives as long as
    // the loaded library, which is never unloaded.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
    };
}

/// Drops every cached key now.
pub fn clear() {
    STATE.with(|s| *s.borrow_mut() = State::default());
    DATA_KEYS_OID.store(0, Ordering::Relaxed);
    security::forget_owner();
}

fn check_stale() {
    if STALE.swap(false, Ordering::Relaxed) {
        clear();
    }
}

fn resolve_data_keys_oid() -> McResult<()> {
    if DATA_KEYS_OID.load(Ordering::Relaxed) == 0 {
        let oid = store::data_keys_oid()?;
        DATA_KEYS_OID.store(oid.to_u32(), Ordering::Relaxed);
    }
    Ok(())
}

fn unwrap_key(slot: &Slot<'_>, wrapped: &[u8]) -> McResult<Key32> {
    let root = rootkey::effective_root()?;
    let key_id = slot.key_id;
    keywrap::unwrap(&root.key, slot, wrapped).map_err(|_| McError::Unauthenticated {
        detail: format!(
            "the stored data key {key_id} does not unwrap under the root key: \
             the key table is corrupt or was altered"
        ),
    })
}

fn unusable_error(key_id: u32, keyring: &str, status: Status) -> McError {
    McError::WrongState {
        message: format!(
            "key {key_id} of keyring \"{keyring}\" is {}",
            status.as_str()
        ),
        detail: Some("revoked and destroyed keys cannot decrypt".into()),
        hint: match status {
            Status::Revoked => Some(
                "if the revocation was a mistake, an administrator can call \
                 manna_crypt.reinstate_key()"
                    .into(),
            ),
            _ => None,
        },
    }
}

fn unknown_key(key_id: u32) -> McError {
    if key_id == 0 {
        McError::UnknownObject {
            message: "the value was encrypted with a raw key (key id 0)".into(),
            hint: Some("pass the key: decrypt_gcm(ciphertext, key bytea, aad)".into()),
        }
    } else {
        McError::unknown_key(key_id.into())
    }
}

/// The cipher for decrypting a value sealed under `key_id`, with its
/// keyring's name (what a grant check needs) and statistics cell: no second
/// lookup.
pub fn key_for_decrypt(key_id: u32) -> McResult<DecryptKey> {
    check_stale();
    let answer = |e: &KeyEntry| match e {
        KeyEntry::Usable(key) => Ok(key.clone()),
        KeyEntry::Unusable { keyring, status } => Err(unusable_error(key_id, keyring, *status)),
        KeyEntry::Fernet { keyring } => Err(fernet_key_id(key_id, keyring)),
        KeyEntry::Index { keyring } => Err(McError::BadArgument {
            message: format!("key {key_id} is a blind-index key of keyring \"{keyring}\""),
            detail: Some("blind-index keys compute index terms and never decrypt".into()),
            hint: None,
        }),
        KeyEntry::Missing => Err(unknown_key(key_id)),
    };
    if let Some(result) = STATE.with(|s| s.borrow().by_id.get(&key_id).map(answer)) {
        return result;
    }
    let entry = run_as(Identity::ExtensionOwner, || load_key(key_id))?;
    let result = answer(&entry);
    STATE.with(|s| s.borrow_mut().by_id.insert(key_id, entry));
    result
}

fn fernet_key_id(key_id: u32, keyring: &str) -> McError {
    McError::BadArgument {
        message: format!("key {key_id} belongs to Fernet keyring \"{keyring}\""),
        detail: None,
        hint: Some("Fernet keys only read Fernet tokens: use decrypt_fernet()".into()),
    }
}

fn load_key(key_id: u32) -> McResult<KeyEntry> {
    resolve_data_keys_oid()?;
    let Some(row) = store::key_by_id(key_id)? else {
        return Ok(KeyEntry::Missing);
    };
    match row.kind {
        KeyKind::Fernet => {
            return Ok(KeyEntry::Fernet {
                keyring: row.keyring,
            })
        }
        KeyKind::Index => {
            return Ok(KeyEntry::Index {
                keyring: row.keyring,
            })
        }
        KeyKind::Gcm => {}
    }
    let slot = Slot {
        key_id,
        kind: KeyKind::Gcm,
        keyring: &row.keyring,
    };
    match (row.status, &row.wrapped) {
        (Status::Active | Status::DecryptOnly, Some(w)) => Ok(KeyEntry::Usable(DecryptKey {
            cipher: Rc::new(Cipher::new(&unwrap_key(&slot, w)?)),
            access: access_stats::cell(row.keyring_id, &row.keyring),
            keyring: Rc::from(row.keyring.as_str()),
        })),
        (status, _) => Ok(KeyEntry::Unusable {
            keyring: row.keyring,
            status,
        }),
    }
}

/// A key's material whatever its status (`None` once destroyed, or for an
/// unknown id), with its kind: for checking which stored values a key still
/// opens before it is retired. Not cached. Must run as the extension owner.
pub fn material(key_id: u32) -> McResult<Option<(KeyKind, Key32)>> {
    let Some(row) = store::key_by_id(key_id)? else {
        return Ok(None);
    };
    let Some(wrapped) = &row.wrapped else {
        return Ok(None);
    };
    let kind = row.kind;
    let slot = Slot {
        key_id,
        kind,
        keyring: &row.keyring,
    };
    Ok(Some((kind, unwrap_key(&slot, wrapped)?)))
}

/// The active key of a GCM keyring.
pub fn active_key(keyring: &str) -> McResult<ActiveKey> {
    check_stale();
    let answer = |e: &RingEntry| match e {
        RingEntry::Gcm(key) => Ok(key.clone()),
        RingEntry::NoActive => Err(McError::WrongState {
            message: format!("keyring \"{keyring}\" has no active key"),
            detail: Some("its active key was revoked".into()),
            hint: Some("create a new active version with manna_crypt.rotate_keyring()".into()),
        }),
        RingEntry::Fernet(_) => Err(McError::BadArgument {
            message: format!("keyring \"{keyring}\" is a Fernet keyring and cannot encrypt"),
            detail: None,
            hint: Some(
                "encrypt under an AES-GCM keyring; Fernet keyrings exist to read legacy tokens"
                    .into(),
            ),
        }),
        RingEntry::Missing => Err(McError::unknown_keyring(keyring)),
    };
    ring_lookup(keyring, answer)
}

fn ring_lookup<T>(keyring: &str, answer: impl Fn(&RingEntry) -> McResult<T>) -> McResult<T> {
    if let Some(result) = STATE.with(|s| s.borrow().rings.get(keyring).map(&answer)) {
        return result;
    }
    let entry = run_as(Identity::ExtensionOwner, || load_ring(keyring))?;
    let result = answer(&entry);
    STATE.with(|s| s.borrow_mut().rings.insert(keyring.to_owned(), entry));
    result
}

/// The Fernet keys of a keyring, newest first (tried in that order).
pub fn fernet_keys(keyring: &str) -> McResult<Rc<Vec<(u32, FernetKey)>>> {
    fernet_ring(keyring).map(|(keys, _)| keys)
}

/// As [`fernet_keys`], with the keyring's access statistics cell.
pub fn fernet_ring(keyring: &str) -> McResult<FernetRing> {
    check_stale();
    let answer = |e: &RingEntry| match e {
        RingEntry::Fernet((keys, _)) if keys.is_empty() => Err(McError::WrongState {
            message: format!("Fernet keyring \"{keyring}\" has no usable key"),
            detail: Some("all its keys are revoked or destroyed".into()),
            hint: None,
        }),
        RingEntry::Fernet(ring) => Ok(ring.clone()),
        RingEntry::Missing => Err(McError::unknown_keyring(keyring)),
        RingEntry::Gcm(_) | RingEntry::NoActive => Err(McError::BadArgument {
            message: format!("keyring \"{keyring}\" is an AES-GCM keyring, not a Fernet keyring"),
            detail: None,
            hint: Some("import legacy keys with manna_crypt.import_fernet_key()".into()),
        }),
    };
    ring_lookup(keyring, answer)
}

fn load_ring(keyring: &str) -> McResult<RingEntry> {
    // An invalid name is a bad argument (22023), not an unknown keyring.
    check_keyring_name(keyring)?;
    resolve_data_keys_oid()?;
    let Some(ring) = store::ring_by_name(keyring, Purpose::Data)? else {
        return Ok(RingEntry::Missing);
    };
    let slot = |key_id| Slot {
        key_id,
        kind: if ring.fernet {
            KeyKind::Fernet
        } else {
            KeyKind::Gcm
        },
        keyring,
    };
    if ring.fernet {
        let mut keys = Vec::with_capacity(ring.keys.len());
        for (id, _, wrapped) in &ring.keys {
            keys.push((*id, FernetKey::from_key32(unwrap_key(&slot(*id), wrapped)?)));
        }
        let access = access_stats::cell(ring.keyring_id, keyring);
        return Ok(RingEntry::Fernet((Rc::new(keys), access)));
    }
    let active = ring
        .keys
        .iter()
        .find(|(_, status, _)| *status == Status::Active);
    match active {
        Some((id, _, wrapped)) => Ok(RingEntry::Gcm(ActiveKey {
            key_id: *id,
            cipher: Rc::new(Cipher::new(&unwrap_key(&slot(*id), wrapped)?)),
            tally: tally::tally(Kind::Encryptions, *id),
            access: access_stats::cell(ring.keyring_id, keyring),
        })),
        None => Ok(RingEntry::NoActive),
    }
}

/// A keyring's live blind-index keys (at least one).
pub fn index_ring(keyring: &str) -> McResult<Rc<IndexRing>> {
    check_stale();
    let answer = |e: &IndexEntry| match e {
        IndexEntry::Keys(ring) => Ok(ring.clone()),
        IndexEntry::NoKeys => Err(McError::WrongState {
            message: format!("keyring \"{keyring}\" has no blind-index key"),
            detail: None,
            hint: Some(format!(
                "create one with SELECT manna_crypt.rotate_index_key('{keyring}')"
            )),
        }),
        IndexEntry::Fernet => Err(McError::bad_arg(format!(
            "keyring \"{keyring}\" is a Fernet keyring, which has no blind-index keys"
        ))),
        IndexEntry::Missing => Err(McError::unknown_keyring(keyring)),
    };
    if let Some(result) = STATE.with(|s| s.borrow().index_rings.get(keyring).map(answer)) {
        return result;
    }
    let entry = run_as(Identity::ExtensionOwner, || load_index_ring(keyring))?;
    let result = answer(&entry);
    STATE.with(|s| s.borrow_mut().index_rings.insert(keyring.to_owned(), entry));
    result
}

fn load_index_ring(keyring: &str) -> McResult<IndexEntry> {
    check_keyring_name(keyring)?;
    resolve_data_keys_oid()?;
    let Some(ring) = store::ring_by_name(keyring, Purpose::Index)? else {
        return Ok(IndexEntry::Missing);
    };
    if ring.fernet {
        return Ok(IndexEntry::Fernet);
    }
    if ring.keys.is_empty() {
        return Ok(IndexEntry::NoKeys);
    }
    let mut live = Vec::with_capacity(ring.keys.len());
    for (id, _, wrapped) in &ring.keys {
        let slot = Slot {
            key_id: *id,
            kind: KeyKind::Index,
            keyring,
        };
        live.push(BlindKey::new(&unwrap_key(&slot, wrapped)?, *id, keyring));
    }
    let has_active = ring.keys[0].1 == Status::Active;
    let access = access_stats::cell(ring.keyring_id, keyring);
    Ok(IndexEntry::Keys(Rc::new(IndexRing {
        live,
        has_active,
        access,
    })))
}

/// SQL hook for the statement triggers on the key tables: queue a relcache
/// invalidation that every backend (and standby) processes by its next
/// transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn _invalidate_key_cache() {
    // Runs inside the key tables' triggers, so data_keys exists: an error
    // here is a real failure and must abort the change, never skip the
    // invalidation silently.
    let oid = crate::error::OrRaise::or_raise(store::data_keys_oid());
    // SAFETY: queues a transactional invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oid) };
    // Our own backend drops its cache right away too.
    STALE.store(true, Ordering::Relaxed);
}
