//! `grant_keyring_access` and `revoke_keyring_access`: the rows of
//! `manna_crypt.keyring_grants` that [`super::grants`] judges by.
//!
//! Only administrators (superusers and roles with the privileges of
//! `manna_crypt_admin`) change grants, whoever else was given EXECUTE.
//! Every change is audited in `manna_crypt.audit_log` in the same
//! transaction; granting what is granted, or revoking what is not, changes
//! nothing and says so in a NOTICE, as GRANT and REVOKE do.
//!
//! Each call first tidies the table (see [`tidy`]): rows of dropped roles
//! go, renamed roles' names are brought up to date, and rows restored from
//! another cluster are bound to the local role of their name.

use manna_crypt_core::names::check_keyring_name;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;

use super::grants::{self, Privilege, EVERY_KEYRING};
use super::lifecycle::key_change;
use super::store;
use crate::error::{not_null, McError, McResult, OrRaise};
use crate::pg::datum::Regrole;
use crate::pg::report::notice;
use crate::pg::spi::{self, Mode};

const KEYRING_EXISTS: &str = "SELECT true FROM manna_crypt.keyrings WHERE name = $1";

/// Rows of roles that no longer exist, made in this cluster.
const PRUNE_DROPPED: &str = "\
    DELETE FROM manna_crypt.keyring_grants g \
     WHERE g.cluster_id = $1 \
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid = g.grantee_oid)";

/// Names of renamed roles (a restore elsewhere matches by name).
const REFRESH_NAMES: &str = "\
    UPDATE manna_crypt.keyring_grants g SET grantee_name = r.rolname \
      FROM pg_catalog.pg_roles r \
     WHERE g.cluster_id = $1 AND r.oid = g.grantee_oid AND g.grantee_name <> r.rolname";

/// Restored rows that a local row already covers.
const DROP_RESTORED_DUPLICATES: &str = "\
    DELETE FROM manna_crypt.keyring_grants g \
     USING pg_catalog.pg_roles r, manna_crypt.keyring_grants d \
     WHERE g.cluster_id <> $1 AND r.rolname = g.grantee_name \
       AND d.cluster_id = $1 AND d.grantee_oid = r.oid \
       AND d.keyring = g.keyring AND d.privilege = g.privilege";

/// Restored rows, bound to the local role of their name.
const BIND_RESTORED: &str = "\
    UPDATE manna_crypt.keyring_grants g SET grantee_oid = r.oid, cluster_id = $1 \
      FROM pg_catalog.pg_roles r \
     WHERE g.cluster_id <> $1 AND r.rolname = g.grantee_name";

const INSERT_GRANT: &str = "\
    INSERT INTO manna_crypt.keyring_grants \
           (keyring, privilege, grantee_name, grantee_oid, cluster_id, granted_by) \
    VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (keyring, privilege, grantee_oid, cluster_id) DO NOTHING";

const DELETE_GRANT: &str = "\
    DELETE FROM manna_crypt.keyring_grants \
     WHERE keyring = $1 AND privilege = $2 AND grantee_oid = $3 AND cluster_id = $4";

/// Brings the table up to date with the roles of this cluster.
fn tidy(here: i64) -> McResult<()> {
    for sql in [
        PRUNE_DROPPED,
        REFRESH_NAMES,
        DROP_RESTORED_DUPLICATES,
        BIND_RESTORED,
    ] {
        spi::run(sql, &[here.into()])?;
    }
    Ok(())
}

/// The keyring argument: an existing keyring's name or `'*'`.
fn check_keyring(keyring: &str) -> McResult<()> {
    if keyring == EVERY_KEYRING {
        return Ok(());
    }
    check_keyring_name(keyring)?;
    match spi::one::<bool>(Mode::Read, KEYRING_EXISTS, &[keyring.into()])? {
        Some(_) => Ok(()),
        None => Err(McError::unknown_keyring(keyring)),
    }
}

fn require_admin(what: &str) -> McResult<()> {
    if grants::is_admin(grants::current_user()) {
        return Ok(());
    }
    Err(McError::PermissionDenied {
        message: format!("only administrators can {what} keyring access"),
        hint: "a superuser or a member of manna_crypt_admin can".into(),
    })
}

struct Change<'a> {
    keyring: &'a str,
    grantee: pg_sys::Oid,
    privileges: Vec<Privilege>,
    grant: bool,
}

fn change(c: Change<'_>) {
    let what = if c.grant { "grant" } else { "revoke" };
    require_admin(what).or_raise();
    let fname = if c.grant {
        c"manna_crypt.grant_keyring_access()"
    } else {
        c"manna_crypt.revoke_keyring_access()"
    };
    let name = grants::role_name(c.grantee);
    key_change(fname, |role| {
        check_keyring(c.keyring)?;
        let here = grants::cluster_id();
        tidy(here)?;
        for p in &c.privileges {
            let p = p.as_str();
            let changed = if c.grant {
                let args = [
                    c.keyring.into(),
                    p.into(),
                    name.as_str().into(),
                    c.grantee.into(),
                    here.into(),
                    role.into(),
                ];
                spi::count(INSERT_GRANT, &args)?
            } else {
                let args = [c.keyring.into(), p.into(), c.grantee.into(), here.into()];
                spi::count(DELETE_GRANT, &args)?
            };
            if changed == 0 {
                let state = if c.grant { "already has" } else { "has no" };
                notice(format!(
                    "role \"{name}\" {state} {p} privilege on keyring \"{}\"",
                    c.keyring
                ));
                continue;
            }
            let event = format!("{what}_keyring_access");
            let detail = json!({ "grantee": name, "privilege": p });
            store::audit(role, &event, Some(c.keyring), None, detail)?;
        }
        Ok(())
    })
}

fn args<'a>(
    keyring: Option<&'a str>,
    grantee: Option<Regrole>,
    privilege: Option<&str>,
) -> Change<'a> {
    let keyring = not_null(keyring, "keyring");
    let grantee = not_null(grantee, "grantee").0;
    let privileges = Privilege::parse_list(not_null(privilege, "privilege")).or_raise();
    Change {
        keyring,
        grantee,
        privileges,
        grant: true,
    }
}

/// Grants `privilege` (`encrypt`, `decrypt`, `blind_index` or `all`) on
/// `keyring` (`'*'`: every keyring, present and future) to `grantee` and,
/// through membership, to the roles that have its privileges.
#[pg_extern(volatile, parallel_unsafe)]
fn grant_keyring_access(keyring: Option<&str>, grantee: Option<Regrole>, privilege: Option<&str>) {
    change(args(keyring, grantee, privilege));
}

/// Revokes what `grant_keyring_access` granted (exactly that row: a grant
/// on `'*'` is revoked on `'*'`, a grant to a group from the group).
#[pg_extern(volatile, parallel_unsafe)]
fn revoke_keyring_access(keyring: Option<&str>, grantee: Option<Regrole>, privilege: Option<&str>) {
    change(Change {
        grant: false,
        ..args(keyring, grantee, privilege)
    });
}
