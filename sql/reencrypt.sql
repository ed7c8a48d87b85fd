-- In-place re-encryption (docs/DESIGN.md section 4): progress and failure tables,
-- the three procedures, column_status(), and the event trigger that forgets
-- dropped tables and columns.

CREATE TABLE manna_crypt.reencrypt_runs (
    run_id              bigserial PRIMARY KEY,
    tbl                 regclass NOT NULL,
    col                 name NOT NULL,
    mode                text NOT NULL CONSTRAINT reencrypt_runs_mode_check
                        CHECK (mode IN ('migrate_fernet', 'rewrap_column', 'encrypt_column', 'backfill_blind_index')),
    source_keyring      text,
    target_keyring      text NOT NULL,
    batch_size          integer NOT NULL,
    aad_column          name,
    status              text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'abandoned')),
    pid                 integer,
    started_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    pass                integer NOT NULL DEFAULT 1,
    next_block          bigint NOT NULL DEFAULT 0,
    total_blocks        bigint,
    total_rows_estimate bigint,
    scanned             bigint NOT NULL DEFAULT 0,
    converted           bigint NOT NULL DEFAULT 0,
    already             bigint NOT NULL DEFAULT 0,
    nulls               bigint NOT NULL DEFAULT 0,
    failed              bigint NOT NULL DEFAULT 0,
    other_keyring       bigint NOT NULL DEFAULT 0,
    rows_per_second     double precision,
    eta_seconds         double precision
);

-- Rows a run could not convert, left untouched. Never holds the value.
CREATE TABLE manna_crypt.reencrypt_failures (
    run_id       bigint NOT NULL REFERENCES manna_crypt.reencrypt_runs ON DELETE CASCADE,
    row_ctid     tid NOT NULL,
    row_key      text,
    value_class  text NOT NULL,
    value_length bigint NOT NULL,
    reason       text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, row_ctid)
);

CREATE VIEW manna_crypt.reencrypt_progress AS
SELECT run_id, tbl, col, mode, status, pass, pid,
       round(100.0 * least(next_block, coalesce(total_blocks, next_block)) / greatest(coalesce(total_blocks, 1), 1), 1) AS percent_of_pass,
       scanned, converted, failed, already, nulls, other_keyring,
       round(rows_per_second::numeric) AS rows_per_second,
       round(eta_seconds::numeric, 1) AS eta_seconds,
       started_at, updated_at, finished_at
  FROM manna_crypt.reencrypt_runs;

-- The loop the three procedures share: start (or resume), one batch per
-- transaction, finish. A CALL from a procedure keeps transaction control.
--
-- A procedure that commits cannot carry a SET clause, so these four run
-- with their caller's search_path. Their bodies therefore name nothing
-- that path could resolve: every function and type is schema-qualified,
-- there is no operator and no SQL statement, and the work is done by the
-- C functions they call (which fix their own search_path).
-- tests/python/test_catalog.py checks this.
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

-- The blind-index backfill takes its keyring, AAD column, index column,
-- normalization and bits from the column's protection (protected_columns()).
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

-- Runs as the caller (who needs SELECT on the table), with a fixed
-- search_path for itself and the query it builds (see sql/locking.sql).
CREATE FUNCTION manna_crypt.column_status(tbl regclass, col name)
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

-- Dropping a table or a column forgets it. registered_columns and
-- reencrypt_runs name tables by oid (a regclass column records no
-- dependency), and PostgreSQL reuses oids: a stale registration would
-- protect keys for, and be scanned in, whatever table gets the oid next,
-- and an unfinished run would be resumed on it halfway through.
-- Registrations of the dropped table or column are deleted; runs are
-- history and stay, but an unfinished one is closed as abandoned.
--
-- The event trigger runs as the role that issued the DROP, who cannot
-- write these tables, hence SECURITY DEFINER (the extension owner). That
-- is safe because the function
--   * runs only as this event trigger: PostgreSQL refuses to call an
--     event_trigger function directly, and PUBLIC has no EXECUTE on it;
--   * takes no argument and reads only pg_event_trigger_dropped_objects(),
--     which lists what the current command dropped (so its caller owned
--     those objects, or is a superuser);
--   * changes only rows about those objects, which no longer exist (the
--     DROP and this cleanup commit or roll back together);
--   * runs no SQL built at run time and no user code (no trigger is on
--     either table), with a fixed search_path and every name qualified,
--     operators included.
-- It fires for every DROP in the database, so it stays one statement each.
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

COMMENT ON FUNCTION manna_crypt.column_status(regclass, name) IS 'counts of NULL, plaintext, Fernet, malformed and mc1 values per key id of a column';
COMMENT ON PROCEDURE manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean, bigint, boolean) IS 're-encrypt Fernet tokens in place as AES-256-GCM, committing per batch';
COMMENT ON PROCEDURE manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean, bigint, boolean) IS 're-encrypt values under older key versions of a keyring with its active key, committing per batch';
COMMENT ON PROCEDURE manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean, bigint, boolean) IS 'encrypt plaintext values of a column in place, committing per batch';
COMMENT ON PROCEDURE manna_crypt.backfill_blind_index(regclass, name, integer, boolean, bigint, boolean) IS 'fill a protected column''s blind-index column with terms under the keyring''s active index key, committing per batch (after protect_column or rotate_index_key)';
COMMENT ON TABLE manna_crypt.reencrypt_runs IS 're-encryption runs and their progress, updated in each batch''s transaction';
COMMENT ON TABLE manna_crypt.reencrypt_failures IS 'rows a run left untouched, with the reason (never the value)';
COMMENT ON VIEW manna_crypt.reencrypt_progress IS 're-encryption progress, readable while a run is going on';
COMMENT ON FUNCTION manna_crypt._forget_dropped() IS 'internal: sql_drop event trigger forgetting registrations (and closing unfinished runs) of dropped tables and columns';
COMMENT ON EVENT TRIGGER manna_crypt_forget_dropped IS 'forgets registered columns of dropped tables and columns';
COMMENT ON PROCEDURE manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean, bigint, boolean) IS 'internal: the batch loop shared by migrate_fernet, rewrap_column and encrypt_column';
