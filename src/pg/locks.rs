//! Releasing a session-level advisory lock without SQL, for the one place
//! SQL is not allowed: a transaction-abort callback.

use pgrx::pg_sys;

/// Releases one hold of the session-level int8 advisory lock `key`, as
/// `pg_advisory_unlock(key)` would (the lock tag of `SET_LOCKTAG_INT64`).
/// Returns whether it was held. Safe to call during abort processing.
pub fn release_session_advisory(key: i64) -> bool {
    let tag = pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set before any SQL runs in the backend.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: (key >> 32) as u32,
        locktag_field3: key as u32,
        locktag_field4: 1,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: releases a lock this backend may hold; LockRelease only warns
    // (and returns false) when it does not.
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true) }
}
