-- manna_crypt keyring grants: who may encrypt, decrypt or compute blind
-- indexes with which keyring (src/keys/grants.rs judges, src/keys/access.rs
-- writes; README "Keyring access").
--
-- A grantee is stored by name AND by OID, with the system identifier of the
-- cluster that made the row (pg_control_system()). A regrole/OID column
-- alone would dangle after DROP ROLE and point at a random role, or none,
-- in a restore on another cluster; a name alone would grant to any later
-- role of the same name. So: in the cluster that made the row the OID
-- decides (a dropped role's OID is never a later role's), elsewhere the
-- name does, and a restore re-binds rows to the local role of that name
-- (the trigger below). The table is plain data with no dependency on a
-- role, so pg_dump keeps it and a restore never fails on a missing role.
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
