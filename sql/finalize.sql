-- manna_crypt finalize: runs after every function exists.
-- Privileges on everything, and the comments on the functions defined in
-- Rust (objects defined in SQL carry their comment where they are created).

---------------------------------------------------------------------------
-- Privileges: PUBLIC gets nothing that touches keys.
---------------------------------------------------------------------------
GRANT USAGE ON SCHEMA manna_crypt TO PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA manna_crypt FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA manna_crypt FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA manna_crypt FROM PUBLIC;

-- Pure format checks: the domain's CHECK must work for every role that
-- writes an encrypted_text column.
GRANT EXECUTE ON FUNCTION manna_crypt.is_encrypted(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt.key_id(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt.key_id(bytea) TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    manna_crypt.encrypt_gcm(text, text, text),
    manna_crypt.encrypt_gcm(text, bytea, text),
    manna_crypt.encrypt_gcm(bytea, text, text),
    manna_crypt.encrypt_gcm(bytea, bytea, text),
    manna_crypt.decrypt_gcm(text, text),
    manna_crypt.decrypt_gcm(text, bytea, text),
    manna_crypt.decrypt_gcm(bytea, text),
    manna_crypt.decrypt_gcm(bytea, bytea, text),
    manna_crypt.aes_gcm_decrypt(bytea, bytea, bytea, bytea)
  TO manna_crypt_user;

GRANT EXECUTE ON FUNCTION
    manna_crypt.create_keyring(text, interval, boolean),
    manna_crypt.rotate_keyring(text),
    manna_crypt.rotate_due(),
    manna_crypt.set_rotation_period(text, interval),
    manna_crypt.revoke_key(integer, boolean),
    manna_crypt.reinstate_key(integer),
    manna_crypt.destroy_key(integer, boolean),
    manna_crypt.import_fernet_key(text, text),
    manna_crypt.import_fernet_key_file(text, text),
    manna_crypt.rewrap_keys(),
    manna_crypt.root_key_status(),
    manna_crypt.reload_root_key(),
    manna_crypt.info(),
    manna_crypt._key_usage(),
    manna_crypt.register_column(regclass, text),
    manna_crypt.unregister_column(regclass, text)
  TO manna_crypt_admin;

-- Concurrency tools touch no keys; app roles need them.
GRANT EXECUTE ON FUNCTION
    manna_crypt.version_bump(),
    manna_crypt.enable_optimistic_locking(regclass, name),
    manna_crypt.disable_optimistic_locking(regclass),
    manna_crypt.lock_key(text),
    manna_crypt.lock_xact(text, interval),
    manna_crypt.lock_session(text, interval),
    manna_crypt.try_lock_xact(text),
    manna_crypt.try_lock_session(text),
    manna_crypt.unlock(text),
    manna_crypt.lock_holder(text)
  TO manna_crypt_user;

GRANT EXECUTE ON FUNCTION
    manna_crypt.decrypt_fernet(text, text),
    manna_crypt.decrypt_any(text, text, text),
    manna_crypt.value_class(text)
  TO manna_crypt_user;
GRANT EXECUTE ON FUNCTION
    manna_crypt.column_status(regclass, name),
    manna_crypt._reencrypt_start(text, regclass, text, text, text, integer, text, boolean),
    manna_crypt._reencrypt_step(bigint),
    manna_crypt._reencrypt_finish(bigint),
    manna_crypt._reencrypt_result(bigint, boolean)
  TO manna_crypt_admin;
-- A batch's UPDATE runs as the table's owner (a security-restricted
-- operation), who may be any role: it calls these two per row. Outside the
-- batch that issued it they refuse to work (each call carries the batch's
-- random token, which only the batch statement's text has), so no role
-- gains anything from EXECUTE on them.
GRANT EXECUTE ON FUNCTION
    manna_crypt._reencrypt_row(tid, text, text, bigint),
    manna_crypt._reencrypt_row(tid, text, text, bigint, bytea),
    manna_crypt._reencrypt_value(tid, bigint)
  TO PUBLIC;
GRANT EXECUTE ON PROCEDURE
    manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean, bigint, boolean),
    manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean, bigint, boolean),
    manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean, bigint, boolean),
    manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean, bigint, boolean),
    manna_crypt.backfill_blind_index(regclass, name, integer, boolean, bigint, boolean)
  TO manna_crypt_admin;
GRANT SELECT ON manna_crypt.reencrypt_runs, manna_crypt.reencrypt_failures, manna_crypt.reencrypt_progress TO manna_crypt_admin;

GRANT SELECT ON manna_crypt.keys TO manna_crypt_admin;
GRANT SELECT ON manna_crypt.audit_log TO manna_crypt_admin;
GRANT SELECT ON manna_crypt.registered_columns TO manna_crypt_admin;

---------------------------------------------------------------------------
-- Comments
---------------------------------------------------------------------------
COMMENT ON FUNCTION manna_crypt.encrypt_gcm(text, text, text) IS 'encrypt text under the active key of a keyring, optional AAD; returns mc1: text';
COMMENT ON FUNCTION manna_crypt.encrypt_gcm(text, bytea, text) IS 'encrypt text under a raw 32-byte key (key id 0), optional AAD; the key appears in SQL text and logs';
COMMENT ON FUNCTION manna_crypt.encrypt_gcm(bytea, text, text) IS 'encrypt bytes under the active key of a keyring; returns the binary envelope';
COMMENT ON FUNCTION manna_crypt.encrypt_gcm(bytea, bytea, text) IS 'encrypt bytes under a raw 32-byte key (key id 0); returns the binary envelope';
COMMENT ON FUNCTION manna_crypt.decrypt_gcm(text, text) IS 'decrypt mc1: text; the key is found from the key id in the envelope';
COMMENT ON FUNCTION manna_crypt.decrypt_gcm(text, bytea, text) IS 'decrypt mc1: text with a raw 32-byte key';
COMMENT ON FUNCTION manna_crypt.decrypt_gcm(bytea, text) IS 'decrypt a binary envelope; the key is found from its key id';
COMMENT ON FUNCTION manna_crypt.decrypt_gcm(bytea, bytea, text) IS 'decrypt a binary envelope with a raw 32-byte key';
COMMENT ON FUNCTION manna_crypt.aes_gcm_decrypt(bytea, bytea, bytea, bytea) IS 'bare AES-256-GCM decryption (12-byte nonce, ciphertext followed by 16-byte tag) for foreign formats; no encrypting twin by design';
COMMENT ON FUNCTION manna_crypt.is_encrypted(text) IS 'true when the text is a well-formed version-1 ciphertext (says nothing about keys)';
COMMENT ON FUNCTION manna_crypt.key_id(text) IS 'the key id in a text ciphertext header (0 = raw key)';
COMMENT ON FUNCTION manna_crypt.key_id(bytea) IS 'the key id in a binary envelope header (0 = raw key)';
COMMENT ON FUNCTION manna_crypt.create_keyring(text, interval, boolean) IS 'create an AES-256-GCM keyring with an active version-1 key; returns its key id';
COMMENT ON FUNCTION manna_crypt.rotate_keyring(text) IS 'make a new active key version; older versions stay decrypt_only; returns the new key id';
COMMENT ON FUNCTION manna_crypt.rotate_due() IS 'rotate every keyring whose rotation period has elapsed or whose active key is past the warning fraction of its nonce budget (for pg_cron)';
COMMENT ON FUNCTION manna_crypt.set_rotation_period(text, interval) IS 'set or clear (NULL) a keyring''s rotation period';
COMMENT ON FUNCTION manna_crypt.revoke_key(integer, boolean) IS 'revoke a key: it no longer encrypts or decrypts; refused while registered columns use it unless forced';
COMMENT ON FUNCTION manna_crypt.reinstate_key(integer) IS 'undo a revocation: the key becomes decrypt_only';
COMMENT ON FUNCTION manna_crypt.destroy_key(integer, boolean) IS 'crypto-shred a revoked key: its wrapped material is wiped, irreversibly';
COMMENT ON FUNCTION manna_crypt.import_fernet_key(text, text) IS 'import a legacy Fernet key into a Fernet keyring (created if needed); returns its key id';
COMMENT ON FUNCTION manna_crypt.import_fernet_key_file(text, text) IS 'import every Fernet key of a server file (one per line, primary first; the server OS user''s, mode 0600) into a Fernet keyring: the keys never pass through SQL text; needs pg_read_server_files';
COMMENT ON FUNCTION manna_crypt.rewrap_keys() IS 'root-key rotation: re-wrap every data key under the current root key, using the previous one; touches no row';
COMMENT ON FUNCTION manna_crypt.reload_root_key() IS 'load the root key (and the previous one, when set) afresh from its source for the whole server, even while a failing command is in back-off; returns the current root key''s fingerprint';
COMMENT ON FUNCTION manna_crypt.root_key_status() IS 'every database of the cluster and the root key its data keys are wrapped under: current, needs previous root key, another root key, no keys, or unknown';
COMMENT ON FUNCTION manna_crypt.info() IS 'version, root key source and fingerprint, keyrings, key counts, nonce budget use, CPU AES support';
COMMENT ON FUNCTION manna_crypt._key_usage() IS 'internal: encryptions so far and last use of every counted data key of this database (the keys view)';
COMMENT ON FUNCTION manna_crypt.register_column(regclass, text) IS 'record that a text column holds ciphertexts, protecting the keys it uses';
COMMENT ON FUNCTION manna_crypt.unregister_column(regclass, text) IS 'forget a registered column';
COMMENT ON FUNCTION manna_crypt._staged_secret() IS 'internal: the wrapped key or check value staged for manna_crypt''s own statement, so no key material is ever statement text or a parameter';
COMMENT ON FUNCTION manna_crypt._fernet_key_signed(text) IS 'internal: whether the Fernet key being retired signed a token (its usage count)';
COMMENT ON FUNCTION manna_crypt._invalidate_key_cache() IS 'internal: queue a key cache invalidation for every backend';
COMMENT ON FUNCTION manna_crypt.version_bump() IS 'optimistic-locking trigger: equal version bumps, old+1 is accepted, anything else raises 40001';
COMMENT ON FUNCTION manna_crypt.lock_key(text) IS 'the advisory lock key of a lock name: first 8 bytes of sha256(''manna_crypt:'' || name) as signed big-endian int8';
COMMENT ON FUNCTION manna_crypt.lock_xact(text, interval) IS 'take a named lock until the end of the transaction, waiting at most timeout (NULL: forever); 55P03 on timeout';
COMMENT ON FUNCTION manna_crypt.lock_session(text, interval) IS 'take a named lock until unlock() or the end of the session, waiting at most timeout; 55P03 on timeout';
COMMENT ON FUNCTION manna_crypt.try_lock_xact(text) IS 'take a named transaction lock if free; returns whether it was taken';
COMMENT ON FUNCTION manna_crypt.try_lock_session(text) IS 'take a named session lock if free; returns whether it was taken';
COMMENT ON FUNCTION manna_crypt.unlock(text) IS 'release one hold of a named session lock';
COMMENT ON FUNCTION manna_crypt.lock_holder(text) IS 'pid of a session holding the named lock, or NULL';
COMMENT ON FUNCTION manna_crypt.decrypt_fernet(text, text) IS 'decrypt a legacy Fernet token with the keys of a Fernet keyring (newest first); HMAC checked in constant time before decryption';
COMMENT ON FUNCTION manna_crypt.decrypt_any(text, text, text) IS 'decrypt an mc1: ciphertext (as decrypt_gcm) or, with fernet_keyring, a Fernet token (as decrypt_fernet): for a column in the middle of a migration';
COMMENT ON FUNCTION manna_crypt.value_class(text) IS 'what a stored value is: mc1, fernet, malformed or plaintext (no key needed)';
COMMENT ON FUNCTION manna_crypt._reencrypt_start(text, regclass, text, text, text, integer, text, boolean) IS 'internal: start or resume a re-encryption run';
COMMENT ON FUNCTION manna_crypt._reencrypt_step(bigint) IS 'internal: re-encrypt one batch; true while more remains';
COMMENT ON FUNCTION manna_crypt._reencrypt_finish(bigint) IS 'internal: finish a re-encryption run';
COMMENT ON FUNCTION manna_crypt._reencrypt_result(bigint, boolean) IS 'internal: after a run''s last commit, its id, or the error of raise_on_failure';
COMMENT ON FUNCTION manna_crypt._reencrypt_row(tid, text, text, bigint) IS 'internal: convert one row inside a re-encryption batch, or record why not';
COMMENT ON FUNCTION manna_crypt._reencrypt_value(tid, bigint) IS 'internal: the value _reencrypt_row produced for the row being updated';

-- Protected columns: the table's owner installs them (checked inside);
-- the trigger function and the CHECK's function run for every writer, and
-- a direct call of either does nothing useful (39P01; a format check).
GRANT EXECUTE ON FUNCTION
    manna_crypt.protect_column(regclass, text, text, text, text, text, integer),
    manna_crypt.unprotect_column(regclass, text),
    manna_crypt.health()
  TO manna_crypt_user;
COMMENT ON FUNCTION manna_crypt.health() IS 'for an application''s health check: {version, ok, root_key_state[, error]}; nothing about keyrings or keys';
GRANT EXECUTE ON FUNCTION
    manna_crypt._protect(),
    manna_crypt._protected_check(text, text)
  TO PUBLIC;
COMMENT ON FUNCTION manna_crypt.protect_column(regclass, text, text, text, text, text, integer) IS 'encrypt every plaintext written to a text column under a keyring, bound to the row''s AAD column, with a trigger and a CHECK, and keep its blind-index column; table owner only; idempotent';
COMMENT ON FUNCTION manna_crypt.unprotect_column(regclass, text) IS 'stop encrypting writes to a protected column (stored values stay as they are)';
COMMENT ON FUNCTION manna_crypt._protect() IS 'internal: the protect trigger (six arguments per column: column, keyring, AAD column, blind-index column, normalization, bits)';
COMMENT ON FUNCTION manna_crypt._protected_check(text, text) IS 'internal: the CHECK of a protected column; raises 23514 without the row for anything but a ciphertext';

-- Blind indexes (issue 12).
REVOKE EXECUTE ON FUNCTION
    manna_crypt.blind_index(text, text, text, integer),
    manna_crypt.blind_index_all(text, text, text, integer),
    manna_crypt.rotate_index_key(text)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    manna_crypt.blind_index(text, text, text, integer),
    manna_crypt.blind_index_all(text, text, text, integer)
  TO manna_crypt_user;
GRANT EXECUTE ON FUNCTION manna_crypt.rotate_index_key(text) TO manna_crypt_admin;
-- Pure (no key) and what pg_trigger shows anyway: everyone.
GRANT EXECUTE ON FUNCTION manna_crypt.blind_normalize(text, text), manna_crypt.protected_columns() TO PUBLIC;
COMMENT ON FUNCTION manna_crypt.blind_index(text, text, text, integer) IS 'the blind-index term of a value: HMAC-SHA256 of the normalized value under the keyring''s active index key, prefixed with the key id';
COMMENT ON FUNCTION manna_crypt.blind_index_all(text, text, text, integer) IS 'the blind-index terms of a value under every live index key of the keyring (for = ANY(...) lookups during a rotation)';
COMMENT ON FUNCTION manna_crypt.blind_normalize(text, text) IS 'a value normalized as a blind index normalizes it (none, lower, email, digits)';
COMMENT ON FUNCTION manna_crypt.rotate_index_key(text) IS 'create a new active blind-index key for a keyring (the first, or the next version); older ones keep matching lookups until revoked';
COMMENT ON FUNCTION manna_crypt.protected_columns() IS 'every protected column of this database with its keyring, AAD column and blind index';
COMMENT ON FUNCTION manna_crypt._reencrypt_row(tid, text, text, bigint, bytea) IS 'internal: compute one row''s blind-index term inside a backfill batch, or record why not';
-- Key access statistics: every key user sees the calls of the roles whose
-- privileges it has (filtered inside _key_access()); admins see all and
-- reset them.
GRANT EXECUTE ON FUNCTION manna_crypt._key_access() TO manna_crypt_user;
GRANT SELECT ON manna_crypt.key_access TO manna_crypt_user;
GRANT EXECUTE ON FUNCTION
    manna_crypt.reset_key_access_stats(),
    manna_crypt.key_access_stats_status()
  TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt._key_access() IS 'internal: this database''s key access counts the caller may see (the key_access view)';
COMMENT ON FUNCTION manna_crypt.reset_key_access_stats() IS 'forget this database''s key access statistics when the transaction commits; recorded in the audit log';
COMMENT ON FUNCTION manna_crypt.key_access_stats_status() IS 'the shared key access table: capacity, entries in use (every database), calls dropped for lack of room, retention in days';
---------------------------------------------------------------------------
-- Keyring grants (sql/grants.sql, src/keys/access.rs)
---------------------------------------------------------------------------
GRANT EXECUTE ON FUNCTION
    manna_crypt.grant_keyring_access(text, regrole, text),
    manna_crypt.revoke_keyring_access(text, regrole, text)
  TO manna_crypt_admin;
GRANT SELECT ON manna_crypt.keyring_access, manna_crypt.keyring_grants TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt.grant_keyring_access(text, regrole, text) IS 'allow a role (and the roles with its privileges) to encrypt, decrypt or compute blind indexes with a keyring (* = every keyring); administrators only; audited';
COMMENT ON FUNCTION manna_crypt.revoke_keyring_access(text, regrole, text) IS 'take back a keyring grant; administrators only; audited';
COMMENT ON FUNCTION manna_crypt._invalidate_grants_cache() IS 'internal: queue a keyring grant cache invalidation for every backend';
