-- Optimistic locking: install or remove the version_bump() trigger.
--
-- Both functions run as their caller (the table's owner) and carry a fixed
-- search_path: with the caller's, an operator another role put in a schema
-- on that path (e.g. public.=(oid, regclass), an exact match for
-- `attrelid = tbl`) would run with the caller's rights. Function names are
-- qualified anyway.

CREATE FUNCTION manna_crypt.enable_optimistic_locking(tbl regclass, col name DEFAULT 'version')
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

CREATE FUNCTION manna_crypt.disable_optimistic_locking(tbl regclass)
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

COMMENT ON FUNCTION manna_crypt.enable_optimistic_locking(regclass, name) IS 'add the version column (bigint NOT NULL DEFAULT 1) if missing and install the version_bump trigger; idempotent';
COMMENT ON FUNCTION manna_crypt.disable_optimistic_locking(regclass) IS 'remove the version_bump trigger (the column stays)';
