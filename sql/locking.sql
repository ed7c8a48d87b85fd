-- Optimistic locking: install or remove the version_bump() trigger.

CREATE FUNCTION manna_crypt.enable_optimistic_locking(tbl regclass, col name DEFAULT 'version')
RETURNS void
LANGUAGE plpgsql AS
$$
DECLARE
    typ regtype;
BEGIN
    SELECT a.atttypid::regtype INTO typ
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        EXECUTE pg_catalog.format('ALTER TABLE %s ADD COLUMN %I bigint NOT NULL DEFAULT 1', tbl, col);
    ELSIF typ NOT IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype) THEN
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
LANGUAGE plpgsql AS
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
