//! Keyring grants: which roles may encrypt, decrypt or compute blind
//! indexes with which keyring (README "Keyring access").
//!
//! [`require`] judges the current user (`GetUserId()`: inside a SECURITY
//! DEFINER function its owner, inside a table-owner switch that owner);
//! [`require_for`] a role captured earlier, before such a switch. A role
//! passes when it is a superuser, has the privileges of
//! `manna_crypt_admin`, or has the privileges of (`has_privs_of_role`, so
//! 16's per-membership INHERIT FALSE counts) a grantee of a matching row of
//! `manna_crypt.keyring_grants`: the keyring itself or `'*'`, every keyring.
//!
//! A row names its grantee by name and by OID, with the system identifier
//! of the cluster that made it. In that cluster the OID decides, so a
//! dropped role's rows match nobody (a later role of the same name gets
//! another OID); in a restored copy on another cluster the name decides
//! (the table's restore trigger re-binds rows to a local role of that name).
//!
//! The hot path is one hash lookup: each backend keeps, per role, the
//! privileges it has on every keyring. The cache is dropped like the key
//! cache (a relcache invalidation of the grants table, queued by its
//! statement trigger) and on every change of a role or a membership
//! (syscache callbacks on pg_authid and pg_auth_members, which touch no
//! manna_crypt table). A change is seen by the next transaction.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{McError, McResult};
use crate::pg::security::{run_as, Identity};
use crate::pg::spi::{self, Mode};

/// What a keyring grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    Encrypt,
    Decrypt,
    BlindIndex,
}

impl Privilege {
    pub const ALL: [Privilege; 3] = [
        Privilege::Encrypt,
        Privilege::Decrypt,
        Privilege::BlindIndex,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Privilege::Encrypt => "encrypt",
            Privilege::Decrypt => "decrypt",
            Privilege::BlindIndex => "blind_index",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Privilege::Encrypt => 1,
            Privilege::Decrypt => 2,
            Privilege::BlindIndex => 4,
        }
    }

    /// A privilege name as `grant_keyring_access` takes it; `all` is every
    /// privilege. 22023 otherwise.
    pub fn parse_list(name: &str) -> McResult<Vec<Privilege>> {
        if name == "all" {
            return Ok(Privilege::ALL.to_vec());
        }
        match Privilege::ALL.iter().find(|p| p.as_str() == name) {
            Some(p) => Ok(vec![*p]),
            None => Err(McError::BadArgument {
                message: format!("unknown keyring privilege \"{name}\""),
                detail: None,
                hint: Some("use encrypt, decrypt, blind_index or all".into()),
            }),
        }
    }
}

/// The keyring name of a grant on every keyring, present and future.
pub const EVERY_KEYRING: &str = "*";

const GRANTS_OID: &str = "SELECT pg_catalog.to_regclass('manna_crypt.keyring_grants')::oid";

const GRANT_ROWS: &str = "\
    SELECT keyring, privilege, grantee_name::text, grantee_oid, cluster_id \
      FROM manna_crypt.keyring_grants";

/// One role's privileges, as loaded.
#[derive(Default)]
struct Access {
    /// Superuser, a member of manna_crypt_admin, or a 0.1.0 catalog (no
    /// grants table yet: 0.1.0's rule, EXECUTE alone, still applies).
    all: bool,
    /// Privileges on every keyring (rows of keyring '*').
    every: u8,
    rings: HashMap<String, u8>,
}

impl Access {
    fn bits(&self, keyring: &str) -> u8 {
        if self.all {
            return u8::MAX;
        }
        self.every | self.rings.get(keyring).copied().unwrap_or(0)
    }
}

/// The last answer: a query uses one keyring for every row, so the hot path
/// compares a role id and a short name instead of hashing both.
#[derive(Default)]
struct Last {
    valid: bool,
    role: u32,
    keyring: String,
    bits: u8,
}

thread_local! {
    static ROLES: RefCell<HashMap<u32, Rc<Access>>> = RefCell::new(HashMap::new());
    static LAST: RefCell<Last> = RefCell::new(Last::default());
}

/// Set by the callbacks; checked (and cleared) on every lookup.
static STALE: AtomicBool = AtomicBool::new(false);
/// Turned into [`STALE`] at transaction end: rows reloaded inside the
/// transaction that processed an invalidation were read under its snapshot,
/// which may predate the change (see `keys::cache`).
static STALE_AT_XACT_END: AtomicBool = AtomicBool::new(false);
/// OID of manna_crypt.keyring_grants, 0 until resolved (or while missing).
static TABLE_OID: AtomicU32 = AtomicU32::new(0);
static REGISTERED: AtomicBool = AtomicBool::new(false);

fn mark_stale() {
    STALE.store(true, Ordering::Relaxed);
    STALE_AT_XACT_END.store(true, Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = TABLE_OID.load(Ordering::Relaxed);
    if relid == pg_sys::InvalidOid || ours == 0 || relid.to_u32() == ours {
        mark_stale();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_syscache(_arg: pg_sys::Datum, _cacheid: i32, _hash: u32) {
    mark_stale();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if crate::pg::xact::is_end(event) && STALE_AT_XACT_END.swap(false, Ordering::Relaxed) {
        STALE.store(true, Ordering::Relaxed);
    }
}

/// Registers the invalidation callbacks; called from `_PG_init`.
pub fn register_callbacks() {
    if REGISTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    use pg_sys::SysCacheIdentifier::{AUTHMEMMEMROLE, AUTHMEMROLEMEM, AUTHOID};
    // SAFETY: function pointers that live as long as the library, which is
    // never unloaded.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0));
        for cache in [AUTHOID, AUTHMEMROLEMEM, AUTHMEMMEMROLE] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(on_syscache),
                pg_sys::Datum::from(0),
            );
        }
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
    }
}

/// The current user, as privileges are judged (`GetUserId()`).
pub fn current_user() -> pg_sys::Oid {
    // SAFETY: no preconditions.
    unsafe { pg_sys::GetUserId() }
}

/// Refuses (42501) unless the current user may use `keyring` for `privilege`.
pub fn require(keyring: &str, privilege: Privilege) -> McResult<()> {
    require_for(current_user(), keyring, privilege)
}

/// Refuses (42501) unless `role` may use `keyring` for `privilege`.
pub fn require_for(role: pg_sys::Oid, keyring: &str, privilege: Privilege) -> McResult<()> {
    // A plain load first: a swap is a locked instruction on every call.
    if STALE.load(Ordering::Relaxed) {
        STALE.store(false, Ordering::Relaxed);
        clear();
    }
    let bits = LAST.with(|l| {
        let l = l.borrow();
        (l.valid && l.role == role.to_u32() && l.keyring == keyring).then_some(l.bits)
    });
    let bits = match bits {
        Some(bits) => bits,
        None => bits_of(role, keyring)?,
    };
    if bits & privilege.bit() != 0 {
        Ok(())
    } else {
        Err(refusal(role, keyring, privilege))
    }
}

/// The privileges `role` has on `keyring`, from the per-role map (loaded
/// on a miss), remembered as the last answer.
fn bits_of(role: pg_sys::Oid, keyring: &str) -> McResult<u8> {
    let cached = ROLES.with(|r| r.borrow().get(&role.to_u32()).map(|a| a.bits(keyring)));
    let bits = match cached {
        Some(bits) => bits,
        None => {
            let access = Rc::new(load(role)?);
            let bits = access.bits(keyring);
            ROLES.with(|r| r.borrow_mut().insert(role.to_u32(), access));
            bits
        }
    };
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        l.role = role.to_u32();
        l.keyring.clear();
        l.keyring.push_str(keyring);
        l.bits = bits;
        l.valid = true;
    });
    Ok(bits)
}

fn refusal(role: pg_sys::Oid, keyring: &str, privilege: Privilege) -> McError {
    let name = role_name(role);
    let p = privilege.as_str();
    let literal = name.replace('\'', "''");
    McError::PermissionDenied {
        message: format!("role \"{name}\" has no {p} privilege on keyring \"{keyring}\""),
        hint: format!(
            "an administrator can grant it: SELECT manna_crypt.grant_keyring_access('{keyring}', \
             '{literal}', '{p}')"
        ),
    }
}

/// A role's name, `?` for a role that no longer exists.
pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: with noerr = true this returns NULL or a palloc'd C string.
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, true);
        if name.is_null() {
            "?".into()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// Drops every cached answer now (the next lookup reloads).
pub fn clear() {
    LAST.with(|l| l.borrow_mut().valid = false);
    ROLES.with(|r| r.borrow_mut().clear());
    TABLE_OID.store(0, Ordering::Relaxed);
}

/// This cluster's system identifier, as `pg_control_system()` shows it.
pub fn cluster_id() -> i64 {
    // SAFETY: reads a value fixed at server start.
    unsafe { pg_sys::GetSystemIdentifier() as i64 }
}

fn role_oid(name: &str) -> pg_sys::Oid {
    let Ok(c) = CString::new(name) else {
        return pg_sys::InvalidOid;
    };
    // SAFETY: a NUL-terminated name; missing_ok = true never raises.
    unsafe { pg_sys::get_role_oid(c.as_ptr(), true) }
}

fn has_privs_of(member: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookups; an OID of no role is simply no match.
    role != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(member, role) }
}

/// Whether `role` is an administrator: a superuser or has the privileges of
/// manna_crypt_admin (grants pass for both, as before grants existed).
pub fn is_admin(role: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup.
    let superuser = unsafe { pg_sys::superuser_arg(role) };
    superuser || has_privs_of(role, role_oid("manna_crypt_admin"))
}

struct Row {
    keyring: String,
    privilege: String,
    grantee_name: String,
    grantee_oid: pg_sys::Oid,
    cluster_id: i64,
}

/// The grant rows, or `None` on a 0.1.0 catalog (no grants table yet).
fn rows() -> McResult<Option<Vec<Row>>> {
    let Some(oid) = spi::one::<pg_sys::Oid>(Mode::Read, GRANTS_OID, &[])? else {
        return Ok(None);
    };
    let rows = spi::rows(Mode::Read, GRANT_ROWS, &[], |r| {
        Ok(Row {
            keyring: r.req(1)?,
            privilege: r.req(2)?,
            grantee_name: r.req(3)?,
            grantee_oid: r.req(4)?,
            cluster_id: r.req(5)?,
        })
    })?;
    TABLE_OID.store(oid.to_u32(), Ordering::Relaxed);
    Ok(Some(rows))
}

/// The role a row grants to: by OID in the cluster that made it, by name
/// in a restored copy elsewhere.
fn grantee(row: &Row, here: i64) -> pg_sys::Oid {
    if row.cluster_id == here {
        row.grantee_oid
    } else {
        role_oid(&row.grantee_name)
    }
}

fn load(role: pg_sys::Oid) -> McResult<Access> {
    if is_admin(role) {
        return Ok(Access {
            all: true,
            ..Access::default()
        });
    }
    let Some(rows) = run_as(Identity::ExtensionOwner, rows)? else {
        return Ok(Access {
            all: true,
            ..Access::default()
        });
    };
    let here = cluster_id();
    let mut access = Access::default();
    for row in rows {
        let Some(p) = Privilege::ALL.iter().find(|p| p.as_str() == row.privilege) else {
            continue;
        };
        if !has_privs_of(role, grantee(&row, here)) {
            continue;
        }
        if row.keyring == EVERY_KEYRING {
            access.every |= p.bit();
        } else {
            *access.rings.entry(row.keyring).or_default() |= p.bit();
        }
    }
    Ok(access)
}

/// SQL hook for the grants table's statement trigger: queue a relcache
/// invalidation every backend processes by its next transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn _invalidate_grants_cache() {
    let oid = crate::error::OrRaise::or_raise(
        spi::one::<pg_sys::Oid>(Mode::Read, GRANTS_OID, &[])
            .and_then(|o| o.ok_or_else(|| McError::Internal("keyring_grants is missing".into()))),
    );
    // SAFETY: queues a transactional invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oid) };
    // Our own backend drops its cache right away too.
    STALE.store(true, Ordering::Relaxed);
}
