//! `info()`: what an administrator needs to see at a glance — version, root
//! key source and fingerprint (never the key), keyrings and their active
//! versions, key counts by status, registered columns, CPU AES support.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use super::rootkey::{self, Which};
use super::usage;
use crate::error::{McError, McResult, OrRaise};
use crate::pg::security::{run_as, Identity};
use crate::pg::spi::{self, Mode};

const KEYRINGS: &str = "\
    SELECT coalesce(jsonb_agg(jsonb_build_object( \
             'name', r.name, 'kind', r.kind, \
             'active_key_id', a.key_id, 'active_version', a.version, \
             'versions', (SELECT count(*) FROM manna_crypt.data_keys k \
                           WHERE k.keyring_id = r.keyring_id), \
             'rotation_period', r.rotation_period::text, \
             'rotation_due', r.rotation_period IS NOT NULL \
                 AND coalesce(r.rotated_at, r.created_at) + r.rotation_period <= now() \
           ) ORDER BY r.name), '[]') \
      FROM manna_crypt.keyrings r \
      LEFT JOIN manna_crypt.data_keys a ON a.keyring_id = r.keyring_id AND a.status = 'active'";

const KEYS_BY_STATUS: &str = "\
    SELECT jsonb_build_object( \
             'active', count(*) FILTER (WHERE status = 'active'), \
             'decrypt_only', count(*) FILTER (WHERE status = 'decrypt_only'), \
             'revoked', count(*) FILTER (WHERE status = 'revoked'), \
             'destroyed', count(*) FILTER (WHERE status = 'destroyed')) \
      FROM manna_crypt.data_keys";

fn json_of(sql: &str) -> McResult<Value> {
    Ok(spi::one::<JsonB>(Mode::Read, sql, &[])?.map_or(Value::Null, |j| j.0))
}

/// The root key's state: never an error, so `info()` works while it is broken.
fn root_info() -> Value {
    let current = match rootkey::current() {
        Ok(k) => k,
        Err(e) => return json!({ "configured": false, "error": e.message() }),
    };
    let previous = rootkey::get(Which::Previous).ok().flatten();
    let effective = run_as(Identity::ExtensionOwner, rootkey::effective_root);
    json!({
        "configured": true,
        "source": current.source,
        "fingerprint": current.fingerprint,
        "previous_configured": previous.is_some(),
        "matches_stored_keys": matches!(&effective, Ok(e) if e.fingerprint == current.fingerprint),
        "rotation_pending": matches!(&effective, Ok(e) if e.fingerprint != current.fingerprint),
        "error": effective.err().map(McError::message),
    })
}

/// Version, root key source and fingerprint (never the key), keyrings and
/// their active versions, key counts by status, and CPU AES support.
#[pg_extern(stable, parallel_unsafe)]
fn info() -> JsonB {
    let (keyrings, by_status, registered) = run_as(Identity::ExtensionOwner, || {
        Ok((
            json_of(KEYRINGS)?,
            json_of(KEYS_BY_STATUS)?,
            usage::registered_count()?,
        ))
    })
    .or_raise();
    JsonB(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "root_key": root_info(),
        "keyrings": keyrings,
        "keys_by_status": by_status,
        "registered_columns": registered,
        "cpu": cpu_features(),
    }))
}

fn cpu_features() -> Value {
    #[cfg(target_arch = "x86_64")]
    {
        json!({
            "arch": "x86_64",
            "aes": std::arch::is_x86_feature_detected!("aes"),
            "pclmulqdq": std::arch::is_x86_feature_detected!("pclmulqdq"),
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        json!({
            "arch": "aarch64",
            "aes": std::arch::is_aarch64_feature_detected!("aes"),
            "pmull": std::arch::is_aarch64_feature_detected!("pmull"),
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        json!({ "arch": std::env::consts::ARCH, "aes": false })
    }
}
