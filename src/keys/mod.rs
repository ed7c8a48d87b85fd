//! Envelope key management (docs/DESIGN.md section 2).
//!
//! Layered bottom-up; a module calls only the ones listed before it:
//!
//! - [`staged`]: key material for our statements, never text or a parameter;
//! - [`store`]: every statement on the key tables and the audit log;
//! - [`root_command`]: running a root key command, bounded in time, output
//!   and inherited descriptors (no SQL, no PostgreSQL);
//! - [`root_source`]: reading a root key's text from a file or a command;
//! - [`rootstatus`]: each database's root key, noted in the data directory
//!   for the cluster-wide view of a root-key rotation;
//! - [`rootshared`]: root keys in shared memory, loaded once per server,
//!   with back-off while a source fails;
//! - [`rootkey`]: the root-key settings, the loaded keys, and which root key
//!   opens the stored data keys;
//! - [`countfile`]: the usage counters' files in the data directory;
//! - [`counters`]: counters per (database, kind, id) in shared memory,
//!   reserved ahead in blocks so a crash over-counts but never under-counts;
//! - [`tally`]: one backend's blocks of those counters, given back at exit;
//! - [`budget`]: the nonce budget of data keys: settings, the count on every
//!   encryption, the WARNING, `_key_usage()` for the `keys` view;
//! - [`access_file`], [`access_table`], [`access_stats`]: who used which
//!   keyring: the statistics' file, the shared table of calls per (database,
//!   role, keyring, operation, hour), and each backend's cells beside its
//!   cached keys, handed over at transaction end;
//! - [`cache`]: unwrapped data keys per backend, invalidated by relcache
//!   messages so a revocation is seen by every session at its next transaction;
//! - [`grants`]: who may use which keyring, cached per backend and role;
//! - [`usage`]: registered columns and how many values a key still protects;
//! - [`wrapping`]: wrapping new data keys, and `rewrap_keys()`;
//! - [`lifecycle`]: create, rotate, revoke, reinstate, destroy, import;
//! - [`indexkeys`]: blind-index keys: creation and rotation;
//! - [`secret_file`]: reading a secret from a strictly owned server file;
//! - [`import`]: Fernet keys imported from a server file (no SQL text);
//! - [`info`]: the `info()` overview;
//! - [`access_sql`]: the `key_access` view's function, the reset, the status;
//! - [`access`]: `grant_keyring_access()` and `revoke_keyring_access()`.
//!
//! Nothing here knows about re-encryption or locking, which sit above.

pub mod access;
pub mod access_file;
pub mod access_sql;
pub mod access_stats;
pub mod access_table;
pub mod budget;
pub mod cache;
pub mod counters;
pub mod countfile;
pub mod grants;
pub mod import;
pub mod indexkeys;
pub mod info;
pub mod lifecycle;
pub mod root_command;
pub mod root_source;
pub mod rootkey;
pub mod rootshared;
pub mod rootstatus;
pub mod secret_file;
pub mod staged;
pub mod store;
pub mod tally;
pub mod usage;
pub mod wrapping;
