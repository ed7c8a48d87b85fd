-- manna_crypt 0.1.0 -> sqlpath: every function defined in SQL gets a fixed
-- search_path, the committing procedure's body is fully qualified, the
-- optimistic-locking functions and column_status() refuse NULL and empty
-- arguments with 22023, and a sql_drop event trigger forgets dropped
-- tables and columns. To be folded into sql/manna_crypt--0.1.0--0.2.0.sql.
--
-- The bodies are copies of sql/keys.sql, sql/locking.sql and
-- sql/reencrypt.sql: an upgraded database must match a fresh install
-- (tests/catalog/expected.txt). CREATE OR REPLACE keeps each function's
-- oid, owner, grants and comment, so triggers, views and functions of
-- users that depend on them stay intact (a trigger calling version_bump()
-- is not affected at all). migrate_fernet, rewrap_column and
-- encrypt_column are unchanged: their bodies were already qualified.

-- sql/keys.sql
CREATE OR REPLACE FUNCTION manna_crypt._keys_changed() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS
$$
BEGIN
    PERFORM manna_crypt._invalidate_key_cache();
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION manna_crypt._audit_log_append_only() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
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
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS
$$
BEGIN
    -- The version column stays: it is data the application may still read.
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid = tbl AND tgname = 'manna_crypt_optimistic_lock') THEN
        EXECUTE pg_catalog.format('DROP TRIGGER manna_crypt_optimistic_lock ON %s', tbl);
    END IF;
END
$$;

-- sql/reencrypt.sql
CREATE OR REPLACE PROCEDURE manna_crypt._reencrypt_run(
    mode text, tbl regclass, col name, source_keyring text, target_keyring text,
    batch_size integer, aad_column name, dry_run boolean)
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
END
$$;

CREATE OR REPLACE FUNCTION manna_crypt.column_status(tbl regclass, col name)
RETURNS TABLE (category text, key_id bigint, keyring text, key_status text, n bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
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
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
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
