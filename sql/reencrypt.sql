-- In-place re-encryption (docs/DESIGN.md section 4): progress and failure tables,
-- the three procedures, column_status().

CREATE TABLE manna_crypt.reencrypt_runs (
    run_id              bigserial PRIMARY KEY,
    tbl                 regclass NOT NULL,
    col                 name NOT NULL,
    mode                text NOT NULL CHECK (mode IN ('migrate_fernet', 'rewrap_column', 'encrypt_column')),
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
CREATE PROCEDURE manna_crypt._reencrypt_run(
    mode text, tbl regclass, col name, source_keyring text, target_keyring text,
    batch_size integer, aad_column name, dry_run boolean)
LANGUAGE plpgsql AS
$$
DECLARE
    h bigint;
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

CREATE PROCEDURE manna_crypt.migrate_fernet(
    tbl regclass, col name, fernet_keyring text, target_keyring text,
    batch_size integer DEFAULT 1000, aad_column name DEFAULT NULL, dry_run boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('migrate_fernet', tbl, col, fernet_keyring, target_keyring, batch_size, aad_column, dry_run);
END
$$;

CREATE PROCEDURE manna_crypt.rewrap_column(
    tbl regclass, col name, keyring text,
    batch_size integer DEFAULT 1000, aad_column name DEFAULT NULL, dry_run boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('rewrap_column', tbl, col, NULL, keyring, batch_size, aad_column, dry_run);
END
$$;

CREATE PROCEDURE manna_crypt.encrypt_column(
    tbl regclass, col name, keyring text,
    batch_size integer DEFAULT 1000, aad_column name DEFAULT NULL, dry_run boolean DEFAULT false)
LANGUAGE plpgsql AS
$$
BEGIN
    CALL manna_crypt._reencrypt_run('encrypt_column', tbl, col, NULL, keyring, batch_size, aad_column, dry_run);
END
$$;

CREATE FUNCTION manna_crypt.column_status(tbl regclass, col name)
RETURNS TABLE (category text, key_id bigint, keyring text, key_status text, n bigint)
LANGUAGE plpgsql STABLE AS
$$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT s.category, s.key_id, k.keyring, k.status, count(*)
           FROM (SELECT CASE WHEN v IS NULL THEN ''null'' ELSE manna_crypt.value_class(v) END AS category,
                        CASE WHEN manna_crypt.is_encrypted(v) THEN manna_crypt.key_id(v) END AS key_id
                   FROM (SELECT %I::text AS v FROM %s) t) s
           LEFT JOIN manna_crypt.keys k ON k.key_id = s.key_id
          GROUP BY 1, 2, 3, 4
          ORDER BY 1, 2', col, tbl);
END
$$;

COMMENT ON FUNCTION manna_crypt.column_status(regclass, name) IS 'counts of NULL, plaintext, Fernet, malformed and mc1 values per key id of a column';
COMMENT ON PROCEDURE manna_crypt.migrate_fernet(regclass, name, text, text, integer, name, boolean) IS 're-encrypt Fernet tokens in place as AES-256-GCM, committing per batch';
COMMENT ON PROCEDURE manna_crypt.rewrap_column(regclass, name, text, integer, name, boolean) IS 're-encrypt values under older key versions of a keyring with its active key, committing per batch';
COMMENT ON PROCEDURE manna_crypt.encrypt_column(regclass, name, text, integer, name, boolean) IS 'encrypt plaintext values of a column in place, committing per batch';
COMMENT ON TABLE manna_crypt.reencrypt_runs IS 're-encryption runs and their progress, updated in each batch''s transaction';
COMMENT ON TABLE manna_crypt.reencrypt_failures IS 'rows a run left untouched, with the reason (never the value)';
COMMENT ON VIEW manna_crypt.reencrypt_progress IS 're-encryption progress, readable while a run is going on';
COMMENT ON PROCEDURE manna_crypt._reencrypt_run(text, regclass, name, text, text, integer, name, boolean) IS 'internal: the batch loop shared by migrate_fernet, rewrap_column and encrypt_column';
