-- manna_crypt access statistics: who used which keyring, and how often.
-- The counts live in shared memory (see src/keys/access_table.rs);
-- _key_access() returns this database's rows the caller may see.

CREATE VIEW manna_crypt.key_access AS
SELECT d.datname AS database, a.role_oid, ro.rolname AS role, a.keyring_id,
       r.name AS keyring, a.operation, a.bucket_start, a.calls
  FROM manna_crypt._key_access() a
  LEFT JOIN pg_catalog.pg_database d ON d.oid = a.database
  LEFT JOIN pg_catalog.pg_roles ro ON ro.oid = a.role_oid
  LEFT JOIN manna_crypt.keyrings r ON r.keyring_id = a.keyring_id;

COMMENT ON VIEW manna_crypt.key_access IS 'encrypt, decrypt and blind-index calls per role, keyring and hour (UTC) in this database; admins see every role, others the roles whose privileges they have';
