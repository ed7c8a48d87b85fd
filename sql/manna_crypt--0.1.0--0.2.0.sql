-- manna_crypt 0.1.0 -> 0.2.0, run by ALTER EXTENSION manna_crypt UPDATE
-- (README, "Upgrading"). `cargo pgrx install` copies this file into the
-- extension directory beside manna_crypt--0.2.0.sql.
--
-- What goes here: every change of the SQL surface between the releases, so
-- that an upgraded database ends with exactly the catalog of a fresh
-- CREATE EXTENSION (tests/python/test_upgrade.py compares the two catalog
-- snapshots). Rules:
--   * Never DROP a function, type or table that users' objects can depend
--     on (CHECKs, views, index expressions, triggers, columns of the
--     encrypted_text domain): the DROP fails, or CASCADE destroys user
--     objects. Change a function with CREATE OR REPLACE; add a new one
--     beside the old, keeping the old Rust symbol (the 0.1.0 catalog
--     calls it until this script has run).
--   * Key tables are altered in place, never dropped and recreated: their
--     rows are the only copy of the wrapped keys.
--   * Schema-qualify everything (manna_crypt., pg_catalog.), as the other
--     scripts do: the catalog must not depend on the search_path in force.
--   * New objects get their GRANT and COMMENT here as in sql/finalize.sql.
--

\echo Use "ALTER EXTENSION manna_crypt UPDATE" to load this file. \quit

-- ===========================================================================
-- Functions defined in SQL: a fixed search_path, the committing procedure's
-- body fully qualified, NULL/empty arguments 22023, and a sql_drop event
-- trigger that forgets dropped tables and columns. The bodies are copies of
-- sql/keys.sql, sql/locking.sql and sql/reencrypt.sql; CREATE OR REPLACE
-- keeps each function's oid, owner, grants and comment, so users' triggers,
-- views and functions that depend on them stay intact.
-- ===========================================================================

-- sql/keys.sql
CREATE OR REPLACE FUNCTION manna_crypt._keys_changed() RETURNS trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
AS
$$
BEGIN
    PERFORM manna_crypt._invalidate_key_cache();
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION manna_crypt._audit_log_append_only() RETURNS trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
AS
$$
BEGIN
    RAISE EXCEPTION 'manna_crypt.audit_log is append-only'
        USING ERRCODE = '42501', HINT = 'audit entries cannot be changed or deleted';
END
$$;

-- sql/locking.sql
CREATE OR REPLACE FUNCTION manna_crypt.enable_optimistic_locking(tbl regclass, col name DEFAULT 'version')
RETURNS void
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS
$$
DECLARE
    typ pg_catalog.regtype;
BEGIN
    -- Bad arguments (22023), not the syntax error format() would make of them.
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'tbl must not be null' USING ERRCODE = '22023';
    END IF;
    IF col IS NULL OR col = '' THEN
        RAISE EXCEPTION 'col must not be null or empty' USING ERRCODE = '22023',
            HINT = 'name the version column, or leave it out for "version"';
    END IF;
    SELECT a.atttypid::pg_catalog.regtype INTO typ
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        EXECUTE pg_catalog.format('ALTER TABLE %s ADD COLUMN %I pg_catalog.int8 NOT NULL DEFAULT 1', tbl, col);
    ELSIF typ NOT IN ('pg_catalog.int2'::pg_catalog.regtype, 'pg_catalog.int4'::pg_catalog.regtype,
                      'pg_catalog.int8'::pg_catalog.regtype) THEN
        RAISE EXCEPTION 'version column "%" of table % is of type %, not an integer type', col, tbl, typ
            USING ERRCODE = '42804', HINT = 'use a smallint, integer or bigint column';
    END IF;
    -- Idempotent: replace any earlier installation (perhaps for another column).
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid = tbl AND tgname = 'manna_crypt_optimistic_lock') THEN
        EXECUTE pg_catalog.format('DROP TRIGGER manna_crypt_optimistic_lock ON %s', tbl);
    END IF;
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER manna_crypt_optimistic_lock BEFORE INSERT OR UPDATE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION manna_crypt.version_bump(%L)', tbl, col);
END
$$;

CREATE OR REPLACE FUNCTION manna_crypt.disable_optimistic_locking(tbl regclass)
RETURNS void
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS
$$
BEGIN
    -- The version column stays: it is data the application may still read.
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid = tbl AND tgname = 'manna_crypt_optimistic_lock') THEN
        EXECUTE pg_catalog.format('DROP TRIGGER manna_crypt_optimistic_lock ON %s', tbl);
    END IF;
END
$$;

-- sql/reencrypt.sql (the procedures are dropped and created anew at the end
-- of this file: their parameter lists changed)
CREATE OR REPLACE FUNCTION manna_crypt.column_status(tbl regclass, col name)
RETURNS TABLE (category text, key_id bigint, keyring text, key_status text, n bigint)
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql STABLE
AS
$$
BEGIN
    -- Bad arguments (22023), not the syntax error format() would make of them.
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'tbl must not be null' USING ERRCODE = '22023';
    END IF;
    IF col IS NULL OR col = '' THEN
        RAISE EXCEPTION 'col must not be null or empty' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT s.category, s.key_id, k.keyring, k.status, pg_catalog.count(*)
           FROM (SELECT CASE WHEN v IS NULL THEN ''null'' ELSE manna_crypt.value_class(v) END AS category,
                        CASE WHEN manna_crypt.is_encrypted(v) THEN manna_crypt.key_id(v) END AS key_id
                   FROM (SELECT %I::pg_catalog.text AS v FROM %s) t) s
           LEFT JOIN manna_crypt.keys k ON k.key_id = s.key_id
          GROUP BY 1, 2, 3, 4
          ORDER BY 1, 2', col, tbl);
END
$$;

-- New: the event trigger that forgets dropped tables and columns
-- (sql/reencrypt.sql argues why its SECURITY DEFINER is safe).
CREATE FUNCTION manna_crypt._forget_dropped() RETURNS event_trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
    SECURITY DEFINER
AS
$$
BEGIN
    -- A dropped table is reported with objsubid 0, a dropped column as a
    -- 'table column' with objsubid > 0 and its name last in address_names.
    DELETE FROM manna_crypt.registered_columns r
     USING pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND r.tbl OPERATOR(pg_catalog.=) d.objid
       AND (d.objsubid OPERATOR(pg_catalog.=) 0
            OR r.col OPERATOR(pg_catalog.=) d.address_names[pg_catalog.array_upper(d.address_names, 1)]);
    UPDATE manna_crypt.reencrypt_runs r
       SET status = 'abandoned', finished_at = pg_catalog.now()
      FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE r.status OPERATOR(pg_catalog.=) 'running'
       AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND r.tbl OPERATOR(pg_catalog.=) d.objid
       AND (d.objsubid OPERATOR(pg_catalog.=) 0
            OR r.col OPERATOR(pg_catalog.=) d.address_names[pg_catalog.array_upper(d.address_names, 1)]);
END
$$;
CREATE EVENT TRIGGER manna_crypt_forget_dropped ON sql_drop
    EXECUTE FUNCTION manna_crypt._forget_dropped();

-- finalize.sql revokes EXECUTE on every routine from PUBLIC; a function
-- created here needs it said again (and pg_init_privs then matches a fresh
-- install's).
REVOKE EXECUTE ON FUNCTION manna_crypt._forget_dropped() FROM PUBLIC;

COMMENT ON FUNCTION manna_crypt._forget_dropped() IS 'internal: sql_drop event trigger forgetting registrations (and closing unfinished runs) of dropped tables and columns';
COMMENT ON EVENT TRIGGER manna_crypt_forget_dropped IS 'forgets registered columns of dropped tables and columns';

-- What 0.1.0 left behind: registrations of tables and columns dropped
-- before the event trigger existed describe nothing (only a table that
-- got the oid since, with a column of the same name, is indistinguishable
-- and stays), and unfinished runs of those tables can never finish.
DELETE FROM manna_crypt.registered_columns r
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid OPERATOR(pg_catalog.=) r.tbl
                      AND a.attname OPERATOR(pg_catalog.=) r.col
                      AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped);
UPDATE manna_crypt.reencrypt_runs r
   SET status = 'abandoned', finished_at = pg_catalog.now()
 WHERE r.status OPERATOR(pg_catalog.=) 'running'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid OPERATOR(pg_catalog.=) r.tbl
                      AND a.attname OPERATOR(pg_catalog.=) r.col
                      AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped);

-- ===========================================================================
-- Functions defined in Rust.
-- ===========================================================================
-- ---------------------------------------------------------------------------
-- Re-encryption: the per-row functions take the row's ctid and the batch's
-- token; the batch runs as the table's owner, who executes them (PUBLIC).
-- Internal functions no user object depends on: dropped and created anew.
-- ---------------------------------------------------------------------------
DROP FUNCTION manna_crypt._reencrypt_row(tid, text, text);
CREATE FUNCTION manna_crypt._reencrypt_row(ctid tid, value text, aad text, token bigint)
RETURNS boolean VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_reencrypt_convert_wrapper';
DROP FUNCTION manna_crypt._reencrypt_value();
CREATE FUNCTION manna_crypt._reencrypt_value(ctid tid, token bigint)
RETURNS text VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_reencrypt_take_wrapper';
GRANT EXECUTE ON FUNCTION
    manna_crypt._reencrypt_row(tid, text, text, bigint),
    manna_crypt._reencrypt_value(tid, bigint)
  TO PUBLIC;
COMMENT ON FUNCTION manna_crypt._reencrypt_row(tid, text, text, bigint) IS 'internal: convert one row inside a re-encryption batch, or record why not';
COMMENT ON FUNCTION manna_crypt._reencrypt_value(tid, bigint) IS 'internal: the value _reencrypt_row produced for the row being updated';

-- ---------------------------------------------------------------------------
-- A NULL required argument is 22023, not a silent no-op: no longer STRICT.
-- ---------------------------------------------------------------------------
ALTER FUNCTION manna_crypt.rotate_keyring(text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.revoke_key(integer, boolean) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.destroy_key(integer, boolean) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.reinstate_key(integer) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.import_fernet_key(text, text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.try_lock_xact(text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.try_lock_session(text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.unlock(text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.lock_holder(text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.register_column(regclass, text) CALLED ON NULL INPUT;
ALTER FUNCTION manna_crypt.unregister_column(regclass, text) CALLED ON NULL INPUT;

-- ---------------------------------------------------------------------------
-- New functions.
-- ---------------------------------------------------------------------------
CREATE FUNCTION manna_crypt._staged_secret() RETURNS bytea
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_staged_secret_wrapper';
CREATE FUNCTION manna_crypt._fernet_key_signed(token text) RETURNS boolean
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_fernet_key_signed_wrapper';
CREATE FUNCTION manna_crypt.import_fernet_key_file(keyring text, path text)
RETURNS TABLE (line integer, key_id integer)
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'import_fernet_key_file_wrapper';
CREATE FUNCTION manna_crypt.root_key_status()
RETURNS TABLE (database text, wrapped_under text, status text)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'root_key_status_wrapper';
REVOKE EXECUTE ON FUNCTION
    manna_crypt._staged_secret(),
    manna_crypt._fernet_key_signed(text),
    manna_crypt.import_fernet_key_file(text, text),
    manna_crypt.root_key_status()
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    manna_crypt.import_fernet_key_file(text, text),
    manna_crypt.root_key_status()
  TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt._staged_secret() IS 'internal: the wrapped key or check value staged for manna_crypt''s own statement, so no key material is ever statement text or a parameter';
COMMENT ON FUNCTION manna_crypt._fernet_key_signed(text) IS 'internal: whether the Fernet key being retired signed a token (its usage count)';
COMMENT ON FUNCTION manna_crypt.import_fernet_key_file(text, text) IS 'import every Fernet key of a server file (one per line, primary first; the server OS user''s, mode 0600) into a Fernet keyring: the keys never pass through SQL text; needs pg_read_server_files';
COMMENT ON FUNCTION manna_crypt.root_key_status() IS 'every database of the cluster and the root key its data keys are wrapped under: current, needs previous root key, another root key, no keys, or unknown';

-- Keys wrapped by 0.1.0 (wrap version 1) stay readable; SELECT
-- manna_crypt.rewrap_keys() rewrites them in version 2, which binds the
-- keyring and the kind. Not done here: ALTER EXTENSION must not depend on
-- the root key being reachable.

-- ---- 0.2.0: the root key in shared memory (issue 10) -----------------------
CREATE FUNCTION manna_crypt.reload_root_key() RETURNS text
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'reload_root_key_wrapper';
REVOKE EXECUTE ON FUNCTION manna_crypt.reload_root_key() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt.reload_root_key() TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt.reload_root_key() IS 'load the root key (and the previous one, when set) afresh from its source for the whole server, even while a failing command is in back-off; returns the current root key''s fingerprint';

-- ---- 0.2.0: protected columns (issue 11) ------------------------------------
CREATE FUNCTION manna_crypt."_protect"() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', '_protect_wrapper';
CREATE FUNCTION manna_crypt.protect_column(tbl regclass, col text, keyring text, aad_column text DEFAULT NULL,
    blind_index_column text DEFAULT NULL, normalization text DEFAULT 'none', bits integer DEFAULT 256)
RETURNS void VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'protect_column_wrapper';
CREATE FUNCTION manna_crypt.unprotect_column(tbl regclass, col text)
RETURNS void VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'unprotect_column_wrapper';
CREATE FUNCTION manna_crypt._protected_check(value text, col text)
RETURNS boolean IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_protected_check_wrapper';
REVOKE EXECUTE ON FUNCTION
    manna_crypt._protect(),
    manna_crypt.protect_column(regclass, text, text, text, text, text, integer),
    manna_crypt.unprotect_column(regclass, text),
    manna_crypt._protected_check(text, text)
  FROM PUBLIC;
-- Protected columns: the table's owner installs them (checked inside);
-- the trigger function and the CHECK's function run for every writer, and
-- a direct call of either does nothing useful (39P01; a format check).
GRANT EXECUTE ON FUNCTION
    manna_crypt.protect_column(regclass, text, text, text, text, text, integer),
    manna_crypt.unprotect_column(regclass, text)
  TO manna_crypt_user;
GRANT EXECUTE ON FUNCTION
    manna_crypt._protect(),
    manna_crypt._protected_check(text, text)
  TO PUBLIC;
COMMENT ON FUNCTION manna_crypt.protect_column(regclass, text, text, text, text, text, integer) IS 'encrypt every plaintext written to a text column under a keyring, bound to the row''s AAD column, with a trigger and a CHECK, and keep its blind-index column; table owner only; idempotent';
COMMENT ON FUNCTION manna_crypt.unprotect_column(regclass, text) IS 'stop encrypting writes to a protected column (stored values stay as they are)';
COMMENT ON FUNCTION manna_crypt._protect() IS 'internal: the protect trigger (six arguments per column: column, keyring, AAD column, blind-index column, normalization, bits)';
COMMENT ON FUNCTION manna_crypt._protected_check(text, text) IS 'internal: the CHECK of a protected column; raises 23514 without the row for anything but a ciphertext';

-- ---- 0.2.0: a health check for application roles ----------------------------
CREATE FUNCTION manna_crypt.health() RETURNS jsonb
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'health_wrapper';
REVOKE EXECUTE ON FUNCTION manna_crypt.health() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt.health() TO manna_crypt_user;
COMMENT ON FUNCTION manna_crypt.health() IS 'for an application''s health check: {version, ok, root_key_state[, error]}; nothing about keyrings or keys';

-- ---------------------------------------------------------------------------
-- Usage counters and the nonce budget (docs/DESIGN.md section 7.2): the
-- keys view gains encryptions and last_used (new columns at the end, so
-- CREATE OR REPLACE VIEW keeps its grants and the objects built on it).
-- ---------------------------------------------------------------------------
CREATE FUNCTION manna_crypt._key_usage()
RETURNS TABLE (key_id integer, encryptions bigint, last_used timestamp with time zone)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_key_usage_wrapper';
REVOKE EXECUTE ON FUNCTION manna_crypt._key_usage() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt._key_usage() TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt._key_usage() IS 'internal: encryptions so far and last use of every counted data key of this database (the keys view)';
CREATE OR REPLACE VIEW manna_crypt.keys AS
SELECT k.key_id, r.name AS keyring, r.kind, k.version, k.status,
       k.created_at, k.status_changed_at, k.root_fingerprint, r.rotation_period,
       coalesce(u.encryptions, 0) AS encryptions, u.last_used
  FROM manna_crypt.data_keys k
  JOIN manna_crypt.keyrings r USING (keyring_id)
  LEFT JOIN manna_crypt._key_usage() u ON u.key_id = k.key_id;
COMMENT ON VIEW manna_crypt.keys IS 'every data key with its keyring, version, status, encryptions so far and last use; no key material';
COMMENT ON FUNCTION manna_crypt.rotate_due() IS 'rotate every keyring whose rotation period has elapsed or whose active key is past the warning fraction of its nonce budget (for pg_cron)';
COMMENT ON FUNCTION manna_crypt.info() IS 'version, root key source and fingerprint, keyrings, key counts, nonce budget use, CPU AES support';

-- ---- 0.2.0: the migration window and re-encryption reporting (issue 11) ----
-- decrypt_any(): reads mc1 ciphertexts and Fernet tokens alike.
CREATE FUNCTION manna_crypt.decrypt_any(value text, aad text DEFAULT NULL, fernet_keyring text DEFAULT NULL)
RETURNS text STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'decrypt_any_wrapper';
REVOKE EXECUTE ON FUNCTION manna_crypt.decrypt_any(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt.decrypt_any(text, text, text) TO manna_crypt_user;
COMMENT ON FUNCTION manna_crypt.decrypt_any(text, text, text) IS 'decrypt an mc1: ciphertext (as decrypt_gcm) or, with fernet_keyring, a Fernet token (as decrypt_fernet): for a column in the middle of a migration';

-- create_keyring(name, rotation_period, if_not_exists): one function with a
-- new last parameter, not an overload (create_keyring('x') would become
-- ambiguous). A parameter cannot be added by CREATE OR REPLACE, so the old
-- signature is dropped; no object of the extension depends on it, and a
-- user's object that did (a BEGIN ATOMIC body) makes this DROP fail rather
-- than be dropped. The library keeps the old symbol
-- (create_keyring_wrapper) for 0.1.0 catalogs not updated yet.
DROP FUNCTION manna_crypt.create_keyring(text, interval);
CREATE FUNCTION manna_crypt.create_keyring(name text, rotation_period interval DEFAULT NULL, if_not_exists boolean DEFAULT false)
RETURNS integer VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'create_keyring_if_not_exists_wrapper';
REVOKE EXECUTE ON FUNCTION manna_crypt.create_keyring(text, interval, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt.create_keyring(text, interval, boolean) TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt.create_keyring(text, interval, boolean) IS 'create an AES-256-GCM keyring with an active version-1 key; returns its key id';

-- The procedures: INOUT run_id and raise_on_failure after 0.1.0's
-- parameters (every 0.1.0 CALL works unchanged). A procedure's parameter
-- list cannot be changed in place: dropped and created anew, with 0.1.0's
-- grants and comments. The bodies are copies of sql/reencrypt.sql.
DROP PROCEDURE manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean);
DROP PROCEDURE manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean);
DROP PROCEDURE manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean);
DROP PROCEDURE manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean);

CREATE FUNCTION manna_crypt._reencrypt_result(handle bigint, raise_on_failure boolean)
RETURNS bigint VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_reencrypt_result_wrapper';

CREATE PROCEDURE manna_crypt._reencrypt_run(
    mode text, tbl regclass, col name, source_keyring text, target_keyring text,
    batch_size integer, aad_column name, dry_run boolean,
    INOUT run_id bigint, raise_on_failure boolean)
LANGUAGE plpgsql AS
$$
DECLARE
    h pg_catalog.int8;
BEGIN
    h := manna_crypt._reencrypt_start(mode, tbl, col, source_keyring, target_keyring, batch_size, aad_column, dry_run);
    COMMIT;
    WHILE manna_crypt._reencrypt_step(h) LOOP
        COMMIT;
    END LOOP;
    PERFORM manna_crypt._reencrypt_finish(h);
    COMMIT;
    -- After the last COMMIT: the run id, or (raise_on_failure) an error
    -- that leaves every converted row committed.
    run_id := manna_crypt._reencrypt_result(h, raise_on_failure);
END
$$;

-- run_id (INOUT, last but one) hands the run's id back as the CALL's
-- result row, and raise_on_failure makes a run that left rows unconverted
-- an error (22000) after its last COMMIT: both come after 0.1.0's
-- parameters, so 0.1.0's positional and named CALLs work unchanged. The
-- value passed in as run_id is ignored.
CREATE PROCEDURE manna_crypt.migrate_fernet(
    tbl regclass, col name, fernet_keyring text, target_keyring text,
    batch_size integer DEFAULT 1000, aad_column name DEFAULT NULL, dry_run boolean DEFAULT false,
    INOUT run_id bigint DEFAULT NULL, raise_on_failure boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('migrate_fernet', tbl, col, fernet_keyring, target_keyring, batch_size, aad_column, dry_run, run_id, raise_on_failure);
END
$$;

CREATE PROCEDURE manna_crypt.rewrap_column(
    tbl regclass, col name, keyring text,
    batch_size integer DEFAULT 1000, aad_column name DEFAULT NULL, dry_run boolean DEFAULT false,
    INOUT run_id bigint DEFAULT NULL, raise_on_failure boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('rewrap_column', tbl, col, NULL, keyring, batch_size, aad_column, dry_run, run_id, raise_on_failure);
END
$$;

CREATE PROCEDURE manna_crypt.encrypt_column(
    tbl regclass, col name, keyring text,
    batch_size integer DEFAULT 1000, aad_column name DEFAULT NULL, dry_run boolean DEFAULT false,
    INOUT run_id bigint DEFAULT NULL, raise_on_failure boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('encrypt_column', tbl, col, NULL, keyring, batch_size, aad_column, dry_run, run_id, raise_on_failure);
END
$$;

REVOKE EXECUTE ON FUNCTION manna_crypt._reencrypt_result(bigint, boolean) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE
    manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean, bigint, boolean),
    manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean, bigint, boolean),
    manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean, bigint, boolean),
    manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean, bigint, boolean)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt._reencrypt_result(bigint, boolean) TO manna_crypt_admin;
GRANT EXECUTE ON PROCEDURE
    manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean, bigint, boolean),
    manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean, bigint, boolean),
    manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean, bigint, boolean),
    manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean, bigint, boolean)
  TO manna_crypt_admin;
COMMENT ON PROCEDURE manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean, bigint, boolean) IS 're-encrypt Fernet tokens in place as AES-256-GCM, committing per batch';
COMMENT ON PROCEDURE manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean, bigint, boolean) IS 're-encrypt values under older key versions of a keyring with its active key, committing per batch';
COMMENT ON PROCEDURE manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean, bigint, boolean) IS 'encrypt plaintext values of a column in place, committing per batch';
COMMENT ON PROCEDURE manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean, bigint, boolean) IS 'internal: the batch loop shared by migrate_fernet, rewrap_column and encrypt_column';
COMMENT ON FUNCTION manna_crypt._reencrypt_result(bigint, boolean) IS 'internal: after a run''s last commit, its id, or the error of raise_on_failure';

-- ---- 0.2.0: blind indexes (issue 12) ----------------------------------------
-- Index keys are rows of data_keys with purpose 'index': versions are
-- numbered per purpose, and one key of each purpose is active.
ALTER TABLE manna_crypt.data_keys
    ADD COLUMN purpose text NOT NULL DEFAULT 'data' CHECK (purpose IN ('data', 'index')),
    DROP CONSTRAINT data_keys_keyring_id_version_key,
    ADD CONSTRAINT data_keys_keyring_id_purpose_version_key UNIQUE (keyring_id, purpose, version);
DROP INDEX manna_crypt.data_keys_one_active;
CREATE UNIQUE INDEX data_keys_one_active ON manna_crypt.data_keys (keyring_id, purpose) WHERE status = 'active';
CREATE OR REPLACE VIEW manna_crypt.keys AS
SELECT k.key_id, r.name AS keyring, r.kind, k.version, k.status,
       k.created_at, k.status_changed_at, k.root_fingerprint, r.rotation_period,
       coalesce(u.encryptions, 0) AS encryptions, u.last_used, k.purpose
  FROM manna_crypt.data_keys k
  JOIN manna_crypt.keyrings r USING (keyring_id)
  LEFT JOIN manna_crypt._key_usage() u ON u.key_id = k.key_id;
COMMENT ON VIEW manna_crypt.keys IS 'every key with its keyring, purpose (data or index), version, status, encryptions so far and last use; no key material';

CREATE FUNCTION manna_crypt.blind_index(value text, keyring text, normalization text DEFAULT 'none', bits integer DEFAULT 256)
RETURNS bytea STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'blind_index_wrapper';
CREATE FUNCTION manna_crypt.blind_index_all(value text, keyring text, normalization text DEFAULT 'none', bits integer DEFAULT 256)
RETURNS bytea[] STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'blind_index_all_wrapper';
CREATE FUNCTION manna_crypt.blind_normalize(value text, normalization text)
RETURNS text IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'blind_normalize_wrapper';
CREATE FUNCTION manna_crypt.rotate_index_key(keyring text)
RETURNS integer VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'rotate_index_key_wrapper';
CREATE FUNCTION manna_crypt.protected_columns()
RETURNS TABLE (schema_name text, table_name text, col text, keyring text, aad_column text,
               blind_index_column text, normalization text, bits integer)
STRICT STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'protected_columns_wrapper';
CREATE FUNCTION manna_crypt._reencrypt_row(ctid tid, value text, aad text, token bigint, current bytea)
RETURNS boolean VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_reencrypt_index_row_wrapper';
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
GRANT EXECUTE ON FUNCTION manna_crypt._reencrypt_row(tid, text, text, bigint, bytea) TO PUBLIC;
COMMENT ON FUNCTION manna_crypt.blind_index(text, text, text, integer) IS 'the blind-index term of a value: HMAC-SHA256 of the normalized value under the keyring''s active index key, prefixed with the key id';
COMMENT ON FUNCTION manna_crypt.blind_index_all(text, text, text, integer) IS 'the blind-index terms of a value under every live index key of the keyring (for = ANY(...) lookups during a rotation)';
COMMENT ON FUNCTION manna_crypt.blind_normalize(text, text) IS 'a value normalized as a blind index normalizes it (none, lower, email, digits)';
COMMENT ON FUNCTION manna_crypt.rotate_index_key(text) IS 'create a new active blind-index key for a keyring (the first, or the next version); older ones keep matching lookups until revoked';
COMMENT ON FUNCTION manna_crypt.protected_columns() IS 'every protected column of this database with its keyring, AAD column and blind index';
COMMENT ON FUNCTION manna_crypt._reencrypt_row(tid, text, text, bigint, bytea) IS 'internal: compute one row''s blind-index term inside a backfill batch, or record why not';

ALTER TABLE manna_crypt.reencrypt_runs DROP CONSTRAINT reencrypt_runs_mode_check,
    ADD CONSTRAINT reencrypt_runs_mode_check
    CHECK (mode IN ('migrate_fernet', 'rewrap_column', 'encrypt_column', 'backfill_blind_index'));
CREATE PROCEDURE manna_crypt.backfill_blind_index(
    tbl regclass, col name,
    batch_size integer DEFAULT 1000, dry_run boolean DEFAULT false,
    INOUT run_id bigint DEFAULT NULL, raise_on_failure boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('backfill_blind_index', tbl, col, NULL, NULL, batch_size, NULL, dry_run, run_id, raise_on_failure);
END
$$;
REVOKE EXECUTE ON PROCEDURE manna_crypt.backfill_blind_index(regclass, name, integer, boolean, bigint, boolean) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE manna_crypt.backfill_blind_index(regclass, name, integer, boolean, bigint, boolean) TO manna_crypt_admin;
COMMENT ON PROCEDURE manna_crypt.backfill_blind_index(regclass, name, integer, boolean, bigint, boolean) IS 'fill a protected column''s blind-index column with terms under the keyring''s active index key, committing per batch (after protect_column or rotate_index_key)';
-- ---- 0.2.0: key access statistics (issue 13, part 3) ----
-- Who used which keyring: counts in shared memory, read through
-- _key_access() (filtered by the caller's roles) and the key_access view;
-- reset and status for admins. See sql/access_stats.sql and finalize.sql.
CREATE FUNCTION manna_crypt._key_access() RETURNS TABLE (
    database oid, role_oid oid, keyring_id integer, operation text,
    bucket_start timestamp with time zone, calls bigint)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c AS 'MODULE_PATHNAME', '_key_access_wrapper';
CREATE FUNCTION manna_crypt.reset_key_access_stats() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'reset_key_access_stats_wrapper';
CREATE FUNCTION manna_crypt.key_access_stats_status() RETURNS TABLE (
    capacity integer, entries integer, dropped_calls bigint, retention_days integer)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'key_access_stats_status_wrapper';

CREATE VIEW manna_crypt.key_access AS
SELECT d.datname AS database, a.role_oid, ro.rolname AS role, a.keyring_id,
       r.name AS keyring, a.operation, a.bucket_start, a.calls
  FROM manna_crypt._key_access() a
  LEFT JOIN pg_catalog.pg_database d ON d.oid = a.database
  LEFT JOIN pg_catalog.pg_roles ro ON ro.oid = a.role_oid
  LEFT JOIN manna_crypt.keyrings r ON r.keyring_id = a.keyring_id;
COMMENT ON VIEW manna_crypt.key_access IS 'encrypt, decrypt and blind-index calls per role, keyring and hour (UTC) in this database; admins see every role, others the roles whose privileges they have';

REVOKE ALL ON manna_crypt.key_access FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    manna_crypt._key_access(),
    manna_crypt.reset_key_access_stats(),
    manna_crypt.key_access_stats_status()
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION manna_crypt._key_access() TO manna_crypt_user;
GRANT SELECT ON manna_crypt.key_access TO manna_crypt_user;
GRANT EXECUTE ON FUNCTION
    manna_crypt.reset_key_access_stats(),
    manna_crypt.key_access_stats_status()
  TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt._key_access() IS 'internal: this database''s key access counts the caller may see (the key_access view)';
COMMENT ON FUNCTION manna_crypt.reset_key_access_stats() IS 'forget this database''s key access statistics when the transaction commits; recorded in the audit log';
COMMENT ON FUNCTION manna_crypt.key_access_stats_status() IS 'the shared key access table: capacity, entries in use (every database), calls dropped for lack of room, retention in days';
-- ---- 0.2.0: keyring grants (issue 13, part 1) -------------------------------
-- Who may encrypt, decrypt or compute blind indexes with which keyring: the
-- table, its triggers and view (copies of sql/grants.sql), the functions,
-- and for what 0.1.0 allowed: manna_crypt_user may use every keyring,
-- existing and future ('*'), so its members keep working and the next
-- migration's create_keyring() is usable at once. README "Keyring access"
-- says how to tighten that afterwards.
CREATE FUNCTION manna_crypt._invalidate_grants_cache() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_invalidate_grants_cache_wrapper';
CREATE FUNCTION manna_crypt.grant_keyring_access(keyring text, grantee regrole, privilege text)
RETURNS void VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'grant_keyring_access_wrapper';
CREATE FUNCTION manna_crypt.revoke_keyring_access(keyring text, grantee regrole, privilege text)
RETURNS void VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'revoke_keyring_access_wrapper';

CREATE TABLE manna_crypt.keyring_grants (
    keyring      text NOT NULL CHECK (keyring = '*' OR keyring ~ '^[a-z][a-z0-9_]{0,62}$'),
    privilege    text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt', 'blind_index')),
    grantee_name name NOT NULL,
    grantee_oid  oid NOT NULL,
    cluster_id   bigint NOT NULL,
    granted_by   text NOT NULL DEFAULT current_user,
    granted_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (keyring, privilege, grantee_oid, cluster_id)
);
SELECT pg_catalog.pg_extension_config_dump('manna_crypt.keyring_grants', '');

-- Every change reaches every backend's grant cache by its next transaction.
CREATE FUNCTION manna_crypt._grants_changed() RETURNS trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
AS
$$
BEGIN
    PERFORM manna_crypt._invalidate_grants_cache();
    RETURN NULL;
END
$$;
CREATE TRIGGER invalidate_grants_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON manna_crypt.keyring_grants
    FOR EACH STATEMENT EXECUTE FUNCTION manna_crypt._grants_changed();

-- A row made on another cluster (a restore) is bound to the local role of
-- its name when there is one, so that from then on this cluster judges it
-- by OID. Without such a role it stays as it is and is matched by name.
CREATE FUNCTION manna_crypt._grants_restored() RETURNS trigger
    SET search_path = pg_catalog, pg_temp
    LANGUAGE plpgsql
AS
$$
DECLARE
    here bigint := (pg_catalog.pg_control_system()).system_identifier;
    local oid;
BEGIN
    IF NEW.cluster_id OPERATOR(pg_catalog.<>) here THEN
        SELECT r.oid INTO local FROM pg_catalog.pg_roles r
         WHERE r.rolname OPERATOR(pg_catalog.=) NEW.grantee_name;
        IF FOUND THEN
            NEW.grantee_oid := local;
            NEW.cluster_id := here;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER bind_restored BEFORE INSERT ON manna_crypt.keyring_grants
    FOR EACH ROW EXECUTE FUNCTION manna_crypt._grants_restored();

-- The grants as an administrator reads them: the grantee's current name,
-- and whether the row still grants anything.
CREATE VIEW manna_crypt.keyring_access AS
SELECT g.keyring, g.privilege,
       coalesce(r.rolname, g.grantee_name) AS grantee,
       CASE WHEN r.oid IS NOT NULL THEN 'granted'
            WHEN g.cluster_id = (pg_catalog.pg_control_system()).system_identifier
                THEN 'role dropped'
            ELSE 'restored, role missing'
       END AS state,
       g.granted_by, g.granted_at
  FROM manna_crypt.keyring_grants g
  LEFT JOIN pg_catalog.pg_roles r
    ON CASE WHEN g.cluster_id = (pg_catalog.pg_control_system()).system_identifier
            THEN r.oid = g.grantee_oid
            ELSE r.rolname = g.grantee_name END;

COMMENT ON TABLE manna_crypt.keyring_grants IS 'keyring grants: grantee by name and OID with the cluster that made the row; change with grant_keyring_access()/revoke_keyring_access()';
COMMENT ON FUNCTION manna_crypt._grants_changed() IS 'internal: trigger calling _invalidate_grants_cache()';
COMMENT ON FUNCTION manna_crypt._grants_restored() IS 'internal: binds a restored grant to the local role of its name';
COMMENT ON VIEW manna_crypt.keyring_access IS 'who may encrypt, decrypt or compute blind indexes with which keyring (* = every keyring)';

INSERT INTO manna_crypt.keyring_grants (keyring, privilege, grantee_name, grantee_oid, cluster_id, granted_by)
SELECT '*', p.privilege, r.rolname, r.oid, (pg_catalog.pg_control_system()).system_identifier, 'upgrade to 0.2.0'
  FROM pg_catalog.pg_roles r,
       (VALUES ('encrypt'), ('decrypt'), ('blind_index')) AS p(privilege)
 WHERE r.rolname OPERATOR(pg_catalog.=) 'manna_crypt_user';
INSERT INTO manna_crypt.audit_log (role_name, event, keyring, detail)
VALUES (current_user, 'grant_keyring_access', '*',
        '{"grantee": "manna_crypt_user", "privilege": "all", "by": "upgrade to 0.2.0"}');

REVOKE ALL ON manna_crypt.keyring_grants, manna_crypt.keyring_access FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    manna_crypt._invalidate_grants_cache(),
    manna_crypt._grants_changed(),
    manna_crypt._grants_restored(),
    manna_crypt.grant_keyring_access(text, regrole, text),
    manna_crypt.revoke_keyring_access(text, regrole, text)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    manna_crypt.grant_keyring_access(text, regrole, text),
    manna_crypt.revoke_keyring_access(text, regrole, text)
  TO manna_crypt_admin;
GRANT SELECT ON manna_crypt.keyring_access, manna_crypt.keyring_grants TO manna_crypt_admin;
COMMENT ON FUNCTION manna_crypt.grant_keyring_access(text, regrole, text) IS 'allow a role (and the roles with its privileges) to encrypt, decrypt or compute blind indexes with a keyring (* = every keyring); administrators only; audited';
COMMENT ON FUNCTION manna_crypt.revoke_keyring_access(text, regrole, text) IS 'take back a keyring grant; administrators only; audited';
COMMENT ON FUNCTION manna_crypt._invalidate_grants_cache() IS 'internal: queue a keyring grant cache invalidation for every backend';
