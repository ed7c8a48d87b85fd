//! `info()`: what an administrator needs to see at a glance — version, root
//! key source and fingerprint (never the key), keyrings and their active
//! versions, key counts by status, registered columns, CPU AES support; and
//! `root_key_status()`, every database's root key (see [`super::rootstatus`]).

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use super::rootkey::{self, Which};
use super::rootshared::{self, Status};
use super::rootstatus;
use super::usage;
use super::{budget, counters, store};
use crate::error::{McError, McResult, OrRaise};
use crate::pg::security::{run_as, Identity};
use crate::pg::spi::{self, Mode};
use pgrx::pg_sys;

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

/// The root key's state: never an error, so `info()` works while it is
/// broken. `state` is "loaded", "failing" (with the attempts, since when,
/// the next attempt and the last error), "loading", "not configured" or
/// "not preloaded".
fn root_info() -> Value {
    if let Some(e) = rootshared::unavailable() {
        return json!({ "state": "not preloaded", "configured": false, "error": e.message() });
    }
    let current = match rootkey::current() {
        Ok(k) => k,
        Err(e) => return root_failure(e),
    };
    let previous = rootkey::get(Which::Previous).ok().flatten();
    let effective = run_as(Identity::ExtensionOwner, rootkey::effective_root);
    let loaded_at = match rootkey::shared_status(Which::Current) {
        Ok(Some(Status::Loaded { loaded_at })) => Some(rootshared::timestamp_text(loaded_at)),
        _ => None,
    };
    json!({
        "state": "loaded",
        "configured": true,
        "loaded": true,
        "source": current.source,
        "fingerprint": current.fingerprint,
        "loaded_at": loaded_at,
        "previous_configured": previous.is_some(),
        "matches_stored_keys": matches!(&effective, Ok(e) if e.fingerprint == current.fingerprint),
        "rotation_pending": matches!(&effective, Ok(e) if e.fingerprint != current.fingerprint),
        "error": effective.err().map(McError::message),
    })
}

/// `info()`'s root key when it cannot be had: not configured, or failing.
fn root_failure(e: McError) -> Value {
    match rootkey::shared_status(Which::Current) {
        Ok(None) => json!({ "state": "not configured", "configured": false, "error": e.message() }),
        Ok(Some(Status::Failing {
            attempts,
            since,
            next,
            error,
        })) => json!({
            "state": "failing",
            "configured": true,
            "loaded": false,
            "attempts": attempts,
            "failing_since": rootshared::timestamp_text(since),
            "next_attempt": rootshared::timestamp_text(next),
            "last_error": error,
            "error": e.message(),
        }),
        Ok(Some(Status::Loading { pid })) => json!({
            "state": "loading", "configured": true, "loaded": false, "loader_pid": pid,
            "error": e.message(),
        }),
        _ => json!({ "state": "failing", "configured": true, "loaded": false,
                     "error": e.message() }),
    }
}

/// For an application's health check (EXECUTE: `manna_crypt_user`):
/// whether keyring encryption works here — the library version and the
/// root key's state, nothing about keyrings or keys.
#[pg_extern(volatile, parallel_unsafe)]
fn health() -> JsonB {
    let root = root_info();
    let state = root["state"].as_str().unwrap_or("unknown").to_owned();
    let ok = state == "loaded" && root["matches_stored_keys"] != json!(false);
    let mut out = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ok": ok,
        "root_key_state": state,
    });
    if !ok {
        out["error"] = root["error"].clone();
    }
    JsonB(out)
}

/// Loads the root key (and the previous one, when set) afresh from its
/// source for the whole server, even while a failing command is in
/// back-off; returns the current root key's fingerprint. On failure the
/// key already loaded keeps serving.
#[pg_extern(volatile, parallel_unsafe)]
fn reload_root_key() -> String {
    // Not configured: current()'s error says which settings to set.
    let current = rootkey::reload(Which::Current)
        .and_then(|k| k.map_or_else(rootkey::current, Ok))
        .or_raise();
    rootkey::reload(Which::Previous).or_raise();
    current.fingerprint.clone()
}

/// Version, root key source and fingerprint (never the key), keyrings and
/// their active versions, key counts by status, and CPU AES support.
#[pg_extern(stable, parallel_unsafe)]
fn info() -> JsonB {
    let (keyrings, by_status, registered, active) = run_as(Identity::ExtensionOwner, || {
        Ok((
            json_of(KEYRINGS)?,
            json_of(KEYS_BY_STATUS)?,
            usage::registered_count()?,
            store::active_gcm_keys()?,
        ))
    })
    .or_raise();
    JsonB(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "root_key": root_info(),
        "keyrings": keyrings,
        "keys_by_status": by_status,
        "registered_columns": registered,
        "nonce_budget": budget_info(&active),
        "cpu": cpu_features(),
    }))
}

/// The usage counters at a glance: never an error, like [`root_info`].
fn budget_info(active: &[(String, i32)]) -> Value {
    let b = budget::current();
    let settings = json!({
        "limit_log2": budget::BUDGET_LOG2.get(),
        "warn_fraction": budget::WARN_FRACTION.get(),
        "counting": counters::available(),
    });
    let (counts, past) = match budget::counts().and_then(|c| Ok((c, budget::past_warning(active)?)))
    {
        Ok(v) => v,
        Err(e) => return json!({ "settings": settings, "error": e.message() }),
    };
    let highest = active
        .iter()
        .map(|(_, id)| b.fraction(counts.get(&(*id as u32)).copied().unwrap_or(0)))
        .fold(0.0, f64::max);
    json!({
        "settings": settings,
        "counted_keys": counts.values().filter(|n| **n > 0).count(),
        "encryptions": counts.values().fold(0u64, |a, n| a.saturating_add(*n)),
        "highest_active_fraction": highest,
        "keyrings_past_warning": past.into_iter().map(|(ring, _)| ring).collect::<Vec<_>>(),
    })
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

const DATABASES: &str = "\
    SELECT d.oid, d.datname::pg_catalog.text FROM pg_catalog.pg_database d ORDER BY 2";

/// Every database of the cluster with the root key its data keys are
/// wrapped under, as far as the notes in the data directory tell.
#[pg_extern(volatile, parallel_unsafe)]
fn root_key_status() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(wrapped_under, Option<String>),
        name!(status, String),
    ),
> {
    let current = rootkey::current().ok().map(|k| k.fingerprint.clone());
    let previous = rootkey::get(Which::Previous)
        .ok()
        .flatten()
        .map(|k| k.fingerprint.clone());
    let databases = spi::rows(Mode::Read, DATABASES, &[], |r| {
        Ok((r.req::<pg_sys::Oid>(1)?.to_u32(), r.req::<String>(2)?))
    })
    .or_raise();
    let notes = rootstatus::database_notes();
    // Notes of dropped databases would refuse retirement for good.
    for (oid, _) in &notes {
        if !databases.iter().any(|(d, _)| d == oid) {
            let _ = std::fs::remove_file(rootstatus::dir().join(format!("db_{oid}")));
        }
    }
    let rows = databases
        .into_iter()
        .map(|(oid, name)| {
            let note = notes
                .iter()
                .find(|(o, _)| *o == oid)
                .map(|(_, fp)| fp.clone());
            let status = match note.as_deref() {
                None => "unknown",
                Some(rootstatus::NO_KEYS) => "no keys",
                Some(fp) if Some(fp) == current.as_deref() => "current",
                Some(fp) if Some(fp) == previous.as_deref() => "needs previous root key",
                Some(_) => "another root key",
            };
            let under = note.filter(|n| n != rootstatus::NO_KEYS);
            (name, under, status.to_owned())
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}
