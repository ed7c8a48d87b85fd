-- manna_crypt keys: what keeps the key tables honest, and the view of them.
-- Runs after bootstrap.sql (the tables) and before finalize.sql (grants).

-- Any change to key state, however made, reaches every backend's key cache
-- by its next transaction (see src/keys/cache.rs). Like every function
-- defined in SQL, the trigger functions carry a fixed search_path (see
-- sql/locking.sql); both are statement-level or fire only on a refused
-- write, so the SET clause costs no row.
CREATE FUNCTION manna_crypt._keys_changed() RETURNS trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
AS
$$
BEGIN
    PERFORM manna_crypt._invalidate_key_cache();
    RETURN NULL;
END
$$;
CREATE TRIGGER invalidate_key_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON manna_crypt.data_keys
    FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt._keys_changed();
CREATE TRIGGER invalidate_key_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON manna_crypt.keyrings
    FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt._keys_changed();
CREATE TRIGGER invalidate_key_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON manna_crypt.root_key_check
    FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt._keys_changed();

-- The audit log only grows.
CREATE FUNCTION manna_crypt._audit_log_append_only() RETURNS trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
AS
$$
BEGIN
    RAISE EXCEPTION 'manna_crypt.audit_log is append-only'
        USING ERRCODE = '42501', HINT = 'audit entries cannot be changed or deleted';
END
$$;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON manna_crypt.audit_log
    FOR EACH ROW EXECUTE FUNCTION manna_crypt._audit_log_append_only();
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON manna_crypt.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt._audit_log_append_only();

-- Key metadata without material, with each key's encryptions so far (the
-- nonce budget, see src/keys/budget.rs) and when it last encrypted.
CREATE VIEW manna_crypt.keys AS
SELECT k.key_id, r.name AS keyring, r.kind, k.version, k.status,
       k.created_at, k.status_changed_at, k.root_fingerprint, r.rotation_period,
       coalesce(u.encryptions, 0) AS encryptions, u.last_used, k.purpose
  FROM manna_crypt.data_keys k
  JOIN manna_crypt.keyrings r USING (keyring_id)
  LEFT JOIN manna_crypt._key_usage() u ON u.key_id = k.key_id;

COMMENT ON FUNCTION manna_crypt._keys_changed() IS 'internal: trigger calling _invalidate_key_cache()';
COMMENT ON FUNCTION manna_crypt._audit_log_append_only() IS 'internal: keeps audit_log append-only';
COMMENT ON VIEW manna_crypt.keys IS 'every key with its keyring, purpose (data or index), version, status, encryptions so far and last use; no key material';
