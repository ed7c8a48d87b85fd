//! Unwrapped data keys, per backend.
//!
//! The hot path — one encrypt or decrypt per row — is a hash lookup here and
//! nothing else: no SPI, no catalog access, no privilege switch. A miss reads
//! the key tables once (as the extension owner), unwraps the data key under
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
use manna_crypt_core::fernet::FernetKey;
use manna_crypt_core::keywrap;
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::owner;
use super::rootkey::{self, RootKey, Which};
use crate::error::{McError, McResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Active,
    DecryptOnly,
    Revoked,
    Destroyed,
}

impl Status {
    pub fn parse(s: &str) -> Status {
        match s {
            "active" => Status::Active,
            "decrypt_only" => Status::DecryptOnly,
            "revoked" => Status::Revoked,
            _ => Status::Destroyed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::DecryptOnly => "decrypt_only",
            Status::Revoked => "revoked",
            Status::Destroyed => "destroyed",
        }
    }
}

enum KeyEntry {
    Usable { cipher: Rc<Cipher> },
    Unusable { keyring: String, status: Status },
    Fernet { keyring: String },
    Missing,
}

enum RingEntry {
    Gcm { key_id: u32, cipher: Rc<Cipher> },
    NoActive,
    Fernet(Rc<Vec<(u32, FernetKey)>>),
    Missing,
}

#[derive(Default)]
struct State {
    by_id: HashMap<u32, KeyEntry>,
    rings: HashMap<String, RingEntry>,
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
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    ) && STALE_AT_XACT_END.swap(false, Ordering::Relaxed)
    {
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
    owner::forget();
}

fn check_stale() {
    if STALE.swap(false, Ordering::Relaxed) {
        clear();
    }
}

fn resolve_data_keys_oid() -> McResult<()> {
    if DATA_KEYS_OID.load(Ordering::Relaxed) == 0 {
        let oid = owner::read_one::<pg_sys::Oid>(
            "SELECT 'manna_crypt.data_keys'::pg_catalog.regclass::pg_catalog.oid",
        )?
        .ok_or_else(|| McError::Internal("manna_crypt.data_keys is missing".into()))?;
        DATA_KEYS_OID.store(oid.to_u32(), Ordering::Relaxed);
    }
    Ok(())
}

/// The stored check value and the fingerprint of the root key it belongs to.
fn stored_check() -> McResult<Option<(Vec<u8>, String)>> {
    Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT check_value, fingerprint FROM manna_crypt.root_key_check",
            None,
            &[],
        )?;
        Ok(match rows.next() {
            Some(row) => Some((
                row.get::<Vec<u8>>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
            )),
            None => None,
        })
    })
}

/// The root key that opens the stored data keys: the current one if it
/// matches the stored check value, else the previous one if that matches
/// (a root-key rotation in progress), else F0000. With no check value stored
/// yet (no keys created), the current root key. Must run as owner.
///
/// Decided afresh on every cache miss (a query and an HMAC; misses are
/// rare), so a reloaded configuration or a finished `rewrap_keys()` is never
/// judged against a stale choice.
pub fn effective_root() -> McResult<Rc<RootKey>> {
    let current = rootkey::current()?;
    let chosen = match stored_check()? {
        None => current,
        Some((check, _)) if keywrap::matches_check_value(&current.key, &check) => current,
        Some((check, stored_fp)) => match rootkey::get(Which::Previous)? {
            Some(prev) if keywrap::matches_check_value(&prev.key, &check) => prev,
            _ => {
                return Err(McError::RootKeyMismatch {
                    detail: format!(
                        "the configured root key has fingerprint {}, but the data keys in this database are wrapped under the root key with fingerprint {}",
                        current.fingerprint, stored_fp
                    ),
                })
            }
        },
    };
    Ok(chosen)
}

fn unwrap_key(key_id: u32, wrapped: &[u8]) -> McResult<manna_crypt_core::secret::Key32> {
    let root = effective_root()?;
    keywrap::unwrap(&root.key, key_id, wrapped).map_err(|_| McError::Unauthenticated {
        detail: format!("the stored data key {key_id} does not unwrap under the root key: the key table is corrupt or was altered"),
    })
}

fn unusable_error(key_id: u32, keyring: &str, status: Status) -> McError {
    McError::WrongState {
        message: format!("key {key_id} of keyring \"{keyring}\" is {}", status.as_str()),
        detail: Some("revoked and destroyed keys cannot decrypt".into()),
        hint: match status {
            Status::Revoked => Some("if the revocation was a mistake, an administrator can call manna_crypt.reinstate_key()".into()),
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
        McError::UnknownObject {
            message: format!("key id {key_id} does not exist"),
            hint: Some("see the manna_crypt.keys view".into()),
        }
    }
}

fn unknown_keyring(name: &str) -> McError {
    McError::UnknownObject {
        message: format!("keyring \"{name}\" does not exist"),
        hint: Some("create it with manna_crypt.create_keyring()".into()),
    }
}

/// The cipher for decrypting a value sealed under `key_id`.
pub fn key_for_decrypt(key_id: u32) -> McResult<Rc<Cipher>> {
    check_stale();
    let answer = |e: &KeyEntry| match e {
        KeyEntry::Usable { cipher } => Ok(cipher.clone()),
        KeyEntry::Unusable { keyring, status } => Err(unusable_error(key_id, keyring, *status)),
        KeyEntry::Fernet { keyring } => Err(fernet_key_id(key_id, keyring)),
        KeyEntry::Missing => Err(unknown_key(key_id)),
    };
    if let Some(result) = STATE.with(|s| s.borrow().by_id.get(&key_id).map(answer)) {
        return result;
    }
    let entry = owner::as_owner(|| load_key(key_id))?;
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
    let row = Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT r.name, r.kind, k.status, k.wrapped FROM manna_crypt.data_keys k \
             JOIN manna_crypt.keyrings r USING (keyring_id) WHERE k.key_id = $1",
            None,
            &[(key_id as i64).into()],
        )?;
        Ok::<_, McError>(match rows.next() {
            Some(r) => Some((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
                r.get::<Vec<u8>>(4)?,
            )),
            None => None,
        })
    })?;
    let Some((keyring, kind, status, wrapped)) = row else {
        return Ok(KeyEntry::Missing);
    };
    let status = Status::parse(&status);
    if kind == "fernet" {
        return Ok(KeyEntry::Fernet { keyring });
    }
    match (status, wrapped) {
        (Status::Active | Status::DecryptOnly, Some(w)) => Ok(KeyEntry::Usable {
            cipher: Rc::new(Cipher::new(&unwrap_key(key_id, &w)?)),
        }),
        (status, _) => Ok(KeyEntry::Unusable { keyring, status }),
    }
}

/// The active key of a GCM keyring: its id and cipher.
pub fn active_key(keyring: &str) -> McResult<(u32, Rc<Cipher>)> {
    check_stale();
    let answer = |e: &RingEntry| match e {
        RingEntry::Gcm { key_id, cipher } => Ok((*key_id, cipher.clone())),
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
        RingEntry::Missing => Err(unknown_keyring(keyring)),
    };
    ring_lookup(keyring, answer)
}

fn ring_lookup<T>(keyring: &str, answer: impl Fn(&RingEntry) -> McResult<T>) -> McResult<T> {
    if let Some(result) = STATE.with(|s| s.borrow().rings.get(keyring).map(&answer)) {
        return result;
    }
    let entry = owner::as_owner(|| load_ring(keyring))?;
    let result = answer(&entry);
    STATE.with(|s| s.borrow_mut().rings.insert(keyring.to_owned(), entry));
    result
}

/// The Fernet keys of a keyring, newest first (tried in that order).
pub fn fernet_keys(keyring: &str) -> McResult<Rc<Vec<(u32, FernetKey)>>> {
    check_stale();
    let answer = |e: &RingEntry| match e {
        RingEntry::Fernet(keys) if keys.is_empty() => Err(McError::WrongState {
            message: format!("Fernet keyring \"{keyring}\" has no usable key"),
            detail: Some("all its keys are revoked or destroyed".into()),
            hint: None,
        }),
        RingEntry::Fernet(keys) => Ok(keys.clone()),
        RingEntry::Missing => Err(unknown_keyring(keyring)),
        RingEntry::Gcm { .. } | RingEntry::NoActive => Err(McError::BadArgument {
            message: format!("keyring \"{keyring}\" is an AES-GCM keyring, not a Fernet keyring"),
            detail: None,
            hint: Some("import legacy keys with manna_crypt.import_fernet_key()".into()),
        }),
    };
    ring_lookup(keyring, answer)
}

/// kind, key id, status, wrapped key.
type RingRow = (String, Option<i64>, Option<String>, Option<Vec<u8>>);

fn load_ring(keyring: &str) -> McResult<RingEntry> {
    // An invalid name is a bad argument (22023), not an unknown keyring.
    super::lifecycle::check_name(keyring)?;
    resolve_data_keys_oid()?;
    let rows: Vec<RingRow> = Spi::connect(|client| {
        let rows = client.select(
            "SELECT r.kind, k.key_id::int8, k.status, k.wrapped FROM manna_crypt.keyrings r \
             LEFT JOIN manna_crypt.data_keys k ON k.keyring_id = r.keyring_id \
                  AND k.status IN ('active', 'decrypt_only') \
             WHERE r.name = $1 ORDER BY k.version DESC",
            None,
            &[keyring.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            out.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<i64>(2)?,
                r.get::<String>(3)?,
                r.get::<Vec<u8>>(4)?,
            ));
        }
        Ok::<_, McError>(out)
    })?;
    let Some(first) = rows.first() else {
        return Ok(RingEntry::Missing);
    };
    if first.0 == "fernet" {
        let mut keys = Vec::new();
        for (_, id, _, wrapped) in &rows {
            if let (Some(id), Some(w)) = (id, wrapped) {
                let id = *id as u32;
                keys.push((id, FernetKey::from_key32(unwrap_key(id, w)?)));
            }
        }
        return Ok(RingEntry::Fernet(Rc::new(keys)));
    }
    for (_, id, status, wrapped) in &rows {
        if let (Some(id), Some("active"), Some(w)) = (id, status.as_deref(), wrapped) {
            let id = *id as u32;
            let cipher = Rc::new(Cipher::new(&unwrap_key(id, w)?));
            return Ok(RingEntry::Gcm { key_id: id, cipher });
        }
    }
    Ok(RingEntry::NoActive)
}

/// SQL hook for the statement triggers on the key tables: queue a relcache
/// invalidation that every backend (and standby) processes by its next
/// transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn _invalidate_key_cache() {
    let oid = Spi::get_one::<pg_sys::Oid>(
        "SELECT 'manna_crypt.data_keys'::pg_catalog.regclass::pg_catalog.oid",
    )
    .ok()
    .flatten();
    if let Some(oid) = oid {
        // SAFETY: queues a transactional invalidation message for an existing relation.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oid) };
    }
    // Our own backend drops its cache right away too.
    STALE.store(true, Ordering::Relaxed);
}
